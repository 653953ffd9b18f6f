"""Time of the portable MoBA op against dense causal SDPA on CPU (the attention of one layer).

Shape: Qwen2.5-Coder-1.5B's attention (12 query heads, 2 KV heads, head dim 128), B=1, random inputs,
the CPU defaults block 256, top-k 6, 1 sink block. Median of --reps timed calls after one warm-up.
Run: python -m bench.op_cpu [--tokens 8192,16384,32768] [--dtypes float32,bfloat16] [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from moba import portable_moba_attention

HQ, HKV, D = 12, 2, 128


def seconds(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def row(T: int, dtype: torch.dtype, reps: int) -> dict:
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(1, h, T, D, generator=g).to(dtype) for h in (HQ, HKV, HKV))
    dense = seconds(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), reps)
    moba = seconds(lambda: portable_moba_attention(q, k, v, block_size=256, top_k=6, sink_blocks=1), reps)
    return dict(tokens=T, dtype=str(dtype).removeprefix("torch."), dense_s=dense, moba_s=moba)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="8192,16384,32768")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| tokens | dtype | dense SDPA s | MoBA s | dense / MoBA |\n|---|---|---|---|---|")
    for dt in a.dtypes.split(","):
        for T in (int(t) for t in a.tokens.split(",")):
            r = row(T, getattr(torch, dt), a.reps)
            print(f"| {T:,} | {r['dtype']} | {r['dense_s']:.2f} | {r['moba_s']:.2f} | {r['dense_s'] / r['moba_s']:.2f}x |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
