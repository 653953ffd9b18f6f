"""Re-score routing citations offline from an evaluation's saved evidence (`moba-ask eval --evidence`):
the same answers, the same per-block scores and key mass, other line-selection settings of
`agent.citations.cite_blocks` (blocks cited, lines a block, share of the strongest range kept), and whose
key mass picks a block's lines (--mass: every recorded token's, the question's alone as sessions do now, or the
answer's alone; by default what the run used). No model runs.

First a check: the settings the evaluation ran with (saved with the evidence) must give back the
citations it stored (the share of answers whose routing citations come out identical is printed;
float16 key mass may flip near-ties). Then one row per setting (DEFAULT: `cite_blocks`' defaults first; sessions
whose weights file has a lines section use its selection, saved with the evidence as the run's settings): file
hit@1, top-1 / top-3 citation on the gold lines, line
precision (all tasks and function/caller tasks only), line recall, with bootstrap 95% intervals.
With --select, settings are chosen on half of the repositories and reported on the other half and
vice versa (two folds), so the choice is not fitted to the tasks it is scored on.

Run:
  python -m bench.cite_rescore --eval run.json --evidence run.npz
  python -m bench.cite_rescore --eval run.json --evidence run.npz --grid "top_n=3,8 max_lines=2,4,24" --select
  python -m bench.cite_rescore --eval run.json --evidence run.npz --mass answer
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np

from agent import citations as cit
from agent.evaluate import evidence as evlog
from agent.evaluate.runner import citation_scores
from agent.evaluate.stats import bootstrap

DEFAULT = evlog.cite_settings()
GRID = "top_n=3,5,8 max_lines=1,2,4,8,24 keep_share=0,0.1,0.3"
FUNCTIONS = ("function", "caller")


def parse_grid(text: str) -> list[dict]:
    """"top_n=3,8 max_lines=4" -> every combination, unset keys at DEFAULT."""
    axes = {}
    for item in text.split():
        key, _, values = item.partition("=")
        if key not in DEFAULT:
            raise SystemExit(f"unknown grid key {key!r}; keys: {', '.join(DEFAULT)}")
        axes[key] = [type(DEFAULT[key])(float(v)) if isinstance(DEFAULT[key], int) else float(v)
                     for v in values.split(",")]
    keys = list(axes)
    return [{**DEFAULT, **dict(zip(keys, combo))} for combo in itertools.product(*(axes[k] for k in keys))]


MASSES = ("all", "question", "answer")


def line_mass(u, tid: str, which: str | None = None):
    """The key mass that narrows a block to its lines: every recorded token's ("all"), the question tokens'
    alone ("question", what sessions use since the ninth session) or the answer tokens' alone; None: what
    the run used (`u.line_mass`). The parts need files saved with the answer part."""
    which = which or u.line_mass
    if which == "all":
        return u.mass[tid]
    if tid not in u.answer_mass:
        raise SystemExit(f"--mass {which}: the evidence file has no answer mass (saved before 2026-12)")
    if which == "question":
        return cit.without_tail(u.mass[tid], u.answer_mass[tid])
    answer = np.zeros_like(u.mass[tid])
    answer[: len(u.answer_mass[tid])] = u.answer_mass[tid][: len(answer)]
    return answer


def rows_for(units, tasks: dict, setting: dict, mass: str | None = None) -> list[dict]:
    """One scored row per (unit, task) under `setting`: the citation scores plus kind and repo."""
    out = []
    for u in units:
        for tid, scores in u.scores.items():
            t = tasks[(u.repo, u.context_tokens, tid)]
            answer = t["results"][u.config]["answer"]
            routed = cit.cite_blocks(scores, line_mass(u, tid, mass), u.smap, block_size=u.block_size, **setting)
            cites = cit.combine(routed, cit.from_text(answer, u.smap))
            row = citation_scores(cites, t["path"], t["start_line"], t["end_line"], u.smap)
            out.append(dict(row, kind=t["kind"], repo=u.repo, size=u.context_tokens, config=u.config, id=tid,
                            citations=[c.to_dict() for c in cites]))
    return out


def check(units, tasks: dict) -> float:
    """Share of answers whose routing citations under the settings the run used equal the stored ones."""
    same = n = 0
    rows = [r for u in units for r in rows_for([u], tasks, u.cite)]
    for row in rows:
        stored = [c for c in tasks[(row["repo"], row["size"], row["id"])]["results"][row["config"]]["citations"]
                  if c["source"] != cit.TEXT]
        mine = [c for c in row["citations"] if c["source"] != cit.TEXT]
        key = [(c["path"], c["start_line"], c["end_line"]) for c in mine]
        same += key == [(c["path"], c["start_line"], c["end_line"]) for c in stored]
        n += 1
    return same / max(n, 1)


def summary(rows: list[dict], seed: int = 0) -> dict:
    fn = [r for r in rows if r["kind"] in FUNCTIONS]
    return dict(
        n=len(rows),
        hit1=bootstrap([r["rank"] == 1 for r in rows], seed),
        top1=bootstrap([r["top1_cite"] for r in rows], seed),
        top3=bootstrap([r["top3_cite"] for r in rows], seed),
        precision=bootstrap([r["line_precision"] for r in rows], seed),
        precision_fn=bootstrap([r["line_precision"] for r in fn], seed),
        recall=bootstrap([r["line_recall"] for r in rows], seed),
        bogus=sum(r["bogus"] for r in rows),
    )


def label(setting: dict) -> str:
    return " ".join(f"{k}={setting[k]:g}" for k in DEFAULT)


def line(name: str, s: dict) -> str:
    cells = [s[k].cell() for k in ("hit1", "top1", "top3", "precision", "precision_fn", "recall")]
    return f"| {name} | {s['n']} | " + " | ".join(cells) + f" | {s['bogus']} |"


HEADER = ("| setting | n | file hit@1 | top-1 cite | top-3 cite | line precision | precision (function, caller) | "
          "line recall | bogus |\n|---|---|---|---|---|---|---|---|---|")


def choose(rows_by_setting: dict, repos: set, floor_top1: float, floor_top3: float) -> str:
    """The setting with the best line precision on `repos` among those whose top-1 and top-3 citation
    rates there stay at or above the floors (DEFAULT's own rates when nothing qualifies)."""
    best, best_p = label(DEFAULT), -1.0
    for name, rows in rows_by_setting.items():
        mine = [r for r in rows if r["repo"] in repos]
        s = summary(mine)
        if s["top1"].value >= floor_top1 and s["top3"].value >= floor_top3 and s["precision"].value > best_p:
            best, best_p = name, s["precision"].value
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval", required=True, help="the evaluation's JSON document (-o)")
    p.add_argument("--evidence", required=True, help="its --evidence file")
    p.add_argument("--grid", default=GRID, help=f"settings to try (default: {GRID!r})")
    p.add_argument("--select", action="store_true", help="two-fold choice by repository (see the module doc)")
    p.add_argument("--mass", choices=MASSES, help="whose key mass narrows blocks to lines (default: as the run)")
    p.add_argument("--slack", type=float, default=0.02, help="top-1/top-3 drop allowed against DEFAULT when choosing")
    a = p.parse_args()
    doc = json.load(open(a.eval))
    tasks = {(t["repo"], t["context_tokens"], t["id"]): t for t in doc["tasks"]}
    settings = [DEFAULT] + [s for s in parse_grid(a.grid) if s != DEFAULT]
    settings += [s for s in (evlog.BEFORE_KEEP_SHARE,) if s not in settings]
    every = evlog.load(a.evidence)
    for size in sorted({u.context_tokens for u in every}):
        units = [u for u in every if u.context_tokens == size]
        print(f"\n{a.eval} at {size:,} context tokens: {sum(len(u.scores) for u in units)} answers in {len(units)} "
              f"units; stored citations reproduced under the run's settings: {check(units, tasks):.3f}")
        rows = {label(s): rows_for(units, tasks, s, a.mass) for s in settings}
        print(HEADER)
        for name, r in rows.items():
            print(line(name, summary(r)))
        if a.select:
            _two_fold(rows, sorted({u.repo for u in units}), a.slack)


def _two_fold(rows: dict, repos: list[str], slack: float) -> None:
    halves = [set(repos[0::2]), set(repos[1::2])]
    held = []
    for tune, test in (halves, halves[::-1]):
        base = summary([r for r in rows[label(DEFAULT)] if r["repo"] in tune])
        name = choose(rows, tune, base["top1"].value - slack, base["top3"].value - slack)
        print(f"chosen on {sorted(tune)}: {name}")
        held += [r for r in rows[name] if r["repo"] in test]
    print(HEADER)
    print(line("default, all repositories", summary(rows[label(DEFAULT)])))
    print(line("chosen on the other fold", summary(held)))


if __name__ == "__main__":
    main()
