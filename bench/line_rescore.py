"""Re-score citations from `bench.line_heads` data: the same answers and block scores, each block narrowed to
its lines by another key mass (the run's, or the question's or answer's mass over a calibrated set of line
heads), under the line-selection settings of `agent.citations.cite_blocks`. No model runs.

First a check: the run's own line mass under the settings it ran with (`DEFAULT`) must give back the citations
the answers carried. Then one row per (mass, setting): file hit@1, top-1 / top-3 citation on the gold lines, line
precision, with bootstrap 95% intervals. With --select, the (mass, setting) is chosen on half of the
repositories (best line precision whose top-1 and top-3 stay within --slack of the run's there) and reported
on the other half, both ways.

    python -m bench.line_rescore lh/s16/lines.npz lh/more16/lines.npz --select
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import numpy as np

from agent import citations as cit
from agent.evaluate import stats
from agent.evaluate.runner import citation_scores
from bench.cite_rescore import HEADER, line, summary
from ingest.sourcemap import SourceMap

SMAP = ("starts", "file_idx", "line", "first_mark", "n_lines")
DEFAULT = cit.SELECTION
GRID = "top_n=2,3,5,8 max_lines=1,2,3,4,6,24 keep_share=0.3,0.5"


class Data:
    """One lines.npz: its units' source maps and every answer's segments and masses."""

    def __init__(self, path: str, grid: dict | None = None):
        self.z = np.load(path)
        self.grid = grid
        index = json.loads(str(self.z["index"]))
        self.units, self.rows = index["units"], index["rows"]
        self.smaps = {name: SourceMap(*(self.z[f"{name}/smap/{n}"] for n in SMAP[:3]), tuple(u["paths"]),
                                      *(self.z[f"{name}/smap/{n}"] for n in SMAP[3:]))
                      for name, u in self.units.items()}
        self.masses = sorted({k.rsplit("/", 1)[1] for k in self.z.files if "/g/" in k} or (grid or {}).get("weights", ()))

    def mass(self, row: dict, which: str) -> np.ndarray:
        k = f"{row['unit']}/{row['id']}"
        if which == "as_run":
            return self.z[f"{k}/as_run"]
        if f"{k}/g/{which}" in self.z:
            return self.z[f"{k}/g/{which}"].astype(np.float32)
        return self.z[f"{k}/q"].astype(np.float32) @ np.asarray(self.grid["weights"][which], np.float32)

    def tokens(self, row: dict, seg_mass: np.ndarray) -> np.ndarray:
        """A [Tk] key mass with each segment's mass on its first token (line sums inside a block are exact)."""
        k = f"{row['unit']}/{row['id']}"
        out = np.zeros(self.smaps[row["unit"]].total + 1, np.float32)
        np.add.at(out, self.z[f"{k}/tok"], seg_mass)
        return out


def scored(data: list[Data], which: str, setting: dict) -> list[dict]:
    out = []
    for d in data:
        for r in d.rows:
            smap, u = d.smaps[r["unit"]], d.units[r["unit"]]
            scores = d.z[f"{r['unit']}/{r['id']}/scores"].astype(np.float64)
            routed = cit.cite_blocks(scores, d.tokens(r, d.mass(r, which)), smap, block_size=u["block_size"],
                                     **setting)
            cites = cit.combine(routed, cit.from_text(r["answer"], smap))
            row = citation_scores(cites, r["path"], r["start_line"], r["end_line"], smap)
            out.append(dict(row, kind=r["kind"], repo=u["repo"], id=r["id"],
                            cites=[(c.path, c.start_line, c.end_line) for c in cites]))
    return out


def check(data: list[Data]) -> float:
    """Share of answers whose citations come back identical from the run's own line mass."""
    mine = scored(data, "as_run", DEFAULT)
    stored = [[(c["path"], c["start_line"], c["end_line"]) for c in r["citations"]] for d in data for r in d.rows]
    return sum(m["cites"] == s for m, s in zip(mine, stored)) / max(len(stored), 1)


def grid(text: str) -> list[dict]:
    axes = {k: [type(DEFAULT[k])(float(v)) for v in vals.split(",")]
            for k, _, vals in (x.partition("=") for x in text.split())}
    return [{**DEFAULT, **dict(zip(axes, combo))} for combo in itertools.product(*axes.values())]


