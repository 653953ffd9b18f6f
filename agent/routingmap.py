"""The routing picture: which packed blocks the gate routed an answer to, layer by layer.

HTML (needs nothing): one self-contained page (no script, no network) titled by the question and the
run (model, attention), with a legend, the answer's citations strongest first, and a heat map of routed
blocks (rows, grouped by file, strongest file first, each with its line range) x layers (columns);
stronger cells are darker. Every label is escaped (file names also for control characters and bidi
overrides). PNG needs matplotlib (optional): the bare blocks x layers matrix. Drawn from an answer's
routing counts (`agent.citations.RoutingCounts`); knows no models, recorders or sessions.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import click
import numpy as np

LEVELS = 8  # shades of the heat map; level k of LEVELS covers counts up to k/LEVELS of the peak
PROMPT = "(prompt: question and answer)"
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


@dataclass(frozen=True)
class BlockRow:
    """One routed block as listed under one file: its lines of that file and its count per layer."""

    block: int
    first: int
    last: int
    counts: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.counts)


def routing_matrix(routing) -> tuple[np.ndarray, list[int], list[str], list[int]]:
    """(counts [layers, blocks], layer ids, column labels, block ids) of a RoutingCounts."""
    layers = sorted(routing.per_layer)
    blocks = sorted({b for counts in routing.per_layer.values() for b in counts})
    column = {b: i for i, b in enumerate(blocks)}
    mat = np.zeros((len(layers), len(blocks)))
    for li, layer in enumerate(layers):
        for b, n in routing.per_layer[layer].items():
            mat[li, column[b]] = n
    return mat, layers, [_label(routing.spans.get(b, []), b) for b in blocks], blocks


def _label(spans: list[tuple[str, int, int]], b: int) -> str:
    if not spans:
        return f"block {b} (prompt)"
    path, lo, hi = spans[0]
    more = f" +{len(spans) - 1}" if len(spans) > 1 else ""
    return f"{path}:{lo}-{hi}{more}"


def relocated(routing, display: Callable[[str], str]):
    """`routing` with each span's path passed through `display` (e.g. made relative to the current directory)."""
    return replace(routing, spans={b: [(display(p), lo, hi) for p, lo, hi in spans]
                                   for b, spans in routing.spans.items()})


def file_groups(routing) -> list[tuple[str, list[BlockRow]]]:
    """(file, its routed blocks in line order), strongest file (most routings) first. A block holding
    lines of several files is listed under each; blocks without source lines go under PROMPT."""
    layers = sorted(routing.per_layer)
    blocks = sorted({b for counts in routing.per_layer.values() for b in counts})
    groups: dict[str, list[BlockRow]] = {}
    for b in blocks:
        counts = tuple(int(routing.per_layer[layer].get(b, 0)) for layer in layers)
        for path, lo, hi in routing.spans.get(b) or [(PROMPT, 0, 0)]:
            groups.setdefault(path, []).append(BlockRow(b, lo, hi, counts))
    ranked = sorted(groups.items(), key=lambda g: (-sum(r.total for r in g[1]), g[0]))
    return [(path, sorted(rows, key=lambda r: (r.first, r.block))) for path, rows in ranked]


def write_routing_map(path: str, routing, *, question: str = "", about: str = "",
                      citations: Sequence = ()) -> None:
    """Write the routing map of `routing` (RoutingCounts) to path (.html or .png). `question` and
    `about` (the run: model, attention) title the page; `citations` (strongest first) are listed on it.
    Raises ClickException on other suffixes, and for .png without matplotlib."""
    suffix = Path(path).suffix.lower()
    if suffix == ".html":
        Path(path).write_text(page(routing, question=question, about=about, citations=citations), encoding="utf-8")
    elif suffix == ".png":
        mat, layers, labels, _ = routing_matrix(routing)
        _png(path, mat, layers, labels)
    else:
        raise click.ClickException(f"--routing-map must end in .html or .png, got {path}")


def page(routing, *, question: str = "", about: str = "", citations: Sequence = ()) -> str:
    """The self-contained HTML page of `routing` (see the module docstring)."""
    layers = sorted(routing.per_layer)
    groups = file_groups(routing)
    peak = max((n for counts in routing.per_layer.values() for n in counts.values()), default=0)
    title = question.strip() or "Routing map"
    parts = [f"<header><h1>{_esc(title)}</h1>"
             + (f'<p class="about">{_esc(about)}</p>' if about else "") + "</header>",
             _legend(peak), _citations(citations)]
    parts.append(_table(groups, layers, peak) if groups else '<p class="none">The gate routed to no blocks.</p>')
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_esc(title)} - moba-ask routing'
            f'</title><style>{_STYLE}</style></head><body>{"".join(parts)}</body></html>\n')


