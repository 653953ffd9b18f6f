"""Calibrate citation head weights: which (layer, query head) pairs of a model point at the gold code.

Every task of every workspace is asked through a Session (per-head capture on, as in normal use);
the recorder's evidence [layers, heads, blocks] is kept per task with the candidate blocks (those
citations may cite) and the gold blocks (those holding a gold line). A head's score is the mean
reciprocal rank of its best gold block when it ranks the candidate blocks alone (ties count
against it). The weights are the top-N heads, weighted by that score and normalised, with N and
the signal ("mass" or "gate") chosen for the best block hit@1 (then MRR) of the weighted ranking
`agent.citations.block_scores`, the very function citations use. A two-fold split by task
(choose on one half, measure on the other) shows how well the choice carries over. With the block
weights chosen, the line weights and their line selection are chosen on the same answers
(`agent.evaluate.linecal`) and kept when they beat the block weights' lines. Knows no terminal.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from agent import citations as cit
from agent.config import AskConfig
from agent.evaluate import linecal
from agent.evaluate.tasks import Workspace
from agent.headweights import HeadWeights, LineWeights
from agent.session import Session
from moba.capture import SIGNALS

TOP_HEADS = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Sample:
    """One task's evidence. ev: signal -> fp32 [L, H, n_blocks]; cand, gold, gold_file: bool [n_blocks]
    (citable; holds a gold line; holds a line of the gold file); line: every citable line's per-head question
    mass, the answer and the gold (`linecal.LineCase`, not yet ranked), None when not collected."""

    task: str
    ev: dict[str, torch.Tensor]
    cand: np.ndarray
    gold: np.ndarray
    gold_file: np.ndarray
    line: linecal.LineCase | None = None


def collect(runtime, ws: Workspace, cfg: AskConfig, *, open_session: Callable[[Session], None] | None = None,
            on_task: Callable[[int, int], None] | None = None) -> list[Sample]:
    """Ask every task of `ws` once (prefill once, reset between tasks); their evidence samples, each with every
    citable line's per-head question mass (memory: citable lines x layers x heads x 2 bytes a task). Tasks
    whose gold lines lie in no candidate block (a sink, the question's block) are left out."""
    session = Session(runtime, ws.pack, cfg, "ask", None)
    session.head_keys = True
    (open_session or (lambda s: s.open()))(session)
    out = []
    for i, task in enumerate(ws.tasks):
        if on_task:
            on_task(i, len(ws.tasks))
        session.reset()
        answer = session.ask(task.question)
        rec = answer.recorder
        ev = {s: rec.evidence(s) for s in SIGNALS}
        n = ev["mass"].shape[-1]
        p = session.params
        cand = cit.candidate_blocks(session.smap, n, p.block_size, p.sink_blocks)
        gold = _blocks_of(session.smap, task.path, task.start_line, task.end_line, n, p.block_size)
        whole = _blocks_of(session.smap, task.path, 1, _last_line(session.smap, task.path), n, p.block_size)
        if (gold & cand).any():
            line = linecal.case_from(rec, session.smap, blocks=np.flatnonzero(cand), block_size=p.block_size,
                                     n_layers=runtime.num_layers, answer=answer.text, path=task.path,
                                     start_line=task.start_line, end_line=task.end_line)
            out.append(Sample(f"{ws.source_root}:{task.id}", ev, cand, gold, whole, line))
    if on_task:
        on_task(len(ws.tasks), len(ws.tasks))
    return out


def _last_line(smap, path: str) -> int:
    return int(smap.n_lines[smap.paths.index(path)])


def _blocks_of(smap, path: str, first: int, last: int, n: int, block_size: int) -> np.ndarray:
    lo, hi = smap.line_tokens(path, first)[0], smap.line_tokens(path, last)[1]
    mask = np.zeros(n, bool)
    mask[lo // block_size: min(n, -(-hi // block_size))] = True
    return mask


def head_scores(samples: list[Sample], signal: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(MRR, hit@1) fp32 [L, H] of every head ranking the candidate blocks alone."""
    rr = [1.0 / _gold_rank(_ev(s, signal), s) for s in samples]
    stacked = torch.stack(rr)
    return stacked.mean(0), (stacked == 1).float().mean(0)


def _ev(s: Sample, signal: str) -> torch.Tensor:
    """The sample's evidence cut or padded to its n_blocks (gate evidence skips the tail block)."""
    ev = s.ev[signal]
    return torch.nn.functional.pad(ev, (0, len(s.cand) - ev.shape[-1]))[..., : len(s.cand)].double()


def _gold_rank(scores: torch.Tensor, s: Sample) -> torch.Tensor:
    """Rank [...] of the best gold candidate under scores [..., n_blocks]; ties rank the gold last."""
    cand, gold = torch.from_numpy(s.cand), torch.from_numpy(s.gold & s.cand)
    best = scores.masked_fill(~gold, float("-inf")).amax(-1, keepdim=True)
    return 1 + ((scores >= best) & cand & ~gold).sum(-1).double()


def weights_for(mrr: torch.Tensor, n: int) -> torch.Tensor:
    """fp32 [L, H]: the n best heads by MRR, weighted by it and normalised; zero elsewhere (`linecal.top_weights`)."""
    return torch.from_numpy(linecal.top_weights(mrr.flatten().double().numpy(), n)).float().view_as(mrr)


def combined(samples: list[Sample], signal: str, weights: torch.Tensor | None) -> dict:
    """Block hit@1, hit@3, MRR and file hit@1 of the weighted ranking (None weights: every head alike)."""
    hit1, hit3, rr, file1 = [], [], [], []
    for s in samples:
        scores = torch.from_numpy(cit.block_scores(_ev(s, signal), weights, s.cand))
        rank = float(_gold_rank(scores, s))
        hit1.append(rank == 1)
        hit3.append(rank <= 3)
        rr.append(1 / rank)
        file1.append(bool(s.gold_file[int(scores.argmax())]))
    return {k: round(float(np.mean(v)), 4) if v else None for k, v in
            dict(block_hit_at_1=hit1, block_hit_at_3=hit3, block_mrr=rr, file_hit_at_1=file1).items()}


def choose(samples: list[Sample], top_heads=TOP_HEADS) -> tuple[str, int, torch.Tensor, dict]:
    """(signal, N, weights [L, H], metrics of every signal and N) with the best block hit@1, then MRR."""
    table, best = {}, None
    for signal in SIGNALS:
        mrr, _ = head_scores(samples, signal)
        table[signal] = {"uniform": combined(samples, signal, None)}
        for n in top_heads:
            w = weights_for(mrr, n)
            m = table[signal][f"top{n}"] = combined(samples, signal, w)
            key = (m["block_hit_at_1"], m["block_mrr"])
            if best is None or key >= best[0]:  # ties go to more heads: less fit to few tasks
                best = (key, signal, n, w)
    _, signal, n, w = best
    return signal, n, w, table


def cross_check(samples: list[Sample], top_heads=TOP_HEADS) -> dict | None:
    """Two folds (even / odd samples): choose on one, measure on the other; the mean of both."""
    folds = [samples[0::2], samples[1::2]]
    if min(len(f) for f in folds) == 0:
        return None
    runs = []
    for fit, test in (folds, folds[::-1]):
        signal, _, w, _ = choose(fit, top_heads)
        runs.append(combined(test, signal, w))
    return {k: round((runs[0][k] + runs[1][k]) / 2, 4) for k in runs[0]}


def calibrate(samples: list[Sample], *, model: str, identity: dict, cfg: AskConfig, repos: list[str],
              top_heads=TOP_HEADS) -> HeadWeights:
    """The HeadWeights chosen on `samples`, with the metrics and provenance in its meta."""
    if not samples:
        raise ValueError("no task has its gold lines in a citable block: use more tasks or larger repositories")
    signal, n, w, table = choose(samples, top_heads)
    L, H = identity["num_layers"], identity["num_heads"]
    w = torch.nn.functional.pad(w, (0, 0, 0, L - w.shape[0]))  # layers that recorded nothing (sliding windows)
    rows = tuple((int(i // H), int(i % H), float(w.flatten()[i])) for i in w.flatten().nonzero().flatten())
    lines = line_weights(samples, signal, w, H)
    meta = dict(identity=identity, top_heads=n, attention=cfg.attention, top_k=cfg.top_k,
                sink_blocks=cfg.sink_blocks, dense_layers=list(cfg.dense_layers or ()), rope_yarn=cfg.rope_yarn,
                calibration=dict(repos=repos, tasks=len(samples)), date=datetime.date.today().isoformat(),
                metrics=dict(chosen=table[signal][f"top{n}"], uniform=table[signal]["uniform"],
                             cross_fold=cross_check(samples, top_heads), table=table))
    return HeadWeights(model, cfg.block_size, signal, L, H, rows, cfg.qa_policy, meta, lines)


def line_weights(samples: list[Sample], signal: str, w: torch.Tensor, heads: int) -> LineWeights | None:
    """The line heads and selection `linecal.choose` finds on the samples ranked by the block weights w [L, H];
    None when no sample kept its lines or none beats the block weights' own lines."""
    cases = [s.line.narrowed(cit.block_scores(_ev(s, signal), w, s.cand)) for s in samples if s.line is not None]
    if not cases:
        return None
    block_w = w.flatten().double().numpy()
    lw, sel, metrics = linecal.choose(cases, block_w)
    return linecal.line_weights(lw, sel, dict(metrics, cross_fold=linecal.cross_check(cases, block_w)), heads)
