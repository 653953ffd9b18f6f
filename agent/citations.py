"""Citations as data: from MoBA routing and from path:line references in an answer.

Routing citations, with per-head evidence (the recorder's `per_head`): every key block that holds
packed source lines (sinks and the blocks of the question itself excluded) scores the weighted sum
over (layer, head) of the head's share of evidence on it (calibrated weights, `agent.headweights`,
else every head alike); the best blocks are narrowed to the lines on which the question tokens'
attention mass stands out (`line_mass`), merged and ranked. Without per-head evidence: the blocks the
gate routed the question and answer tokens to are weighted by the attention mass the recorded queries
put on them, and narrowed so.
Text citations: path:line references the model wrote, kept only when the source map resolves
them. Nothing here renders; the CLI does. Knows no model, only a recorder and a source map.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace

import numpy as np
import torch

from moba.capture import MASS, RoutingRecorder

ROUTING, TEXT, BOTH = "routing", "text", "both"
_REF = re.compile(
    r"(?<![\w/.-])(?P<path>[\w][\w./-]*\.[A-Za-z0-9_]+|[\w][\w./-]*/[\w.-]+)"
    r"(?::|#L)(?P<start>\d+)(?:\s*[-–]\s*L?(?P<end>\d+))?"
)


TOP_N, MAX_LINES = 8, 24  # blocks cited, lines a block: the selection where no weights file names one
KEEP_SHARE = 0.3  # ranges under 0.3 x the strongest are dropped: +0.06-0.08 line precision (bench/RESULTS.md)
SELECTION = dict(top_n=TOP_N, max_lines=MAX_LINES, keep_share=KEEP_SHARE)  # `cite_blocks`' keywords, defaults


@dataclass(frozen=True)
class Citation:
    """A cited line range. score: routing strength (share of routed attention), or 0 for text-only."""

    path: str
    start_line: int
    end_line: int
    score: float
    source: str

    @classmethod
    def from_dict(cls, d: dict) -> Citation:
        return cls(d["path"], d["start_line"], d["end_line"], d["score"], d["source"])

    def to_dict(self) -> dict:
        return {"path": self.path, "start_line": self.start_line, "end_line": self.end_line,
                "score": round(self.score, 4), "source": self.source}


def from_routing(rec: RoutingRecorder, smap, *, block_size: int, sink_blocks: int,
                 top_n: int = TOP_N, max_lines: int = MAX_LINES, weights: torch.Tensor | None = None,
                 signal: str = MASS, keep_share: float = KEEP_SHARE) -> list[Citation]:
    """Ranked citations from a recorder's routing over a source map in absolute token positions.

    With per-head evidence in the recorder, see `from_evidence` (weights, signal, keep_share). Otherwise:
    Candidates are the blocks the recorded queries attended (routed and own), sink blocks
    excluded: they are attended by rule, not chosen. Each candidate block is narrowed to its lines
    whose attention mass stands out from the block's typical line (mass minus the block's median
    line mass), which removes the recency and sink baselines. The best `max_lines` lines are
    merged into ranges and ranked. Without recorded mass, routed blocks are cited whole, weighed
    by how often the gate picked them.
    """
    if rec.head_mass:
        return from_evidence(rec, smap, block_size=block_size, sink_blocks=sink_blocks, top_n=top_n,
                             max_lines=max_lines, weights=weights, signal=signal, keep_share=keep_share)
    if not rec.key_mass.numel():
        return _whole_blocks(rec, smap, block_size, sink_blocks, top_n)
    blocks = [b for b in attended_blocks(rec) if b >= sink_blocks]
    mass = rec.key_mass.numpy()
    lines = [x for b in blocks for x in _line_excess(smap, mass, b * block_size, (b + 1) * block_size)]
    lines.sort(key=lambda x: -x[2])
    picked = [Citation(smap.paths[f], ln, ln, s, ROUTING) for f, ln, s in lines[:max_lines] if s > 0]
    total = sum(c.score for c in picked) or 1.0
    ranges = merge([replace(c, score=c.score / total) for c in picked], gap=2)
    return sorted(ranges, key=lambda c: -c.score)[:top_n]


def from_evidence(rec: RoutingRecorder, smap, *, block_size: int, sink_blocks: int, top_n: int = TOP_N,
                  max_lines: int = MAX_LINES, weights: torch.Tensor | None = None, signal: str = MASS,
                  keep_share: float = KEEP_SHARE) -> list[Citation]:
    """Ranked citations from per-head evidence: `cite_blocks` over the recorder's `evidence_scores` and
    its (head-weighted) `line_mass`."""
    scores = evidence_scores(rec, smap, block_size=block_size, sink_blocks=sink_blocks, weights=weights, signal=signal)
    return cite_blocks(scores, line_mass(rec), smap, block_size=block_size, top_n=top_n, max_lines=max_lines,
                       keep_share=keep_share)


def line_mass(rec: RoutingRecorder) -> np.ndarray:
    """fp32 [Tk]: the key mass that narrows a cited block to its lines: the recorded queries' before the
    recorder's tail (a session's question tokens), all of it where no tail was kept. The answer tokens'
    own mass goes where they copy from and picks worse lines when few are taken (bench/RESULTS.md, ninth
    session: at one line a block, top-1 +0.14 and line precision +0.17 without it; equal at the defaults)."""
    return without_tail(rec.key_mass.numpy(), rec.tail_mass.numpy())


def without_tail(mass: np.ndarray, tail: np.ndarray) -> np.ndarray:
    """`mass` [Tk] less `tail` (the later queries' part of it, possibly shorter), clipped at 0."""
    out = mass.copy()
    n = min(len(out), len(tail))
    out[:n] -= tail[:n]
    return np.clip(out, 0.0, None)


def evidence_scores(rec: RoutingRecorder, smap, *, block_size: int, sink_blocks: int,
                    weights: torch.Tensor | None = None, signal: str = MASS) -> np.ndarray:
    """fp64 [n_blocks]: `block_scores` of the recorder's per-head evidence over the candidate blocks."""
    ev = rec.evidence(signal)
    return block_scores(ev, weights, candidate_blocks(smap, ev.shape[-1], block_size, sink_blocks))


def cite_blocks(scores: np.ndarray, mass: np.ndarray, smap, *, block_size: int, top_n: int = TOP_N,
                max_lines: int = MAX_LINES, keep_share: float = KEEP_SHARE) -> list[Citation]:
    """The `top_n` blocks by `scores`, each narrowed to its lines whose key mass (`mass` [Tk]) stands out
    from the block's median line, at most `max_lines` lines a block, merged into ranges; ranges scoring
    under `keep_share` times the best one are dropped. A range scores its block's share times its part of
    all the block's stand-out mass; scores sum to at most 1 over the cited blocks (1 when no line is cut)."""
    order = [int(b) for b in np.argsort(-scores, kind="stable")[:top_n] if scores[b] > 0]
    total = float(sum(scores[b] for b in order)) or 1.0
    out: list[Citation] = []
    for b in order:
        out += _block_ranges(smap, mass, b * block_size, (b + 1) * block_size, scores[b] / total, max_lines)
    ranked = sorted(merge(out), key=lambda c: -c.score)[:top_n]
    return [c for c in ranked if c.score >= keep_share * ranked[0].score]


def candidate_blocks(smap, n_blocks: int, block_size: int, sink_blocks: int) -> np.ndarray:
    """bool [n_blocks]: the block holds packed source lines, is no sink, and ends inside the pack
    (a block that reaches into the question holds the question's own recency mass)."""
    ends = (np.arange(n_blocks) + 1) * block_size
    positions = np.arange(min(n_blocks * block_size, smap.total))  # past the pack no block is a candidate
    files, lines = smap.locate_array(positions)
    source = np.zeros(n_blocks, dtype=bool)
    source[positions[(files >= 0) & (lines > 0)] // block_size] = True
    return source & (np.arange(n_blocks) >= sink_blocks) & (ends <= smap.total)


def block_scores(ev: torch.Tensor, weights: torch.Tensor | None, cand: np.ndarray) -> np.ndarray:
    """fp64 [n_blocks]: sum over (layer, head) of weights[layer, head] (None: all 1) times the head's
    share of its evidence ev [L, H, n_blocks] over the candidate blocks; 0 outside them."""
    if ev.numel() == 0:
        return np.zeros(len(cand))
    ev = ev.double() * torch.from_numpy(cand)
    share = ev / ev.sum(-1, keepdim=True).clamp_min(1e-30)
    w = torch.ones(ev.shape[:2], dtype=torch.float64) if weights is None else weights.double()
    return torch.einsum("lh,lhb->b", w[: ev.shape[0]], share).numpy()


def _block_ranges(smap, mass: np.ndarray, lo: int, hi: int, share: float, max_lines: int) -> list[Citation]:
    """One block's `max_lines` strongest stand-out lines as ranges, each scored by `share` times its part of
    ALL the block's stand-out mass, so that a block whose mass peaks on a few lines outranks one that spreads
    it (with one line a block: file hit@1 0.77 -> 0.85 at 16K, bench/RESULTS.md). When no key mass was
    recorded or none stands out, the block's lines are cited whole and scored as if its mass were even:
    `share` times the part `max_lines` of its lines would hold."""
    every = _line_excess(smap, mass, lo, hi) if mass.size else []
    lines = [x for x in every if x[2] > 0]
    if not lines:
        spans = smap.span_lines(lo, hi)
        part = min(1.0, max_lines / max(len(every) or sum(b - a + 1 for _, a, b in spans), 1))
        return [Citation(p, a, b, share * part, ROUTING) for p, a, b in spans[:1]]
    total = sum(x[2] for x in lines)
    lines = sorted(lines, key=lambda x: -x[2])[:max_lines]
    return merge([Citation(smap.paths[f], ln, ln, share * e / total, ROUTING) for f, ln, e in lines], gap=2)


def routed_blocks(rec: RoutingRecorder, sink_blocks: int) -> dict[int, int]:
    """Block id -> times it was routed to over all layers (`routed_by_layer`)."""
    counts: dict[int, int] = {}
    for per_layer in routed_by_layer(rec, sink_blocks).values():
        for b, n in per_layer.items():
            counts[b] = counts.get(b, 0) + n
    return counts


def routed_by_layer(rec: RoutingRecorder, sink_blocks: int) -> dict[int, dict[int, int]]:
    """Recorded layer -> block id -> times the gate routed to it (own, sink and local blocks excluded).

    Sinks are told by id (< sink_blocks), not by slot: a record's slots may be capped at its number
    of blocks (`moba.types.clamp_blocks`), and routed slots never hold a sink id.
    """
    out: dict[int, dict[int, int]] = {}
    for layer, records in rec.records.items():
        counts = out.setdefault(layer, {})
        for r in records:
            slots = slice(1, r.blocks.shape[-1] - sink_blocks)
            ids, scores = r.blocks[..., slots], r.scores[..., slots]
            ids = ids[(ids >= sink_blocks) & (scores < float("inf"))]  # local blocks are forced, not routed
            for b, n in zip(*np.unique(ids.numpy(), return_counts=True)):
                counts[int(b)] = counts.get(int(b), 0) + int(n)
    return out


@dataclass(frozen=True)
class RoutingCounts:
    """What the gate routed one answer's recorded tokens to: per layer, block id -> times routed
    (`routed_by_layer`), and the packed lines each routed block holds, (path, first, last) per file."""

    per_layer: dict[int, dict[int, int]]
    spans: dict[int, list[tuple[str, int, int]]]


def routing_counts(rec: RoutingRecorder, smap, *, block_size: int, sink_blocks: int) -> RoutingCounts:
    """The RoutingCounts of a recorder over a source map in absolute token positions."""
    per_layer = routed_by_layer(rec, sink_blocks)
    blocks = sorted({b for counts in per_layer.values() for b in counts})
    return RoutingCounts(per_layer, {b: smap.span_lines(b * block_size, (b + 1) * block_size) for b in blocks})


def attended_blocks(rec: RoutingRecorder) -> dict[int, int]:
    """Block id -> times it was attended (own, routed and sink slots) over all records."""
    counts: dict[int, int] = {}
    for records in rec.records.values():
        for r in records:
            ids = r.blocks[r.blocks >= 0]
            for b, n in zip(*np.unique(ids.numpy(), return_counts=True)):
                counts[int(b)] = counts.get(int(b), 0) + int(n)
    return counts


def _line_excess(smap, mass: np.ndarray, lo: int, hi: int) -> list[tuple[int, int, float]]:
    """(file index, line, mass above the block's median line mass) for packed lines in [lo, hi)."""
    toks = np.arange(lo, min(hi, len(mass)))
    files, lines = smap.locate_array(toks)
    keep = (files >= 0) & (lines > 0)
    if not keep.any():
        return []
    key = files[keep].astype(np.int64) * (1 << 32) + lines[keep]
    uniq, inv = np.unique(key, return_inverse=True)
    line_mass = np.bincount(inv, weights=mass[toks[keep]], minlength=len(uniq))
    excess = line_mass - np.median(line_mass)
    return [(int(k >> 32), int(k & 0xFFFFFFFF), float(e)) for k, e in zip(uniq, excess)]


def _whole_blocks(rec, smap, block_size, sink_blocks, top_n) -> list[Citation]:
    counts = routed_blocks(rec, sink_blocks)
    total = sum(counts.values()) or 1
    out = []
    for b, n in counts.items():
        for path, first, last in smap.span_lines(b * block_size, (b + 1) * block_size):
            out.append(Citation(path, first, last, n / total, ROUTING))
    return sorted(merge(out), key=lambda c: -c.score)[:top_n]


def from_text(answer: str, smap) -> list[Citation]:
    """path:line, path:a-b and path#La-Lb references in `answer` that the source map resolves.

    A path may be written as a unique suffix of a packed path ("engine.py" for "agent/engine.py").
    References to unknown files or lines are dropped.
    """
    out = []
    for m in _REF.finditer(answer):
        path = _resolve_path(m.group("path"), smap.paths)
        start = int(m.group("start"))
        end = int(m.group("end") or start)
        if path and start <= end and smap.has(path, start) and smap.has(path, end):
            out.append(Citation(path, start, end, 0.0, TEXT))
    return merge(out)


def _resolve_path(written: str, paths: tuple[str, ...]) -> str | None:
    written = written.removeprefix("./")
    if written in paths:
        return written
    hits = [p for p in paths if p.endswith("/" + written)]
    return hits[0] if len(hits) == 1 else None


def merge(cits: list[Citation], gap: int = 1) -> list[Citation]:
    """Merge ranges of the same file that overlap or lie within `gap` lines; scores add up and the
    source becomes "both" when routing meets text."""
    out: list[Citation] = []
    for c in sorted(cits, key=lambda c: (c.path, c.start_line, c.end_line)):
        last = out[-1] if out else None
        if last and last.path == c.path and c.start_line <= last.end_line + gap:
            src = last.source if last.source == c.source else BOTH
            out[-1] = Citation(c.path, last.start_line, max(last.end_line, c.end_line), last.score + c.score, src)
        else:
            out.append(c)
    return out


def combine(routing: list[Citation], text: list[Citation]) -> list[Citation]:
    """Routing and text citations by routing strength, the model's references that routing did not reach
    last; overlaps merge into "both". Strength first because it ranks files better than the answer's own
    references: gold-file hit@1 0.74 -> 0.82 at 16K, 0.75 -> 0.77 at 30K (bench/RESULTS.md)."""
    return ranked(merge(routing + text, gap=0))


def ranked(cits: list[Citation]) -> list[Citation]:
    """The order an answer shows its citations in: routing strength, text-only references last."""
    return sorted(cits, key=lambda c: (c.source == TEXT, -c.score))


def file_strengths(rec: RoutingRecorder, smap, *, block_size: int, sink_blocks: int,
                   weights: torch.Tensor | None = None, signal: str = MASS) -> dict[str, float]:
    """Share of the stand-out routed attention per file (sums to 1 over files that got any)."""
    out: dict[str, float] = {}
    for c in from_routing(rec, smap, block_size=block_size, sink_blocks=sink_blocks, top_n=10**9,
                          max_lines=10**9, weights=weights, signal=signal, keep_share=0.0):
        out[c.path] = out.get(c.path, 0.0) + c.score
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def uncited_sections(text: str, smap) -> tuple[int, int]:
    """(sections citing no packed line, sections) of `text`, its blank-line separated paragraphs."""
    sections = [x for x in re.split(r"\n\s*\n", text) if x.strip()]
    return sum(not from_text(x, smap) for x in sections), len(sections)


def display_path(path: str, root: str, absolute: bool = False, cwd: str | None = None) -> str:
    """A pack path (relative to `root`) as the user can open it: relative to `cwd` (default: the current
    directory), or absolute. Falls back to the absolute path where no relative one exists (another drive)."""
    full = os.path.normpath(os.path.join(root, path))
    if absolute:
        return full
    try:
        return os.path.relpath(full, cwd or os.getcwd())
    except ValueError:
        return full


def relocate(cites: list[Citation], root: str, absolute: bool = False, cwd: str | None = None) -> list[Citation]:
    """`cites` with their paths made openable from `cwd` (`display_path`)."""
    return [replace(c, path=display_path(c.path, root, absolute, cwd)) for c in cites]