def _legend(peak: int) -> str:
    swatches = "".join(f'<span class="sw h{k}"></span>' for k in range(1, LEVELS + 1))
    return ('<section class="legend"><h2>How to read it</h2><p>Rows: the packed blocks the gate routed the '
            "question and answer tokens to, grouped by file (strongest file first), each with its lines. Columns: "
            "layers. A cell counts the routings of that layer to that block; darker is more.</p>"
            f'<div class="scale"><span>1</span>{swatches}<span>{peak}</span></div></section>')


def _citations(citations: Sequence) -> str:
    if not citations:
        return ""
    items = "".join(f'<li><span class="cite">{_esc_name(c.path)}:{_lines(c.start_line, c.end_line)}</span>'
                    f' <span class="score">{c.score:.0%} {_esc(c.source)}</span></li>' for c in citations)
    return f'<section class="cites"><h2>Citations, strongest first</h2><ol>{items}</ol></section>'


def _table(groups: list[tuple[str, list[BlockRow]]], layers: list[int], peak: int) -> str:
    head = "".join(f"<th>{x}</th>" for x in layers)
    width = len(layers) + 2
    body = []
    for path, rows in groups:
        total = sum(r.total for r in rows)
        body.append(f'<tbody><tr class="file"><th colspan="{width}"><div><span class="path">{_esc_name(path)}</span>'
                    f' <span class="n">{len(rows)} block{"s" * (len(rows) != 1)}, {total} routings</span></div></th></tr>')
        body.extend(_row(r, path == PROMPT, peak) for r in rows)
        body.append("</tbody>")
    return ('<section class="map"><h2>Routed blocks x layers</h2><table><thead><tr><th class="lab" rowspan="2">'
            f'block: lines</th><th rowspan="2">total</th><th colspan="{len(layers)}">layer</th></tr><tr>{head}</tr>'
            f'</thead>{"".join(body)}</table></section>')


def _row(r: BlockRow, prompt: bool, peak: int) -> str:
    where = f"block {r.block}" if prompt else f"block {r.block}: lines {_lines(r.first, r.last)}"
    cells = "".join(f'<td class="h{_level(n, peak)}" title="{n}"></td>' if n else "<td></td>" for n in r.counts)
    return f'<tr><th class="lab">{where}</th><td class="tot">{r.total}</td>{cells}</tr>'


def _level(n: int, peak: int) -> int:
    return max(1, -(-LEVELS * n // peak))


def _lines(first: int, last: int) -> str:
    return f"{first}" if first == last else f"{first}-{last}"


def _esc(text: str) -> str:
    """text for HTML, undecodable bytes (surrogates) shown as \\udcNN rather than failing to encode."""
    return html.escape(text.encode("utf-8", "backslashreplace").decode("utf-8"), quote=True)


def _esc_name(path: str) -> str:
    """A file name for HTML, its control characters, bidi overrides and undecodable bytes shown escaped as
    the pack shows them (`\\n`, `\\u202e`, `\\udcff`); names that come escaped already stay as they are."""
    return html.escape(_UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), path), quote=True)


def _shades() -> str:
    return "".join(f".h{k}{{background:hsl(6,78%,{94 - k * 8}%)}}" for k in range(1, LEVELS + 1))


_STYLE = (
    "body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fff}"
    "h1{font-size:20px;margin:0 0 4px;overflow-wrap:anywhere}h2{font-size:15px;margin:20px 0 6px}"
    ".about{color:#555;margin:0}.legend p{margin:0 0 6px;max-width:60em}"
    ".scale{display:flex;align-items:center;gap:2px}.scale span{margin:0 4px}.sw{width:22px;height:14px}"
    ".cites ol{margin:0;padding-left:24px}.cite,.path{font-family:ui-monospace,monospace;overflow-wrap:anywhere}"
    ".score{color:#666}table{border-collapse:collapse;font-size:12px;min-width:32em}"
    "th,td{border:1px solid #e4e4e4;padding:0}td{width:16px;min-width:16px;height:16px}"
    "thead th{padding:2px 3px;font-weight:normal;color:#555;text-align:center}th.lab{text-align:left;"
    "font-weight:normal;padding:1px 8px 1px 16px;white-space:nowrap}td.tot{width:3em;padding:0 6px;"
    "text-align:right;color:#555}tr.file th{text-align:left;padding:8px 6px 3px;background:#f6f6f6;"
    "font-weight:600}tr.file div{width:0;min-width:100%}.n{font-weight:normal;color:#666}"
    ".none{color:#666}" + _shades()
)


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
