"""Time the MoBA Triton stages' settings at 1M tokens on one GPU, with cross-checks.

Shapes as bench/attention.py (B=1, 28 query heads, 4 KV heads, D=128, bf16, block 4096, top-k 12).
Stages: routing over all query chunks for several program tiles (each against torch's fp32 gate
on two chunks), the CSR build of the last chunk (torch.sort against the counting sort, and the
counting sort's tiles), and the tile kernel on the last chunk: the Triton kernel against the
Gluon one (outputs against the first).

Run: python -m bench.kern_variants [--N 1048576] [--stages route,sort,tile]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

import moba.triton.csr as csr_mod
import moba.triton.launcher as launcher
from bench.attention import time_ms
from moba.routing import select_blocks
from moba.triton.attention import attend_tiles
from moba.triton.csr import build_tiles
from moba.triton.decode import partials
from moba.triton.routing import pool_means, route_chunk, split_means

HQ, HKV, D, BS, TOPK = 28, 4, 128, 4096, 12
ROUTE_TILES = [(64, 128, 4), (128, 128, 8), (64, 256, 4), (64, 64, 4), (32, 64, 4)]
TILE_CFGS = [dict(BM=128, BN=128, warps=8, stages=3), dict(BM=128, hopper=True)]


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def cuda_ms(fn, reps: int) -> float:
    """Median CUDA-event ms of fn (bench/attention.py's time_ms); one wall-clock call without CUDA."""
    if torch.cuda.is_available():
        return time_ms(fn, reps)
    fn()  # a smoke run under TRITON_INTERPRET=1
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def graph_ms(fn, reps: int = 20) -> float | None:
    """GPU time of fn per call, replayed from a CUDA graph (no Python launch overhead); None on CPU."""
    if not torch.cuda.is_available():
        return None
    fn()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        g.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / reps


def same_rows(blk, q, means, c0, C) -> float:
    """Fraction of routing rows identical to torch's fp32 gate + topk (moba.routing.select_blocks)."""
    sel, _ = select_blocks(q[:, :, c0 : c0 + C], means, c0, block_size=BS, top_k=TOPK, sink_blocks=0)
    return (blk[..., 1:].long() == sel).all(-1).float().mean().item()


def same_csr(got: dict, ref: dict) -> bool:
    """Whether two `build_tiles` CSRs of one table agree: counts, offsets, tiles and entry order."""
    n = int(ref["key_cnt"].sum())
    keys = ("key_cnt", "key_off", "tile_end", "tile_key")
    return all(torch.equal(got[k].long(), ref[k].long()) for k in keys) and torch.equal(got["perm"][:n], ref["perm"][:n])


def routing(q, means, step) -> list[dict]:
    N = q.shape[2]
    parts = split_means(means)
    chunks = [(c0, min(step, N - c0)) for c0 in range(0, N, step)]
    checks = [chunks[len(chunks) // 2], chunks[-1]]
    variants = [(f"split gate {t}", route_chunk, dict(tile=t, parts=parts)) for t in ROUTE_TILES]
    variants += [("fp32 FMA gate (32,64,4)", route_chunk, dict(tile=(32, 64, 4), parts=None, fma=True))]
    res = []
    for name, fn, kw in variants:
        kw = dict(kw)
        if kw.pop("fma", False):
            qq = q.half()  # fp16 queries take the FMA gate; the same values (randn bf16 fits fp16)
        else:
            qq = q
        try:
            ms = cuda_ms(lambda fn=fn, qq=qq, kw=kw: [fn(qq, means, c0, C, c0, block_size=BS, top_k=TOPK, sink_blocks=0, **kw)
                                                      for c0, C in chunks], 2)  # fmt: skip
            agree = [same_rows(fn(qq, means, c0, C, c0, block_size=BS, top_k=TOPK, sink_blocks=0, **kw)[0], q, means, c0, C)
                     for c0, C in checks]  # fmt: skip
        except Exception as e:  # a variant the compiler rejects is reported, not fatal
            log(f"route {name} failed: {str(e).splitlines()[0][:300]}")
            continue
        res.append(dict(variant=name, ms=ms, same_rows=agree))
        log(f"route {name}: {ms:.1f} ms over {len(chunks)} chunks, rows identical to torch {agree}")
    return res


def csr(blk, nb, n_chunks) -> list[dict]:
    build = lambda m: build_tiles(blk, HKV, nb, 128, method=m)  # noqa: E731
    ref = build("sort")
    res = []
    for m in ("sort", "count"):
        bad = not same_csr(build(m), ref)
        ms = cuda_ms(lambda m=m: build(m), 5)
        gms = graph_ms(lambda m=m: build(m)) if m != "sort" else None  # bincount syncs
        res.append(dict(method=m, ms_per_chunk=ms, graph_ms_per_chunk=gms, ms_est_total=ms * n_chunks, mismatches=bad))
        log(f"csr {m}: {ms:.3f} ms per chunk (x{n_chunks} = {ms * n_chunks:.1f} ms), GPU only (CUDA graph) {gms} ms, "
            f"differs from torch.sort: {bad}")  # fmt: skip
    return res + count_tiles(blk, nb, ref, build)


def count_tiles(blk, nb, ref, build) -> list[dict]:
    """GPU time of the counting sort alone and of the whole CSR for several (tb, ts) tiles."""
    res, default = [], csr_mod.COUNT_TILE
    for tb, ts in [(128, 8), (128, 4), (256, 4), (512, 4), (256, 2), (512, 2), (1024, 4), (1024, 2)]:
        csr_mod.COUNT_TILE = (tb, ts)
        try:
            bad = not same_csr(build("count"), ref)
            sort_ms = graph_ms(lambda tb=tb, ts=ts: csr_mod.counting_sort(blk, HKV, nb, tb, ts))
            all_ms = graph_ms(lambda: build("count"))
        except Exception as e:
            log(f"count tile {(tb, ts)} failed: {str(e).splitlines()[0][:200]}")
            continue
        res.append(dict(method=f"count tb={tb} ts={ts}", graph_ms_sort=sort_ms, graph_ms_per_chunk=all_ms, mismatches=bad))
        log(f"count tb={tb} ts={ts}: counting sort {sort_ms:.3f} ms, whole CSR {all_ms:.3f} ms (GPU), differs {bad}")
    csr_mod.COUNT_TILE = default
    return res


def triton_cdiv(a, b):
    return -(-a // b)


def _runner(q, k, v, blk, t, op, lsep, c0, cfg):
    """The tile kernel of cfg on one chunk: the Gluon kernel (hopper) or the Triton kernel."""
    if cfg.get("hopper"):
        from moba.triton.hopper import attend_tiles_hopper

        return lambda: attend_tiles_hopper(q, k, v, blk, t, op, lsep, q_off=c0, pos0=c0, block_size=BS, scale=D**-0.5)
    return lambda: attend_tiles(q, k, v, blk, t, op, lsep, q_off=c0, pos0=c0, block_size=BS, scale=D**-0.5,
                                nsplit=1, cfg=cfg)  # fmt: skip


def tiles(q, k, v, blk, c0, n_chunks, rounds) -> list[dict]:
    """Each configuration checked against the first, then timed in `rounds` interleaved rounds (median)."""
    nb = triton_cdiv(k.shape[2], BS)
    runs, res, ref = [], [], None
    live = blk.reshape(-1) >= 0
    for cfg in TILE_CFGS:
        t = build_tiles(blk, HKV, nb, cfg["BM"])
        op, lsep = partials(blk, 1, D, q.dtype)
        op.fill_(float("nan"))
        lsep.fill_(float("nan"))
        run = _runner(q, k, v, blk, t, op, lsep, c0, cfg)
        try:
            run()
            torch.cuda.synchronize() if torch.cuda.is_available() else None
        except Exception as e:
            log(f"tile {cfg} failed: {str(e).splitlines()[0][:300]}")
            continue
        o, lse = op[live].float(), lsep.reshape(-1)[live]
        ref = (o, lse) if ref is None else ref
        err = ((o - ref[0]).norm() / ref[0].norm()).item() if o.isfinite().all() else float("nan")
        lse_err = (lse - ref[1]).abs().max().item()
        log(f"tile {cfg}: rel err vs first {err:.1e}, lse max diff {lse_err:.1e}")
        runs.append(run)
        res.append(dict(cfg=cfg, rel_err_vs_first=err, lse_err=lse_err, ms=[]))
    for _ in range(rounds):
        for run, r in zip(runs, res):
            r["ms"].append(cuda_ms(run, 3))
    for r in res:
        r["ms_per_chunk"] = sorted(r["ms"])[len(r["ms"]) // 2]
        r["ms_est_total"] = r["ms_per_chunk"] * n_chunks
        log(f"tile {r['cfg']}: median {r['ms_per_chunk']:.2f} ms on the last chunk (x{n_chunks} = "
            f"{r['ms_est_total']:.0f} ms) over {rounds} rounds: {' '.join(f'{m:.2f}' for m in r['ms'])}")
    return res


def main() -> None:
    global BS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--N", type=int, default=1 << 20)
    p.add_argument("--stages", default="route,sort,tile")
    p.add_argument("--chunk", type=int, default=0, help="queries per chunk (default: the launcher's)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds of the tile configurations")
    p.add_argument("--bs", type=int, default=BS, help="block size (a smoke run uses a small one)")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    a = p.parse_args()
    BS = a.bs
    N = a.N
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(3)
    q, k, v = (torch.randn(1, h, N, D, device=dev, dtype=torch.bfloat16, generator=g) for h in (HQ, HKV, HKV))
    means = pool_means(k, BS)
    step = a.chunk or launcher.chunk_queries(1, HQ, N, TOPK, D, 2)
    n_chunks = triton_cdiv(N, step)
    c0 = N - step
    res = dict(N=N, chunk=step, n_chunks=n_chunks, device=torch.cuda.get_device_name() if dev == "cuda" else dev)
    stages = a.stages.split(",")
    if "route" in stages:
        res["route"] = routing(q, means, step)
    blk, _ = route_chunk(q, means, c0, step, c0, block_size=BS, top_k=TOPK, sink_blocks=0)
    if "sort" in stages:
        res["csr"] = csr(blk, triton_cdiv(N, BS), n_chunks)
    if "tile" in stages:
        res["tile"] = tiles(q, k, v, blk, c0, n_chunks, a.rounds)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "kern_variants.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
