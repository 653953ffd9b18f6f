"""The routing evidence behind each MoBA answer of an evaluation, kept so that citations can be re-scored
offline (bench/cite_rescore.py) without the model: per answer, the citation score of every key block
(`agent.citations.evidence_scores`), the head-weighted key mass per token and the answer tokens' own part of
it (files from before 2026-12 lack it); per repository, size and config, the session's source map (its
arrays), the block settings, the line-selection settings its citations used (`cite`) and whether the key mass
is weighted by a weights file's line heads or by its block heads (`mass_heads`).

Saved as one compressed .npz: key "u{i}/..." for unit i's source map and settings, "u{i}/{task id}/scores",
".../mass" and ".../answer_mass" per answer; "index" is a JSON list of the units (repo, context tokens,
config, task ids). The key mass is stored as float16 (it only ranks lines), and only inside the KEPT_BLOCKS
best-scoring blocks (the rest is zero: a re-scoring with top_n <= KEPT_BLOCKS cannot reach it). Dense configs
keep nothing: their citations do not come from MoBA routing. Knows no model and no terminal.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np

from agent import citations as cit
from ingest.sourcemap import SourceMap

_SMAP_ARRAYS = ("starts", "file_idx", "line", "first_mark", "n_lines")
BEFORE_KEEP_SHARE = dict(top_n=8, max_lines=24, keep_share=0.0)  # files saved without "cite"
KEPT_BLOCKS = 16  # blocks whose key mass is kept per answer (by score): re-scoring may cite up to this many


def cite_settings() -> dict:
    """The line-selection settings citations use where no weights file names its own (`citations.SELECTION`)."""
    return dict(cit.SELECTION)


@dataclass
class UnitEvidence:
    """One repository at one size under one config: its source map, settings and per-task evidence."""

    repo: str
    context_tokens: int
    config: str
    block_size: int
    sink_blocks: int
    smap: SourceMap
    cite: dict = field(default_factory=cite_settings)
    line_mass: str = "question"  # whose key mass narrowed the run's citations (`citations.line_mass`)
    mass_heads: str = "blocks"  # the heads that weigh the key mass: "lines" (a weights file's line heads) or "blocks"
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    mass: dict[str, np.ndarray] = field(default_factory=dict)
    answer_mass: dict[str, np.ndarray] = field(default_factory=dict)


class EvidenceLog:
    """Collects UnitEvidence as an evaluation runs; `save` writes them all (atomically)."""

    def __init__(self) -> None:
        self.units: list[UnitEvidence] = []

    def keep(self, repo: str, context_tokens: int, config: str, task_id: str, session, answer) -> None:
        """Record one answer of `session` (its recorder must hold per-head evidence); dense answers are skipped."""
        if session.config.attention == "dense" or answer.recorder is None:
            return
        p = session.params
        u = self.units[-1] if self.units else None
        hw = session.head_weights
        if u is None or (u.repo, u.context_tokens, u.config) != (repo, context_tokens, config):
            u = UnitEvidence(repo, context_tokens, config, p.block_size, p.sink_blocks, session.smap,
                             session.cite_selection(), mass_heads="lines" if hw and hw.lines else "blocks")
            self.units.append(u)
        u.scores[task_id] = cit.evidence_scores(answer.recorder, session.smap, block_size=p.block_size,
                                                sink_blocks=p.sink_blocks, weights=hw and hw.matrix(),
                                                signal=hw.signal if hw else cit.MASS)
        keep = _kept_tokens(u.scores[task_id], p.block_size)
        u.mass[task_id] = _within(answer.recorder.key_mass.numpy(), keep)
        u.answer_mass[task_id] = _within(answer.recorder.tail_mass.numpy(), keep)

    def save(self, path: str) -> None:
        arrays: dict[str, np.ndarray] = {}
        index = []
        for i, u in enumerate(self.units):
            index.append(dict(repo=u.repo, context_tokens=u.context_tokens, config=u.config, block_size=u.block_size,
                              sink_blocks=u.sink_blocks, paths=list(u.smap.paths), tasks=list(u.scores),
                              cite=u.cite, line_mass=u.line_mass, mass_heads=u.mass_heads))
            for name in _SMAP_ARRAYS:
                arrays[f"u{i}/{name}"] = getattr(u.smap, name)
            for tid in u.scores:
                arrays[f"u{i}/{tid}/scores"] = u.scores[tid]
                arrays[f"u{i}/{tid}/mass"] = u.mass[tid]
                arrays[f"u{i}/{tid}/answer_mass"] = u.answer_mass[tid]
        arrays["index"] = np.array(json.dumps(index))
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".npz")
        os.close(fd)
        try:
            np.savez_compressed(tmp, **arrays)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _kept_tokens(scores: np.ndarray, block_size: int) -> np.ndarray:
    """Token positions of the KEPT_BLOCKS best-scoring blocks: the only ones a re-scoring can cite."""
    best = np.argsort(-scores, kind="stable")[:KEPT_BLOCKS]
    best = best[scores[best] > 0]
    return (best[:, None] * block_size + np.arange(block_size)).ravel()


def _within(mass: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """float16 `mass` with every position outside `keep` zeroed (the file compresses to what is kept)."""
    out = np.zeros(len(mass), np.float16)
    keep = keep[keep < len(mass)]
    out[keep] = mass[keep]
    return out


def _known(cite: dict) -> dict:
    """The settings `cite_blocks` still takes (a setting that stood at its neutral value was removed)."""
    return {k: v for k, v in cite.items() if k in BEFORE_KEEP_SHARE}


def load(path: str) -> list[UnitEvidence]:
    """The units an `EvidenceLog.save` wrote."""
    with np.load(path) as z:
        out = []
        for i, meta in enumerate(json.loads(str(z["index"]))):
            smap = SourceMap(*(z[f"u{i}/{n}"] for n in _SMAP_ARRAYS[:3]), tuple(meta["paths"]),
                             *(z[f"u{i}/{n}"] for n in _SMAP_ARRAYS[3:]))
            u = UnitEvidence(meta["repo"], meta["context_tokens"], meta["config"], meta["block_size"],
                             meta["sink_blocks"], smap, _known(meta.get("cite", BEFORE_KEEP_SHARE)),
                             meta.get("line_mass", "all"),  # files from before it was kept: all of it
                             meta.get("mass_heads", "blocks"))
            for tid in meta["tasks"]:
                u.scores[tid] = z[f"u{i}/{tid}/scores"]
                u.mass[tid] = z[f"u{i}/{tid}/mass"].astype(np.float32)
                if f"u{i}/{tid}/answer_mass" in z:
                    u.answer_mass[tid] = z[f"u{i}/{tid}/answer_mass"].astype(np.float32)
            out.append(u)
    return out
