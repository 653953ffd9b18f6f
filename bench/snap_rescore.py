"""Re-score saved routing evidence with each citation snapped to the function the model attended to
(issue #15, line precision): the routing choice stays (which blocks, which lines stand out), but a range
takes the extent of the innermost Python function or method (first decorator or def line to its last
line) holding the range's strongest line (its highest key-mass line). Ranges that snap to one function
merge (scores add), overlapping ranges merge, and the list is re-ranked. A peak outside every function
keeps its narrow range; so does a peak in a function longer than `cap` lines (or, with `head=K`, the
citation becomes the def line..peak line + K). Other settings: `strong=x` snaps only ranges scoring at
least x times the best; `inside=1` snaps only a range that lies wholly inside the function; `per_file=n`
keeps the n strongest citations of a file (also without snapping, as a control); `order=1` snaps the
top_n ranges before the keep_share drop instead of after; top_n and keep_share as in cite_blocks. The
choice (two folds by repository, as bench/cite_rescore.py --select) takes the best line precision among
settings keeping top-1 and top-3 at --floor on the tuning half. No model runs.

The function spans need the text of the packed copy the evaluation asked about: the chosen files of the
pinned repository with the needle docstrings deleted (`agent.evaluate.tasks._copy`). They are rebuilt
here from the repository under --repos and the function tasks of the evaluation (the needles), and a file
is trusted only when its line count equals the source map's `n_lines` and every function task's gold
lines are a function of the rebuilt text (a unit failing this is reported and skipped).

Run:
  python -m bench.snap_rescore --eval bench/results/qwen-16k30k-moba-evidence.json \
      --evidence bench/results/qwen-16k30k-moba-evidence.npz
  python -m bench.snap_rescore --eval X.json --evidence X.npz --grid "cap=0,40,100 head=0,5 top_n=5,8"
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from agent import citations as cit
from agent.evaluate import evidence as evlog
from agent.evaluate.runner import citation_scores
from agent.evaluate.stats import paired
from bench.cite_rescore import DEFAULT, line_mass, summary
from ingest.render import line_count

SNAP = dict(snap=0, cap=0, head=0, strong=0.0, top_n=DEFAULT["top_n"], keep_share=DEFAULT["keep_share"],
            order=0, per_file=0, inside=0)
GRID = "snap=0,1 cap=0,60 head=0,5 strong=0,1 top_n=3,8 keep_share=0.3,0.6 order=0,1 per_file=0,1 inside=0,1"
METRICS = ("hit1", "top1", "top3", "precision", "recall")


def copy_texts(repo_root: str, paths: tuple[str, ...], needles: list[dict]) -> dict[str, str]:
    """path -> text of the evaluation's packed copy: the files with the needle docstrings deleted."""
    cut: dict[str, list[str]] = {}
    for t in needles:
        cut.setdefault(t["path"], []).append(t["name"])
    out = {}
    for p in paths:
        text = Path(repo_root, p).read_text("utf-8", errors="replace").replace("\r\n", "\n")
        if p in cut:
            lines = text.split("\n")
            for first, last in sorted(_doc_lines(text, cut[p]), reverse=True):
                del lines[first - 1: last]
            text = "\n".join(lines)
        out[p] = text
    return out


def _doc_lines(text: str, names: list[str]) -> list[tuple[int, int]]:
    tree = ast.parse(text)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in names:
            doc = node.body[0]
            out.append((doc.lineno, doc.end_lineno))
    return out


def function_spans(text: str) -> list[tuple[int, int]]:
    """(first line, last line) of every function and method, from its first decorator; [] when unparseable."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    return sorted((min([n.lineno] + [d.lineno for d in n.decorator_list]), n.end_lineno)
                  for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))


def innermost(spans: list[tuple[int, int]], line: int) -> tuple[int, int] | None:
    """The shortest span holding `line` (nested spans are shorter than the ones holding them)."""
    inside = [s for s in spans if s[0] <= line <= s[1]]
    return min(inside, key=lambda s: s[1] - s[0]) if inside else None


def peak_line(c: cit.Citation, smap, mass: np.ndarray) -> int:
    """The line of `c` whose tokens carry the most key mass (the first line when none has any)."""
    best, best_m = c.start_line, -1.0
    for ln in range(c.start_line, c.end_line + 1):
        if not smap.has(c.path, ln):
            continue
        a, b = smap.line_tokens(c.path, ln)
        m = float(mass[a:min(b, len(mass))].sum())
        if m > best_m:
            best, best_m = ln, m
    return best


def snap(cites: list[cit.Citation], spans: dict[str, list], smap, mass: np.ndarray,
         s: dict) -> list[cit.Citation]:
    """`cites` snapped to their peak's innermost function under setting `s` (snap=0: left as they are),
    overlapping ranges merged (scores add), re-ranked, at most `per_file` a file (0: any number)."""
    if not cites:
        return cites
    top = max(c.score for c in cites)
    strong = [s["snap"] and c.score >= s["strong"] * top for c in cites]
    out = [_snapped(c, spans.get(c.path, []), smap, mass, s) if ok else c for c, ok in zip(cites, strong)]
    ranked = sorted(cit.merge(out, gap=0), key=lambda c: -c.score)
    return _per_file(ranked, s["per_file"]) if s["per_file"] else ranked


def _snapped(c: cit.Citation, spans: list, smap, mass: np.ndarray, s: dict) -> cit.Citation:
    """One range given its peak line's innermost function (cap, head, inside: see the module doc)."""
    peak = peak_line(c, smap, mass)
    span = innermost(spans, peak)
    if span is not None and s["cap"] and span[1] - span[0] + 1 > s["cap"]:
        span = (span[0], min(span[1], peak + s["head"])) if s["head"] else None
    if span is not None and s["inside"] and not span[0] <= c.start_line <= c.end_line <= span[1]:
        span = None
    return replace(c, start_line=span[0], end_line=span[1]) if span else c


