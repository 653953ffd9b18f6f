"""Which attention heads narrow a citation to the gold lines: per-head line evidence, collected on a GPU.

A citation's block comes from the calibrated block heads (agent/heads); its lines come from the question
tokens' key mass (`agent.citations.line_mass`). This script runs the evaluation's tasks (the same workspaces
and config as `moba-ask eval`) with sessions whose recorders keep every (layer, head)'s question mass
(`head_keys`), and stores for each answer, over every line of its KEEP best-scoring blocks (one "segment" per
line and block, `agent.evaluate.linecal.case_from`), that per-head mass (calibration) or its sum under each
line weighting of a grid (evaluation). `bench.line_rescore` re-scores citations from the stored data with the
library's own `cite_blocks`; `--ship` chooses the line heads and selection on a calibration run
(`linecal.choose`, as `moba-ask calibrate` does) and writes them into a weights file.

    python -m bench.line_heads --cal $CAL --context-tokens 16384 --tasks 120 --out lh/cal   # + lh/cal/grid.json
    python -m bench.line_heads --grid lh/cal/grid.json --context-tokens 16384 --tasks 300 --out lh/s16 $S7
    python -m bench.line_heads --ship lh/cal/lines.npz --heads agent/heads/qwen2.5-coder-1.5b.json

The runs in bench/RESULTS.md (fourteenth session) were made by commit d5b263e's version, which also kept the
answer tokens' per-head mass and a "lift" head criterion (both lost to the question's mass and `hit`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from agent import citations as cit
from agent import headweights
from agent.config import AskConfig
from agent.evaluate import linecal, runner
from agent.evaluate import report as rep
from agent.evaluate.configs import parse_specs
from agent.evaluate.tasks import build_workspace
from agent.runtime import load_runtime
from bench.line_rescore import SMAP, Data


def _with_head_keys(prefill):
    def open_session(session):
        session.head_keys = True
        prefill(session)
    return open_session


class Collector:
    """`runner.run`'s keep callback: per answer, the lines of its KEEP best blocks (`linecal.case_from`) with
    their per-head question mass (calibration) or their mass under each grid weighting (evaluation)."""

    def __init__(self, tasks_by_id: dict, grid: dict | None):
        self.tasks_by_id = tasks_by_id
        self.grid = grid
        self.rows: list[dict] = []
        self.arrays: dict[str, np.ndarray] = {}
        self.units: dict[str, dict] = {}

    def keep(self, repo, context_tokens, config, task_id, session, answer) -> None:
        rec, smap, p, hw = answer.recorder, session.smap, session.params, session.head_weights
        unit = f"{repo}@{context_tokens}"
        if unit not in self.units:
            self.units[unit] = dict(repo=repo, context_tokens=context_tokens, block_size=p.block_size,
                                    sink_blocks=p.sink_blocks, paths=list(smap.paths))
            for name in SMAP:
                self.arrays[f"{unit}/smap/{name}"] = getattr(smap, name)
        scores = cit.evidence_scores(rec, smap, block_size=p.block_size, sink_blocks=p.sink_blocks,
                                     weights=hw and hw.matrix(), signal=hw.signal if hw else cit.MASS)
        t = self.tasks_by_id[(repo, context_tokens, task_id)]
        best = [int(b) for b in np.argsort(-scores, kind="stable")[: linecal.KEEP] if scores[b] > 0]
        case = linecal.case_from(rec, smap, blocks=best, block_size=p.block_size, n_layers=session.runtime.num_layers,
                                 answer=answer.text, path=t.path, start_line=t.start_line, end_line=t.end_line,
                                 scores=scores)
        q = case.mass.astype(np.float32)
        run_w = hw.line_matrix() if hw else torch.ones(session.runtime.num_layers, q.shape[1] // session.runtime.num_layers)
        k = f"{unit}/{task_id}"
        self.arrays.update({f"{k}/scores": scores.astype(np.float32), f"{k}/block": case.block, f"{k}/file": case.file,
                            f"{k}/line": case.line, f"{k}/tok": case.tok,
                            f"{k}/as_run": q @ run_w.flatten().numpy().astype(np.float32)})
        if self.grid is None:
            self.arrays[f"{k}/q"] = case.mass
        else:
            for name, w in self.grid["weights"].items():
                self.arrays[f"{k}/g/{name}"] = (q @ np.asarray(w, np.float32)).astype(np.float16)
        self.rows.append(dict(unit=unit, id=task_id, kind=t.kind, path=t.path, start_line=t.start_line,
                              end_line=t.end_line, answer=answer.text,
                              citations=[c.to_dict() for c in answer.citations]))

    def save(self, out_dir: str, name: str) -> None:
        self.arrays["index"] = np.array(json.dumps(dict(units=self.units, rows=self.rows)))
        np.savez_compressed(os.path.join(out_dir, f"{name}.npz"), **self.arrays)


def cases(d: Data) -> list[linecal.LineCase]:
    """The LineCases of a calibration run's lines.npz (per-head question mass stored)."""
    out = []
    for r in d.rows:
        k, z = f"{r['unit']}/{r['id']}", d.z
        out.append(linecal.LineCase(z[f"{k}/scores"].astype(np.float64), z[f"{k}/block"], z[f"{k}/file"],
                                    z[f"{k}/line"], z[f"{k}/tok"], z[f"{k}/q"], d.smaps[r["unit"]],
                                    d.units[r["unit"]]["block_size"], r["answer"], r["path"], r["start_line"],
                                    r["end_line"]))
    return out