def name(which: str, s: dict) -> str:
    return f"{which} " + " ".join(f"{k}={s[k]:g}" for k in DEFAULT)


def select(rows: dict, base: str, slack: float) -> None:
    repos = sorted({r["repo"] for r in rows[base]})
    halves = [set(repos[0::2]), set(repos[1::2])]
    held = []
    for tune, test in (halves, halves[::-1]):
        b = summary([r for r in rows[base] if r["repo"] in tune])
        best, best_p = base, -1.0
        for n, rs in rows.items():
            s = summary([r for r in rs if r["repo"] in tune])
            if s["top1"].value >= b["top1"].value - slack and s["top3"].value >= b["top3"].value - slack \
                    and s["precision"].value > best_p:
                best, best_p = n, s["precision"].value
        print(f"chosen on {sorted(tune)}: {best}")
        held += [r for r in rows[best] if r["repo"] in test]
    print(HEADER)
    print(line("as run, all repositories", summary(rows[base])))
    print(line("chosen on the other fold", summary(held)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--masses", help="comma-separated mass names (default: as_run and every stored one)")
    ap.add_argument("--grid", default=GRID)
    ap.add_argument("--weights", help="grid.json whose line weights apply to files with per-head mass (calibration)")
    ap.add_argument("--select", action="store_true")
    ap.add_argument("--paired", action="store_true", help="paired differences of the printed rows against as run")
    ap.add_argument("--slack", type=float, default=0.02)
    ap.add_argument("--top", type=int, default=25, help="rows printed, by line precision")
    a = ap.parse_args()
    grid_doc = json.load(open(a.weights)) if a.weights else None
    data = [Data(f, grid_doc) for f in a.files]
    print(f"{sum(len(d.rows) for d in data)} answers; citations reproduced from the run's line mass: {check(data):.3f}")
    masses = a.masses.split(",") if a.masses else ["as_run", *data[0].masses]
    rows = {}
    for which in masses:
        for s in [DEFAULT] + [s for s in grid(a.grid) if s != DEFAULT]:
            rows[name(which, s)] = scored(data, which, s)
    base = name("as_run", DEFAULT)
    sums = {n: summary(r) for n, r in rows.items()}
    print(HEADER)
    print(line(base, sums[base]))
    good = [n for n in rows if sums[n]["top1"].value >= 0.45 and sums[n]["top3"].value >= 0.65]
    for n in sorted(good, key=lambda n: -sums[n]["precision"].value)[: a.top]:
        print(line(n, sums[n]))
    if a.paired:
        bm25 = _bm25(a.files)
        for n in sorted(good, key=lambda n: -sums[n]["precision"].value)[: a.top]:
            if n != base:
                print(f"{n}, paired against as run: " + paired(rows[n], rows[base]))
            over = stats.paired([r["rank"] == 1 for r in rows[n]], [bm25[(r["repo"], r["id"])] for r in rows[n]], 0)
            print(f"{n}: file hit@1 - BM25 hit@1 {over.cell(signed=True)}")
    if a.select:
        select(rows, base, a.slack)


def _bm25(files: list[str]) -> dict:
    """(repo, task id) -> BM25's file hit@1, from the eval.json saved beside each lines file (`NAME-eval.json`
    for `NAME.npz`, or eval.json in its directory)."""
    out = {}
    for f in files:
        doc = f[: -len(".npz")] + "-eval.json"
        doc = doc if os.path.exists(doc) else os.path.join(os.path.dirname(f), "eval.json")
        for t in json.load(open(doc))["tasks"]:
            out[(t["repo"], t["id"])] = t["bm25_rank"] == 1
    return out


def paired(rows: list[dict], base: list[dict]) -> str:
    """Paired differences (bootstrap 95% intervals) of file hit@1, top-1, top-3 and line precision."""
    cells = []
    for label, key in (("hit@1", lambda r: r["rank"] == 1), ("top-1", lambda r: r["top1_cite"]),
                       ("top-3", lambda r: r["top3_cite"]), ("line P", lambda r: r["line_precision"])):
        est = stats.paired([key(r) for r in rows], [key(r) for r in base], seed=0)
        cells.append(f"{label} {est.cell(signed=True)}")
    return "; ".join(cells)


if __name__ == "__main__":
    main()