def _per_file(cites: list[cit.Citation], n: int) -> list[cit.Citation]:
    """The `n` strongest citations of each file, in rank order."""
    seen: dict[str, int] = {}
    out = []
    for c in cites:
        seen[c.path] = seen.get(c.path, 0) + 1
        if seen[c.path] <= n:
            out.append(c)
    return out


def cited(u, tid: str, mass: np.ndarray, spans: dict, s: dict) -> list[cit.Citation]:
    """Routing citations of one answer under snap setting `s` (order 0: snap the kept ranges; order 1:
    snap the top_n ranges before the keep_share drop)."""
    base = dict(DEFAULT, top_n=s["top_n"], keep_share=s["keep_share"] if s["order"] == 0 else 0.0)
    ranked = cit.cite_blocks(u.scores[tid], mass, u.smap, block_size=u.block_size, **base)
    routed = snap(ranked, spans, u.smap, mass, s)
    if s["order"] == 1 and routed:
        routed = [c for c in routed if c.score >= s["keep_share"] * routed[0].score]
    return routed


def rows_for(units, tasks: dict, spans: dict, s: dict) -> list[dict]:
    out = []
    for u in units:
        for tid in u.scores:
            t = tasks[(u.repo, u.context_tokens, tid)]
            mass = line_mass(u, tid)
            routed = cited(u, tid, mass, spans[(u.repo, u.context_tokens)], s)
            cites = cit.combine(routed, cit.from_text(t["results"][u.config]["answer"], u.smap))
            row = citation_scores(cites, t["path"], t["start_line"], t["end_line"], u.smap)
            out.append(dict(row, kind=t["kind"], repo=u.repo, id=tid))
    return out


def unit_spans(u, doc: dict, repos_dir: str) -> dict | None:
    """path -> function spans of the unit's packed copy, or None (printed why) when the copy does not
    check: a file's line count differs from the source map's, or a function/caller gold is no function."""
    meta = next(r for r in doc["meta"]["repos"]
                if r["repo"] == u.repo and r["context_tokens"] == u.context_tokens)
    root = _find_root(meta["path"], repos_dir)
    mine = [t for t in doc["tasks"] if t["repo"] == u.repo and t["context_tokens"] == u.context_tokens]
    texts = copy_texts(root, u.smap.paths, [t for t in mine if t["kind"] == "function"])
    bad = [p for i, p in enumerate(u.smap.paths) if line_count(texts[p]) != int(u.smap.n_lines[i])]
    spans = {p: function_spans(x) for p, x in texts.items() if p.endswith(".py")}
    wrong = [t["id"] for t in mine if t["kind"] in ("function", "caller")
             and not any(e == t["end_line"] and a <= t["start_line"] for a, e in spans.get(t["path"], []))]
    if bad or wrong:
        print(f"{u.repo} {u.context_tokens}: copy does not check (line counts {bad[:3]}, gold {wrong[:3]}); "
              "skipped")
        return None
    return spans


def _find_root(path: str, repos_dir: str) -> str:
    """The evaluation's package path (e.g. /tmp/r/flask-3.0.3/src/flask) under `repos_dir`."""
    parts = Path(path).parts
    for i in range(1, len(parts)):
        candidate = Path(repos_dir, *parts[i:])
        if candidate.is_dir():
            return str(candidate)
    raise SystemExit(f"{path}: not found under {repos_dir}; fetch it (python -m bench.eval_repos fetch)")


def parse_grid(text: str) -> list[dict]:
    axes = {}
    for item in text.split():
        key, _, values = item.partition("=")
        if key not in SNAP:
            raise SystemExit(f"unknown grid key {key!r}; keys: {', '.join(SNAP)}")
        try:
            axes[key] = [type(SNAP[key])(float(v)) for v in values.split(",")]
        except ValueError:
            raise SystemExit(f"grid {item!r}: values must be numbers, e.g. {key}=0,1") from None
    out = [{**SNAP, **dict(zip(axes, combo))} for combo in itertools.product(*axes.values())]
    return [s for s in out if not (s["head"] and not s["cap"]) and (s["snap"] or s == _neutral(s))]


