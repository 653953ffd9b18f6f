"""Calibrate line weights: which (layer, query head) pairs put a question's attention on the gold lines inside
a cited block, and the line selection (`agent.citations.cite_blocks`) to use with them.

A `LineCase` is one calibration answer: the scores its citations rank blocks by (the calibrated block weights),
every line of its KEEP best blocks as a segment (block, file, line, first token) with each head's question mass
on it, the answer text and the gold lines. A head scores how often its strongest line in a block that holds gold
lines (and others) is a gold line. Candidate line weights are the N best heads weighted by that score (N in
TOPS); candidate selections are SELECTIONS. Each pair is scored with the evaluation's own citation scoring
(`runner.citation_scores`, text references included) by line precision + top-1 + top-3 citation on the gold
lines; the best is kept only when it beats the block weights under the default selection. Knows no model.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np

from agent import citations as cit
from agent.evaluate.runner import citation_scores
from agent.headweights import LineWeights

KEEP = 8  # blocks a case keeps: a selection may cite up to this many
TOPS = (1, 2, 4, 8, 16, 32, 64)
SELECTIONS = tuple(dict(top_n=t, max_lines=m, keep_share=k)
                   for t, m, k in itertools.product((3, 5, 8), (1, 2, 3), (0.3, 0.5, 0.7)))


@dataclass(frozen=True)
class LineCase:
    """One answer. scores: fp64 [n_blocks]; block, file, line, tok: int32 [n_seg]; mass: fp16 [n_seg, rows]
    (row = layer * heads + head); smap: the session's source map; gold: path, start_line, end_line."""

    scores: np.ndarray
    block: np.ndarray
    file: np.ndarray
    line: np.ndarray
    tok: np.ndarray
    mass: np.ndarray
    smap: object
    block_size: int
    answer: str
    path: str
    start_line: int
    end_line: int

    def narrowed(self, scores: np.ndarray) -> LineCase:
        """The case ranked by `scores`, keeping the segments of its KEEP best blocks."""
        best = [int(b) for b in np.argsort(-scores, kind="stable")[:KEEP] if scores[b] > 0]
        keep = np.isin(self.block, best)
        return replace(self, scores=scores, block=self.block[keep], file=self.file[keep], line=self.line[keep],
                       tok=self.tok[keep], mass=self.mass[keep])

    def gold(self) -> np.ndarray:
        """bool [n_seg]: the segment is a gold line."""
        paths = np.array(self.smap.paths, dtype=object)[self.file] if len(self.file) else np.zeros(0, object)
        return (paths == self.path) & (self.line >= self.start_line) & (self.line <= self.end_line)