def make_grid(calibration: list[linecal.LineCase]) -> dict:
    """Line weights to store each evaluation answer's mass under: the top-N heads by `linecal.head_hits`."""
    hits = linecal.head_hits(calibration)
    return dict(weights={f"q_hit_{n}": linecal.top_weights(hits, n).tolist() for n in linecal.TOPS},
                criteria=dict(q_hit=hits.tolist()))


def ship(npz: str, heads: str) -> None:
    """Choose line weights and selection on a calibration run (`linecal.choose`, block scores as stored) and
    write them as the "lines" section of the weights file `heads`."""
    hw = headweights.read(Path(heads))
    d = Data(npz)
    found, block_w = cases(d), hw.matrix().flatten().double().numpy()
    w, sel, metrics = linecal.choose(found, block_w)
    meta = dict(metrics, cross_fold=linecal.cross_check(found, block_w), source=os.path.basename(npz),
                context_tokens=sorted({u["context_tokens"] for u in d.units.values()}),
                attention="as the calibration run's (bench.line_heads: --attention, dense by default)")
    lines = linecal.line_weights(w, sel, meta, hw.heads)
    Path(heads).write_text(json.dumps(replace(hw, lines=lines).to_json(), indent=1) + "\n")
    print(f"{heads}: lines {lines and lines.selection()}, {metrics}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("repos", nargs="*")
    ap.add_argument("--cal", nargs="*", default=[], help="calibration repositories (writes OUT/grid.json)")
    ap.add_argument("--grid", help="grid.json of an earlier --cal run (evaluation mode)")
    ap.add_argument("--ship", metavar="LINES.npz", help="a --cal run's lines.npz: write its line weights to --heads")
    ap.add_argument("--heads", help="the weights file --ship completes")
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--context-tokens", type=int, default=16384)
    ap.add_argument("--tasks", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attention", default="dense")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--rope-yarn", type=float, default=1.0, help="YaRN factor (as moba-ask eval --rope-yarn)")
    ap.add_argument("--device")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.ship:
        return ship(args.ship, args.heads)
    os.makedirs(args.out, exist_ok=True)
    cfg = AskConfig(no_cache=True, model=args.model, max_new_tokens=args.max_new_tokens, device=args.device,
                    rope_yarn=args.rope_yarn)
    rt = load_runtime(cfg)
    repos = args.cal or args.repos

    def make(path, label, size, n_tasks):
        return build_workspace(path, rt.tokenizer, context_tokens=size, n_tasks=n_tasks, seed=args.seed,
                               include=("*.py",))

    units, _ = runner.units_at(args.context_tokens, repos, runner.labels(repos), args.tasks, make)
    grid = json.loads(Path(args.grid).read_text()) if args.grid else None
    col = Collector({(u.repo, u.context_tokens, t.id): t for u in units for t in u.ws.tasks}, grid)
    specs = parse_specs(args.attention)
    t0 = time.time()

    def save(tasks, timings, complete=False):
        doc = rep.build(tasks, timings, [s.name for s in specs], dict(model=rt.name, complete=complete), args.seed)
        Path(args.out, "eval.json").write_text(json.dumps(doc))
        col.save(args.out, "lines")

    def progress(u, c, i, n):
        if i % 20 == 0:
            print(f"{u.repo} {i}/{n} {time.time() - t0:.0f}s", flush=True)

    save(*runner.run(rt, units, cfg, specs, seed=args.seed, open_session=_with_head_keys(lambda session: session.open()), keep=col.keep,
                     on_task=progress, on_unit=save), complete=True)
    if args.cal:
        Path(args.out, "grid.json").write_text(json.dumps(make_grid(cases(Data(os.path.join(args.out, "lines.npz"))))))
    print(f"done {len(col.rows)} answers in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
