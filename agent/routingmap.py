"""The routing picture: a heat map of routed blocks x layers, columns labelled by file:lines.

HTML needs nothing; PNG needs matplotlib (optional). Knows recorders and source maps, not models.
"""

from __future__ import annotations

import html
from pathlib import Path

import click
import numpy as np


def routing_matrix(rec, smap, block_size: int, sink_blocks: int) -> tuple[np.ndarray, list[int], list[str], list[int]]:
    """(counts [layers, blocks], layer ids, column labels, block ids) of routed selections."""
    layers = sorted(rec.records)
    counts: dict[tuple[int, int], int] = {}
    for li, layer in enumerate(layers):
        for r in rec.records[layer]:
            ids = r.blocks[..., 1 : r.blocks.shape[-1] - sink_blocks]
            for b, n in zip(*np.unique(ids[ids >= sink_blocks].numpy(), return_counts=True)):
                counts[li, int(b)] = counts.get((li, int(b)), 0) + int(n)
    blocks = sorted({b for _, b in counts})
    mat = np.zeros((len(layers), len(blocks)))
    for (li, b), n in counts.items():
        mat[li, blocks.index(b)] = n
    labels = [_label(smap, b, block_size) for b in blocks]
    return mat, layers, labels, blocks


def _label(smap, b: int, block_size: int) -> str:
    spans = smap.span_lines(b * block_size, (b + 1) * block_size)
    if not spans:
        return f"block {b} (prompt)"
    path, lo, hi = spans[0]
    more = f" +{len(spans) - 1}" if len(spans) > 1 else ""
    return f"{path}:{lo}-{hi}{more}"


def write_routing_map(path: str, rec, session) -> None:
    """Write the heat map of `rec` to path (.html or .png). Raises ClickException on other suffixes."""
    mat, layers, labels, _ = routing_matrix(rec, session.smap, session.config.block_size, session.config.sink_blocks)
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