def case_from(rec, smap, *, blocks, block_size: int, n_layers: int, answer: str, path: str, start_line: int,
              end_line: int, scores: np.ndarray | None = None) -> LineCase:
    """A LineCase over the lines of `blocks` from a recorder that kept per-head key mass (`head_keys`).
    Raises ValueError for a recorder that kept none."""
    per_head = rec.question_head_mass(n_layers).flatten(0, 1)  # [rows, Tk]
    if per_head.numel() == 0:
        raise ValueError("the recorder kept no per-head key mass: record with RoutingRecorder(head_keys=True)")
    tk = per_head.shape[-1]
    toks = np.concatenate([np.arange(b * block_size, min((b + 1) * block_size, tk, smap.total)) for b in blocks]
                          or [np.zeros(0, np.int64)])
    files, lines = smap.locate_array(toks)
    ok = (files >= 0) & (lines > 0)
    toks, files, lines = toks[ok], files[ok], lines[ok]
    key = ((toks // block_size).astype(np.int64) << 40) + (files.astype(np.int64) << 20) + lines
    _, first, inv = np.unique(key, return_index=True, return_inverse=True)
    mass = np.zeros((len(first), per_head.shape[0]), np.float32)
    np.add.at(mass, inv, per_head[:, toks].T.float().cpu().numpy())
    n_blocks = -(-tk // block_size)
    return LineCase(np.zeros(n_blocks) if scores is None else scores, (toks[first] // block_size).astype(np.int32),
                    files[first].astype(np.int32), lines[first].astype(np.int32), toks[first].astype(np.int32),
                    mass.astype(np.float16), smap, block_size, answer, path, start_line, end_line)


def head_hits(cases: list[LineCase]) -> np.ndarray:
    """fp64 [rows]: per head, the share of (case, block holding gold and other lines) pairs whose strongest
    segment for that head is a gold line (a head with no mass in the block misses)."""
    hits, n = np.zeros(cases[0].mass.shape[1] if cases else 0), 0
    for c in cases:
        gold, m = c.gold(), c.mass.astype(np.float32)
        for b in np.unique(c.block[gold]):
            inb = c.block == b
            if gold[inb].all():
                continue
            mb = m[inb]
            hits = hits + gold[inb][mb.argmax(0)] * (mb.sum(0) > 0)
            n += 1
    return hits / max(n, 1)


def top_weights(score: np.ndarray, n: int) -> np.ndarray:
    """fp64 [rows]: the n best rows by score, weighted by it and normalised; zero elsewhere."""
    order = np.argsort(-score, kind="stable")[:n]
    w = np.zeros(len(score))
    w[order] = np.maximum(score[order], 1e-9)
    return w / w.sum()


def rates(cases: list[LineCase], weights: np.ndarray, selection: dict) -> dict:
    """Mean line precision, top-1 and top-3 citation on the gold lines of the cases' citations when lines are
    picked by the question mass under `weights` [rows] with `selection`."""
    rows = []
    for c in cases:
        mass = np.zeros(c.smap.total + 1, np.float32)
        np.add.at(mass, c.tok, c.mass.astype(np.float32) @ weights.astype(np.float32))
        routed = cit.cite_blocks(c.scores, mass, c.smap, block_size=c.block_size, **selection)
        cites = cit.combine(routed, cit.from_text(c.answer, c.smap))
        rows.append(citation_scores(cites, c.path, c.start_line, c.end_line, c.smap))
    return {k: round(float(np.mean([r[k] for r in rows])), 4) for k in ("line_precision", "top1_cite", "top3_cite")}


def objective(r: dict) -> float:
    """What `choose` maximises: line precision + top-1 + top-3 citation on the gold lines, equally weighted."""
    return r["line_precision"] + r["top1_cite"] + r["top3_cite"]


def choose(cases: list[LineCase], block_weights: np.ndarray, tops=TOPS,
           selections=SELECTIONS) -> tuple[np.ndarray | None, dict | None, dict]:
    """(line weights [rows] or None, their selection or None, metrics): the best (N, selection) by
    `objective`, or None when it does not beat the block weights' lines under the default selection."""
    base = rates(cases, block_weights, cit.SELECTION)
    hits = head_hits(cases)
    best = (objective(base), None, None, base, None)
    for n in tops:
        w = top_weights(hits, n)
        for sel in selections:
            r = rates(cases, w, sel)
            if objective(r) > best[0]:
                best = (objective(r), w, sel, r, n)
    _, w, sel, r, n = best
    return w, sel, dict(default=base, chosen=r, top_heads=n, tasks=len(cases))


def cross_check(cases: list[LineCase], block_weights: np.ndarray, tops=TOPS, selections=SELECTIONS) -> dict | None:
    """Two folds (even / odd cases): choose on one, measure the choice on the other (the block weights' lines
    where nothing is chosen); the mean of both folds' rates. None with fewer than two cases."""
    folds = [cases[0::2], cases[1::2]]
    if min(len(f) for f in folds) == 0:
        return None
    runs = []
    for fit, test in (folds, folds[::-1]):
        w, sel, _ = choose(fit, block_weights, tops, selections)
        runs.append(rates(test, block_weights, cit.SELECTION) if w is None else rates(test, w, sel))
    return {k: round((runs[0][k] + runs[1][k]) / 2, 4) for k in runs[0]}


def line_weights(w: np.ndarray | None, selection: dict | None, metrics: dict, heads: int) -> LineWeights | None:
    """`choose`'s result as the weights file's "lines" section (None when nothing was chosen)."""
    if w is None:
        return None
    rows = tuple((int(i // heads), int(i % heads), float(w[i])) for i in np.flatnonzero(w))
    return LineWeights(rows, **selection, meta=dict(metrics=metrics))
