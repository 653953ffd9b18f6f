"""An experiment: MoBA prefill at 1M on the GPU under launcher/kernel settings, interleaved rounds.

Settings: PARTIAL_BUDGET (bytes of partials per query chunk: fewer, larger chunks waste less on
partly filled tiles) and the Hopper kernel's ASYNC_Q. Prints the median ms and the peak extra
memory of each. Shapes as bench/attention.py. Run: python bench/experiments/chunk_ab.py [--N 1048576]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import moba.triton.hopper as hopper  # noqa: E402
import moba.triton.launcher as launcher  # noqa: E402
from bench.attention import moba_call, qkv, time_ms  # noqa: E402

SETTINGS = [(1 << 30, False), (1 << 30, True), (7 << 28, False), (7 << 28, True)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--N", type=int, default=1 << 20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    a = p.parse_args()
    q, k, v = qkv(a.N, a.N, seed=a.N)
    res = {s: dict(ms=[]) for s in SETTINGS}
    for s in SETTINGS:
        launcher.PARTIAL_BUDGET, hopper.ASYNC_Q = s
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = moba_call(q, k, v)
        res[s]["peak_extra_gb"] = (torch.cuda.max_memory_allocated() - base - out.numel() * 2) / 2**30
        del out
    for _ in range(a.rounds):
        for s in SETTINGS:
            launcher.PARTIAL_BUDGET, hopper.ASYNC_Q = s
            res[s]["ms"].append(time_ms(lambda: moba_call(q, k, v), 1, warmup=0))
    rows = []
    for (budget, aq), r in res.items():
        med = sorted(r["ms"])[len(r["ms"]) // 2]
        launcher.PARTIAL_BUDGET = budget
        chunk = launcher.chunk_queries(1, 28, a.N, 12, 128, 2)
        rows.append(dict(budget_gib=budget / 2**30, async_q=aq, chunk=chunk, median_ms=med, ms=r["ms"],
                         peak_extra_gb=r["peak_extra_gb"]))  # fmt: skip
        runs = " ".join(f"{m:.1f}" for m in r["ms"])
        print(f"budget {budget / 2**30:.2f} GiB ({chunk} queries a chunk) async_q {aq}: median {med:.1f} ms ({runs}), "
              f"peak extra {r['peak_extra_gb']:.2f} GB", flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "chunk_ab.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
