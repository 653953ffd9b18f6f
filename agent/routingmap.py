"""The routing picture: a heat map of routed blocks x layers, columns labelled by file:lines.

Drawn from an answer's routing counts (`agent.citations.RoutingCounts`); HTML needs nothing, PNG
needs matplotlib (optional). Knows no models, recorders or sessions.
"""

from __future__ import annotations

import html
from pathlib import Path

import click
import numpy as np


def routing_matrix(routing) -> tuple[np.ndarray, list[int], list[str], list[int]]:
    """(counts [layers, blocks], layer ids, column labels, block ids) of a RoutingCounts."""
    layers = sorted(routing.per_layer)
    blocks = sorted({b for counts in routing.per_layer.values() for b in counts})
    column = {b: i for i, b in enumerate(blocks)}
    mat = np.zeros((len(layers), len(blocks)))
    for li, layer in enumerate(layers):
        for b, n in routing.per_layer[layer].items():
            mat[li, column[b]] = n
    return mat, layers, [_label(routing.spans[b], b) for b in blocks], blocks


def _label(spans: list[tuple[str, int, int]], b: int) -> str:
    if not spans:
        return f"block {b} (prompt)"
    path, lo, hi = spans[0]
    more = f" +{len(spans) - 1}" if len(spans) > 1 else ""
    return f"{path}:{lo}-{hi}{more}"


def write_routing_map(path: str, routing) -> None:
    """Write the heat map of `routing` (RoutingCounts) to path (.html or .png). Raises ClickException on
    other suffixes."""
    mat, layers, labels, _ = routing_matrix(routing)
    suffix = Path(path).suffix.lower()
    if suffix == ".html":
        Path(path).write_text(_html(mat, layers, labels), encoding="utf-8")
    elif suffix == ".png":
        _png(path, mat, layers, labels)
    else:
        raise click.ClickException(f"--routing-map must end in .html or .png, got {path}")


def _html(mat: np.ndarray, layers: list[int], labels: list[str]) -> str:
    peak = mat.max() if mat.size else 1.0
    head = "".join(f'<th class="c"><div>{html.escape(x)}</div></th>' for x in labels)
    rows = []
    for i, layer in enumerate(layers):
        cells = "".join(f'<td style="background:rgba(200,40,40,{v / peak:.2f})" title="{int(v)}"></td>'
                        for v in mat[i])
        rows.append(f"<tr><th>layer {layer}</th>{cells}</tr>")
    style = ("table{border-collapse:collapse;font:12px monospace}td{width:14px;height:14px;border:1px solid #eee}"
             "th.c{height:260px;vertical-align:bottom}th.c div{writing-mode:vertical-rl;transform:rotate(180deg)}")
    return (f"<!doctype html><meta charset=utf-8><title>moba-ask routing</title><style>{style}</style>"
            f"<h3>Routed blocks (columns) x layers (rows): selections by question and answer tokens</h3>"
            f"<table><tr><th></th>{head}</tr>{''.join(rows)}</table>")


def _png(path: str, mat, layers, labels) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise click.ClickException("a PNG routing map needs matplotlib: pip install matplotlib, or use .html") from None
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(labels)), max(4, 0.25 * len(layers))))
    ax.imshow(mat, aspect="auto", cmap="Reds")
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(layers)), [f"layer {x}" for x in layers], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