def _neutral(s: dict) -> dict:
    """`s` with every snapping option at SNAP's value (the settings that matter without snapping)."""
    return {**s, **{k: SNAP[k] for k in ("cap", "head", "strong", "order", "inside")}}


def label(s: dict) -> str:
    if s == SNAP:
        return f"default (top_n={s['top_n']} keep_share={s['keep_share']:g})"
    if not s["snap"]:
        return f"no snap: top_n={s['top_n']} keep_share={s['keep_share']:g} per_file={s['per_file']}"
    return " ".join(f"{k}={s[k]:g}" for k in SNAP if k != "snap")


def table_row(name: str, rows: list[dict], base: list[dict]) -> str:
    s = summary(rows)
    cells = [s[k].cell() for k in METRICS]
    diffs = [paired([r[m] for r in rows], [r[m] for r in base], 0).cell(signed=True)
             for m in ("top1_cite", "top3_cite", "line_precision")]
    return f"| {name} | {s['n']} | " + " | ".join(cells + diffs) + f" | {s['bogus']} |"


HEADER = ("| setting | n | file hit@1 | top-1 | top-3 | line precision | line recall | top-1 vs default | "
          "top-3 vs default | precision vs default | bogus |\n|---|---|---|---|---|---|---|---|---|---|---|")


def choose(rows_by: dict, repos: set, floor1: float, floor3: float) -> str:
    """Best line precision on `repos` among settings keeping top-1 and top-3 at the floors."""
    best, best_p = None, -1.0
    for name, rows in rows_by.items():
        s = summary([r for r in rows if r["repo"] in repos])
        if s["top1"].value >= floor1 and s["top3"].value >= floor3 and s["precision"].value > best_p:
            best, best_p = name, s["precision"].value
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval", required=True)
    p.add_argument("--evidence", required=True)
    p.add_argument("--repos", default="/work/evalrepos", help="the pinned repositories (bench.eval_repos)")
    p.add_argument("--grid", default=GRID)
    p.add_argument("--floor", nargs=2, type=float, default=(0.45, 0.65),
                   help="top-1 and top-3 rates the choice must keep")
    p.add_argument("--config", default="moba", help="the evaluation config whose answers are re-scored")
    a = p.parse_args()
    for path in (a.eval, a.evidence):
        if not Path(path).is_file():
            raise SystemExit(f"{path}: no such file; pass an evaluation's -o JSON and its --evidence file")
    doc = json.load(open(a.eval))
    tasks = {(t["repo"], t["context_tokens"], t["id"]): t for t in doc["tasks"]}
    every = evlog.load(a.evidence)
    settings = [SNAP] + parse_grid(a.grid)
    for size in sorted({u.context_tokens for u in every}):
        units = [u for u in every if u.context_tokens == size and u.config == a.config]
        spans = {(u.repo, size): unit_spans(u, doc, a.repos) for u in units}
        units = [u for u in units if spans[(u.repo, size)] is not None]
        if not units:
            continue
        rows = {label(s): rows_for(units, tasks, spans, s) for s in settings}
        base = rows[label(SNAP)]
        print(f"\n{a.eval} at {size:,} tokens, config {a.config}: {len(base)} answers, "
              f"{len(units)} repositories")
        print(HEADER)
        controls = [(k, r) for k, r in rows.items() if k.startswith("no snap")]
        for name, r in [(label(SNAP), base)] + controls + _best(rows, a.floor):
            print(table_row(name, r, base))
        _two_fold(rows, base, sorted({u.repo for u in units}), a.floor)


def _best(rows: dict, floor: tuple[float, float], n: int = 6) -> list[tuple[str, list[dict]]]:
    """The n settings of best line precision that keep top-1 and top-3 at the floors, then the n best
    that do not."""
    stats = {name: summary(r) for name, r in rows.items() if name.startswith("cap=")}
    ok = {k for k, s in stats.items() if s["top1"].value >= floor[0] and s["top3"].value >= floor[1]}
    by_p = sorted(stats, key=lambda k: -stats[k]["precision"].value)
    return [(k, rows[k]) for k in [k for k in by_p if k in ok][:n] + [k for k in by_p if k not in ok][:n]]


def _two_fold(rows: dict, base: list[dict], repos: list[str], floor: tuple[float, float]) -> None:
    halves = [set(repos[0::2]), set(repos[1::2])]
    held = []
    for tune, test in (halves, halves[::-1]):
        name = choose(rows, tune, *floor) or label(SNAP)
        print(f"chosen on {sorted(tune)}: {name}")
        held += [r for r in rows[name] if r["repo"] in test]
    key = {(r["repo"], r["id"]): r for r in held}
    print(HEADER)
    print(table_row("default", base, base))
    print(table_row("chosen on the other fold (held out)", [key[(r["repo"], r["id"])] for r in base], base))


if __name__ == "__main__":
    main()
