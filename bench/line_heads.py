"""Which attention heads narrow a citation to the gold lines: per-head line evidence, collected on a GPU.

A citation's block comes from the calibrated block heads (agent/heads); its lines come from the question
tokens' key mass summed over the same heads (`agent.citations.line_mass`). This script measures whether
other heads place that mass on the gold lines more precisely. It runs the evaluation's tasks (the same
workspaces and config as `moba-ask eval`) with a recorder that also keeps every (layer, head)'s key mass,
split into the question's part and the answer tokens' part, and stores for each answer, over every line of
its KEEP best-scoring blocks, per-head line mass (one "segment" per line and block).

`collect --cal` first ranks the heads on the calibration repositories (never the evaluated ones): per
(layer, head), how often its strongest line in a gold-holding block is a gold line (`hit`), and how much
more of its mass the gold lines get than their share of the block's tokens (`lift`). A grid of line
weights (top-N heads of each criterion, for the question's and the answer's mass) is written as JSON and
the evaluation's answers store their line mass under each. `bench.line_rescore` re-scores citations from
the stored data with the library's own `cite_blocks`.

    python -m bench.line_heads --model qwen2.5-coder-1.5b --context-tokens 16384 --tasks 40 \
        --cal $CAL --out lh/cal                                      # writes lh/cal/grid.json
    python -m bench.line_heads --model qwen2.5-coder-1.5b --context-tokens 16384 --tasks 300 \
        --grid lh/cal/grid.json --out lh/s16 $S7
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from agent import citations as cit
from agent import session as session_mod
from agent.commands import common
from agent.commands.eval import _load, _units
from agent.config import AskConfig
from agent.evaluate import report as rep
from agent.evaluate import runner
from agent.evaluate.configs import parse_specs
from moba.capture import RoutingRecorder, _grow_add

KEEP = 8  # blocks a re-scoring may cite (the default top_n)
TOPS = (1, 2, 4, 8, 16, 32, 64)
CANDIDATES = 24  # per criterion, heads whose own line mass the evaluation stores


@dataclass
class HeadKeyRecorder(RoutingRecorder):
    """A RoutingRecorder that also keeps each layer's per-head key mass (fp32 [Hq, Tk], on the device):
    the question's part in `q_keys`, the answer tokens' (from tail_start) in `a_keys`."""

    q_keys: dict = field(default_factory=dict)
    a_keys: dict = field(default_factory=dict)
    _layer: int = -1

    def _add_mass(self, layer, p, group, dense):
        self._layer = layer
        super()._add_mass(layer, p, group, dense)

    def _masses(self, p, q, positions, blocks):
        mass, tail = super()._masses(p, q, positions, blocks)
        part = mass if tail is None else mass - tail
        self.q_keys[self._layer] = _grow_add(self.q_keys.get(self._layer), part)
        if tail is not None:
            self.a_keys[self._layer] = _grow_add(self.a_keys.get(self._layer), tail)
        return mass, tail

    def stacked(self, which: str, n_layers: int, tk: int) -> torch.Tensor:
        """fp32 [n_layers * Hq, tk] per-head key mass of the question ("q") or the answer ("a")."""
        store = self.q_keys if which == "q" else self.a_keys
        some = next(iter(self.q_keys.values()))
        out = torch.zeros(n_layers, some.shape[0], tk, device=some.device)
        for layer, x in store.items():
            n = min(tk, x.shape[-1])
            out[layer, :, :n] = x[:, :n]
        return out.flatten(0, 1).clamp_min(0)


def _head_recorder(self, start, end, answer_start):
    hw = self.head_weights
    return HeadKeyRecorder(start=start, end=end, per_head=True, head_weights=hw and hw.matrix(),
                           tail_start=answer_start)


@dataclass
class Segments:
    """Every line of an answer's KEEP best blocks: block id, file index, line, first token."""

    block: np.ndarray
    file: np.ndarray
    line: np.ndarray
    tok: np.ndarray
    inv: np.ndarray  # token (of `toks`) -> segment
    toks: np.ndarray


