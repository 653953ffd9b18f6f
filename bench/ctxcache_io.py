"""Save and load time of one context cache entry (agent.ctxcache) for a given model shape.

Builds random bf16 K/V views shaped like MobaLayer buffers [1, Hkv, capacity, D] (filled part only),
saves them, then loads them back `--repeat` times onto `--device`. The file is read back from the
page cache (warm), as on a second question right after the first. Also times the checksum alone.
Run: python -m bench.ctxcache_io [--tokens 32768] [--layers 28] [--kv-heads 2] [--head-dim 128]
                                 [--device cpu] [--dir /tmp/ctxbench]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import time
from pathlib import Path

import torch

from agent import ctxcache
from agent.ctxcache import ContextCache, format_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", type=Path, default=Path("/tmp/ctxbench"))
    a = p.parse_args()
    shutil.rmtree(a.dir, ignore_errors=True)
    store = ContextCache(a.dir, max_bytes=1 << 40)
    cap = a.tokens + 1024
    shape = (1, a.kv_heads, cap, a.head_dim)
    tensors = {}
    for i in range(a.layers):
        for kind in ("keys", "values"):
            buf = torch.randn(shape, device=a.device).to(torch.bfloat16)
            tensors[f"layers.{i}.{kind}"] = buf[:, :, : a.tokens]
    key = ContextCache.make_key("bench", {"layers": a.layers}, str(a.tokens))
    _sync(a.device)
    t0 = time.perf_counter()
    path = store.save(key, tensors, {"model": "bench", "tokens": a.tokens})
    save_s = time.perf_counter() - t0
    size = (path / ctxcache.KV_FILE).stat().st_size
    t0 = time.perf_counter()
    ctxcache.chunk_sha256(path / ctxcache.KV_FILE)
    hash_s = time.perf_counter() - t0
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    raw = load_file(str(path / ctxcache.KV_FILE), device=a.device)
    _sync(a.device)
    raw_s = time.perf_counter() - t0
    del raw
    loads = []
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        loaded, _ = store.load(key, device=a.device)
        _sync(a.device)
        loads.append(time.perf_counter() - t0)
        assert torch.equal(loaded["layers.0.keys"], tensors["layers.0.keys"])
        del loaded
    gib = size / (1 << 30)
    cpu = platform.processor() or platform.machine()
    print(f"machine: {platform.node()} {cpu}, torch {torch.__version__}, "
          f"device {a.device}")
    print(f"entry: {a.tokens} tokens x {a.layers} layers x {a.kv_heads} kv heads x {a.head_dim} dim bf16 = "
          f"{format_bytes(size)}")
    print(f"save (incl. copy to CPU, fsync, sha256): {save_s:.2f} s ({gib / save_s:.2f} GiB/s)")
    print(f"sha256 of 64 MiB pieces alone (warm): {hash_s:.2f} s ({gib / hash_s:.2f} GiB/s)")
    print(f"safetensors load_file alone (warm, no checks): {raw_s:.2f} s ({gib / raw_s:.2f} GiB/s)")
    print(f"load + verify (warm), best of {a.repeat}: {min(loads):.2f} s ({gib / min(loads):.2f} GiB/s); "
          f"all: {', '.join(f'{s:.2f}' for s in loads)}")
    shutil.rmtree(a.dir, ignore_errors=True)


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
