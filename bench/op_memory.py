"""Peak extra CPU memory and time of the portable MoBA op at 64K tokens (issue 2's memory goal).

Extra memory = peak RSS during the call - RSS with the inputs allocated - the output's size.
Run: python -m bench.op_memory [--tokens 65536] [--top-k 4] [--block-size 1024]
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import torch

from moba import portable_moba_attention


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--top-k", type=int, default=4)
    a = p.parse_args()
    torch.manual_seed(0)
    T, Hq, Hkv, D = a.tokens, 8, 2, 64
    q = torch.randn(1, Hq, T, D)
    k = torch.randn(1, Hkv, T, D)
    v = torch.randn(1, Hkv, T, D)
    base = rss_mib()
    assert peak_mib() < base + 1, "run in a fresh process: the peak already exceeds the inputs"
    t0 = time.perf_counter()
    out = portable_moba_attention(q, k, v, block_size=a.block_size, top_k=a.top_k)
    dt = time.perf_counter() - t0
    extra = peak_mib() - base - out.numel() * out.element_size() / 2**20
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"T={T} Hq={Hq} Hkv={Hkv} D={D} block={a.block_size} top_k={a.top_k} fp32")
    print(f"inputs {(q.numel() + k.numel() + v.numel()) * 4 / 2**20:.0f} MiB, output {out.numel() * 4 / 2**20:.0f} MiB")
    print(f"time {dt:.1f} s, peak extra memory {extra:.0f} MiB")


if __name__ == "__main__":
    main()