def segments(smap, scores: np.ndarray, block_size: int, tk: int) -> Segments:
    best = [int(b) for b in np.argsort(-scores, kind="stable")[:KEEP] if scores[b] > 0]
    toks = np.concatenate([np.arange(b * block_size, min((b + 1) * block_size, tk, smap.total)) for b in best]
                          or [np.zeros(0, np.int64)])
    files, lines = smap.locate_array(toks)
    ok = (files >= 0) & (lines > 0)
    toks, files, lines = toks[ok], files[ok], lines[ok]
    blocks = toks // block_size
    key = (blocks.astype(np.int64) << 40) + (files.astype(np.int64) << 20) + lines
    uniq, first, inv = np.unique(key, return_index=True, return_inverse=True)
    return Segments(blocks[first].astype(np.int32), files[first].astype(np.int32), lines[first].astype(np.int32),
                    toks[first].astype(np.int32), inv, toks)


def segment_mass(per_head: torch.Tensor, seg: Segments) -> torch.Tensor:
    """fp32 [n_seg, rows]: per_head [rows, Tk] summed over each segment's tokens."""
    x = per_head[:, torch.from_numpy(seg.toks).to(per_head.device)]
    out = torch.zeros(per_head.shape[0], int(seg.inv.max()) + 1 if len(seg.inv) else 0, device=per_head.device)
    out.index_add_(1, torch.from_numpy(seg.inv).to(per_head.device), x)
    return out.T.contiguous()


class Collector:
    """`runner.run`'s keep callback: per answer, its segments and per-head (or grid-weighted) line mass."""

    def __init__(self, tasks_by_id: dict, grid: dict | None):
        self.tasks_by_id = tasks_by_id
        self.grid = grid
        self.rows: list[dict] = []
        self.arrays: dict[str, np.ndarray] = {}
        self.units: dict[str, dict] = {}

    def keep(self, repo, context_tokens, config, task_id, session, answer) -> None:
        rec, smap, p = answer.recorder, session.smap, session.params
        hw = session.head_weights
        unit = f"{repo}@{context_tokens}"
        if unit not in self.units:
            self.units[unit] = dict(repo=repo, context_tokens=context_tokens, block_size=p.block_size,
                                    sink_blocks=p.sink_blocks, paths=list(smap.paths))
            for name in ("starts", "file_idx", "line", "first_mark", "n_lines"):
                self.arrays[f"{unit}/smap/{name}"] = getattr(smap, name)
        scores = cit.evidence_scores(rec, smap, block_size=p.block_size, sink_blocks=p.sink_blocks,
                                     weights=hw and hw.matrix(), signal=hw.signal if hw else cit.MASS)
        tk = int(rec.key_mass.numel())
        seg = segments(smap, scores, p.block_size, tk)
        n_layers = session.runtime.num_layers
        q = segment_mass(rec.stacked("q", n_layers, tk), seg)
        a = segment_mass(rec.stacked("a", n_layers, tk), seg)
        base = cit.line_mass(rec)
        as_run = np.bincount(seg.inv, weights=base[seg.toks], minlength=len(seg.block)) if len(seg.inv) else np.zeros(0)
        k = f"{unit}/{task_id}"
        self.arrays.update({f"{k}/scores": scores.astype(np.float32), f"{k}/block": seg.block, f"{k}/file": seg.file,
                            f"{k}/line": seg.line, f"{k}/tok": seg.tok, f"{k}/as_run": as_run.astype(np.float32)})
        if self.grid is None:
            self.arrays[f"{k}/q"] = q.cpu().numpy().astype(np.float16)
        else:
            for name, w in self.grid["weights"].items():
                m = q if name.startswith("q") else a
                w = torch.tensor(w, device=m.device, dtype=m.dtype)
                self.arrays[f"{k}/g/{name}"] = (m @ w).cpu().numpy().astype(np.float16)
            self.arrays[f"{k}/qc"] = q[:, self.grid["cand_q"]].cpu().numpy().astype(np.float16)
        if self.grid is None:
            self.arrays[f"{k}/a"] = a.cpu().numpy().astype(np.float16)
        t = self.tasks_by_id[(repo, context_tokens, task_id)]
        self.rows.append(dict(unit=unit, id=task_id, kind=t.kind, path=t.path, start_line=t.start_line,
                              end_line=t.end_line, answer=answer.text,
                              citations=[c.to_dict() for c in answer.citations]))

    def save(self, out_dir: str, name: str) -> None:
        self.arrays["index"] = np.array(json.dumps(dict(units=self.units, rows=self.rows)))
        np.savez_compressed(os.path.join(out_dir, f"{name}.npz"), **self.arrays)


def head_criteria(col: Collector) -> dict[str, np.ndarray]:
    """Per (layer, head) row, for the question ("q") and answer ("a") mass, over every gold-holding block of
    every calibration answer: `hit` = share of blocks whose strongest segment is gold, `lift` = mean of
    (gold share of the head's block mass) / (gold share of the block's segments)."""
    out = {}
    for part in ("q", "a"):
        hits, lifts, n = 0.0, 0.0, 0
        for r in col.rows:
            k = f"{r['unit']}/{r['id']}"
            paths = col.units[r["unit"]]["paths"]
            m = col.arrays[f"{k}/{part}"].astype(np.float32)
            gold = (np.array(paths)[col.arrays[f"{k}/file"]] == r["path"]) if len(m) else np.zeros(0, bool)
            gold &= (col.arrays[f"{k}/line"] >= r["start_line"]) & (col.arrays[f"{k}/line"] <= r["end_line"])
            for b in np.unique(col.arrays[f"{k}/block"][gold]):
                inb = col.arrays[f"{k}/block"] == b
                mb, gb = m[inb], gold[inb]
                if gb.all():
                    continue
                tot = mb.sum(0)
                hits = hits + gb[mb.argmax(0)] * (tot > 0)
                lifts = lifts + np.where(tot > 0, mb[gb].sum(0) / np.maximum(tot, 1e-30), 0) / gb.mean()
                n += 1
        out[f"{part}_hit"], out[f"{part}_lift"] = hits / max(n, 1), lifts / max(n, 1)
        out[f"{part}_n"] = n
    return out


def make_grid(crit: dict, n_rows: int) -> dict:
    """Line weights per (part, criterion, top-N): the N best rows, weighted by their score, summing to 1."""
    weights = {}
    for part in ("q", "a"):
        for c in ("hit", "lift"):
            s = np.asarray(crit[f"{part}_{c}"], dtype=np.float64)
            order = np.argsort(-s, kind="stable")
            for n in TOPS:
                w = np.zeros(n_rows)
                w[order[:n]] = np.maximum(s[order[:n]], 1e-9)
                weights[f"{part}_{c}_{n}"] = (w / w.sum()).tolist()
    cand = {p: sorted({int(i) for c in ("hit", "lift") for i in np.argsort(-crit[f"{p}_{c}"])[:CANDIDATES]})
            for p in ("q", "a")}
    return dict(weights=weights, cand_q=cand["q"], cand_a=cand["a"],
                criteria={k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in crit.items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("repos", nargs="*")
    ap.add_argument("--cal", nargs="*", default=[], help="calibration repositories (writes OUT/grid.json)")
    ap.add_argument("--grid", help="grid.json of an earlier --cal run (evaluation mode)")
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--context-tokens", type=int, default=16384)
    ap.add_argument("--tasks", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attention", default="dense")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--device")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    session_mod.Session._recorder = _head_recorder
    cfg = AskConfig(no_cache=True, model=args.model, max_new_tokens=args.max_new_tokens, device=args.device)
    ui = common.Progress(False)
    rt = _load(cfg, ui)
    repos = args.cal or args.repos
    units = _units(repos, [args.context_tokens], rt, ui, args.tasks, args.seed, (), ())
    tasks_by_id = {(u.repo, u.context_tokens, t.id): t for u in units for t in u.ws.tasks}
    grid = None
    if args.grid:
        with open(args.grid) as f:
            grid = json.load(f)
    col = Collector(tasks_by_id, grid)
    specs = parse_specs(args.attention)
    t0 = time.time()
    names = [s.name for s in specs]

    def save(tasks, timings, complete=False):
        doc = rep.build(tasks, timings, names, dict(model=rt.name, complete=complete), args.seed)
        with open(os.path.join(args.out, "eval.json"), "w") as f:
            json.dump(doc, f)
        if not complete:
            col.save(args.out, "lines")

    def progress(u, c, i, n):
        if i % 20 == 0:
            print(f"{u.repo} {i}/{n} {time.time() - t0:.0f}s", flush=True)

    save(*runner.run(rt, units, cfg, specs, seed=args.seed, open_session=ui.prefill, keep=col.keep,
                     on_task=progress, on_unit=save), complete=True)
    if args.cal:
        n_rows = next(v.shape[1] for k, v in col.arrays.items() if k.endswith("/q") and v.size)
        grid = make_grid(head_criteria(col), n_rows)
        with open(os.path.join(args.out, "grid.json"), "w") as f:
            json.dump(grid, f)
        for k in [k for k in col.arrays if k.endswith("/a")]:
            del col.arrays[k]  # the calibration keeps the question's per-head mass only (size)
    col.save(args.out, "lines")
    print(f"done {len(col.rows)} answers in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
