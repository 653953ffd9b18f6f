"""MoBA (Triton) against cuDNN / FlashAttention-2 SDPA on one GPU: correctness first, then a table.

Shapes follow ../shared/reference/h200-baselines.md: B=1, 28 query heads, 4 KV heads (expanded to
28 for SDPA), D=128, bf16, block 4096, top-k 12, random inputs. Rows: full prefill for each N,
chunked prefill (64K queries after 960K keys) and decode (1 query over 1M keys, cached block means).
MoBA FLOPs are counted from the routing the kernel actually chose. Peak memory is
torch.cuda.max_memory_allocated during the call; "extra" subtracts the inputs and the output.

Run: python -m bench.attention [--sizes 32768,...] [--no-fa2] [--tune N] [--breakdown N] [--out DIR]
Prints a markdown table last, headed by the tile kernel timed (the Gluon one only on a GPU in
EXCLUSIVE_PROCESS compute mode, moba/triton/compute_mode.py), and writes it (and a JSON of every number)
under --out ($OUT).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import moba
import moba.triton.launcher as launcher
from moba.triton.csr import build_tiles
from moba.triton.decode import merge_partials, partials
from moba.triton.routing import pool_means, route_chunk, split_means

HQ, HKV, D, BS, TOPK = 28, 4, 128, 4096, 12
DT = torch.bfloat16
GB = 1 << 30


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def qkv(Tq: int, Tk: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, HQ, Tq, D, device="cuda", dtype=DT, generator=g)
    k = torch.randn(1, HKV, Tk, D, device="cuda", dtype=DT, generator=g)
    v = torch.randn(1, HKV, Tk, D, device="cuda", dtype=DT, generator=g)
    return q, k, v


def time_ms(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        out.append(s.elapsed_time(e))
    return sorted(out)[len(out) // 2]


def rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def moba_call(q, k, v, **kw):
    return moba.moba_attention(q, k, v, block_size=BS, top_k=TOPK, **kw)


def check_correctness() -> list[dict]:
    """Triton vs the portable path on fresh random inputs where the portable path is affordable."""
    rows = []
    for name, Tq, Tk, seed in [("prefill 64K", 65536, 65536, 11), ("chunked 4K after 60K", 4096, 65536, 12),
                               ("decode 1 over 256K", 1, 262144, 13)]:  # fmt: skip
        q, k, v = qkv(Tq, Tk, seed)
        means = moba.block_means(k, BS) if Tq == 1 else None
        t0 = time.time()
        out, r = moba_call(q, k, v, key_means=means, return_routing=True)
        ref, rr = moba.portable_moba_attention(q, k, v, block_size=BS, top_k=TOPK, key_means=means,
                                               return_routing=True)  # fmt: skip
        same = (r.blocks == rr.blocks).all(-1).float().mean().item()
        err = rel_err(out, ref)
        rows.append(dict(case=name, rel_err=err, same_routing=same, nan=bool(out.isnan().any()), ok=err <= 1e-2))
        log(f"check {name}: rel err {err:.2e}, routing rows identical {same:.5f} ({time.time() - t0:.1f}s)")
        del q, k, v, out, ref, r, rr
    return rows


def attended_keys(q, k, means=None) -> int:
    """Sum over (query, head) of the keys MoBA attends, from the kernel's own routing."""
    Tq, Tk = q.shape[2], k.shape[2]
    means = pool_means(k, BS) if means is None else means
    total = 0
    for c0 in range(0, Tq, 65536):
        C = min(65536, Tq - c0)
        blk, _ = route_chunk(q, means, c0, C, Tk - Tq + c0, block_size=BS, top_k=TOPK, sink_blocks=0)
        total += int((blk[..., 1:] >= 0).sum()) * BS
        pos = torch.arange(Tk - Tq + c0, Tk - Tq + c0 + C, device="cuda")
        total += int((pos % BS + 1).sum()) * HQ
    return total


def tile_union(q, k) -> float:
    """Mean fraction of past blocks that a 128-query tile's union of routed blocks covers (last 8K queries)."""
    Tq, Tk = q.shape[2], k.shape[2]
    C = min(8192, Tq)
    blk, _ = route_chunk(q, pool_means(k, BS), Tq - C, C, Tk - C, block_size=BS, top_k=TOPK, sink_blocks=0)
    nb = Tk // BS
    hit = torch.zeros(HQ, C // 128, nb + 1, device="cuda", dtype=torch.bool)
    ids = blk[0, :, :, 1:].long().clamp(min=-1).reshape(HQ, C // 128, -1) % (nb + 1)
    hit.scatter_(2, ids, True)
    own = (Tk - C) // BS
    return hit[..., :own].float().sum(-1).mean().item() / max(own, 1)


def sdpa_ms(q, k, v, backend, reps, causal=True, mask=None, gqa=False) -> float | str:
    try:
        with sdpa_kernel([backend]):
            return time_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                                  enable_gqa=gqa), reps, warmup=1 if reps > 1 else 0)  # fmt: skip
    except RuntimeError as e:
        log(f"SDPA {backend} failed: {str(e).splitlines()[0][:200]}")
        return "n/a"


def moba_row(N: int, fa2: bool) -> dict:
    q, k, v = qkv(N, N, seed=N)
    row = dict(N=N, dense=(N - 1) // BS <= TOPK - 1, **_moba_stats(q, k, v))
    row["flex_union"] = None if row["dense"] else tile_union(q, k)
    row.update(_sdpa_stats(q, k, v, fa2))
    log(f"N={N}: {row}")
    return row


def _moba_stats(q, k, v) -> dict:
    N = q.shape[2]
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out_bytes = moba_call(q, k, v).numel() * 2
    peak = torch.cuda.max_memory_allocated() - base
    ms = time_ms(lambda: moba_call(q, k, v), 3 if N <= 262144 else 2, warmup=0)
    flops = 4 * D * attended_keys(q, k)
    inputs = (q.numel() + k.numel() + v.numel()) * 2
    return dict(moba_ms=ms, moba_tflops=flops / ms / 1e9, moba_flops=flops, peak_extra_gb=(peak - out_bytes) / GB,
                inputs_gb=inputs / GB)  # fmt: skip


def _sdpa_stats(q, k, v, fa2: bool) -> dict:
    N = q.shape[2]
    ke, ve = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
    reps = 3 if N <= 262144 else 1
    row = dict(cudnn_ms=sdpa_ms(q, ke, ve, SDPBackend.CUDNN_ATTENTION, reps))
    row["fa2_ms"] = sdpa_ms(q, ke, ve, SDPBackend.FLASH_ATTENTION, reps) if fa2 else "skipped"
    row["sdpa_tflops"] = 2 * N * N * D * HQ / row["cudnn_ms"] / 1e9 if isinstance(row["cudnn_ms"], float) else None
    return row


def chunked_row(full_row: dict | None, fa2: bool) -> dict:
    Tq, Tk = 65536, 1 << 20
    q, k, v = qkv(Tq, Tk, seed=7)
    ms = time_ms(lambda: moba_call(q, k, v), 3)
    flops = 4 * D * attended_keys(q, k)
    row = dict(case="chunked 64K after 960K", moba_ms=ms, moba_tflops=flops / ms / 1e9)
    if full_row:
        row["per_query_vs_full"] = (ms / Tq) / (full_row["moba_ms"] / full_row["N"])
    if fa2:
        from torch.nn.attention.bias import causal_lower_right

        ke, ve = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
        row["fa2_ms"] = sdpa_ms(q, ke, ve, SDPBackend.FLASH_ATTENTION, 1, causal=False, mask=causal_lower_right(Tq, Tk))
    log(f"chunked: {row}")
    return row


def decode_row() -> dict:
    Tk = 1 << 20
    q, k, v = qkv(1, Tk, seed=5)
    means = pool_means(k, BS)
    ms = time_ms(lambda: moba_call(q, k, v, key_means=means), 20, warmup=3)
    row = dict(case="decode 1 over 1M", moba_ms=ms)
    row["sdpa_gqa_flash_ms"] = sdpa_ms(q, k, v, SDPBackend.FLASH_ATTENTION, 20, causal=False, gqa=True)
    row["sdpa_gqa_cudnn_ms"] = sdpa_ms(q, k, v, SDPBackend.CUDNN_ATTENTION, 20, causal=False, gqa=True)
    ke, ve = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
    row["cudnn_ms"] = sdpa_ms(q, ke, ve, SDPBackend.CUDNN_ATTENTION, 20, causal=False)
    row["fa2_ms"] = sdpa_ms(q, ke, ve, SDPBackend.FLASH_ATTENTION, 20, causal=False)
    log(f"decode: {row}")
    return row


def breakdown(N: int) -> dict:
    """Time each stage of the Triton path at full prefill N (synchronising between stages)."""
    q, k, v = qkv(N, N, seed=3)
    bm, attend = launcher.tile_kernel(q, k, v, 1)
    acc = dict(pool=0.0, route=0.0, sort=0.0, attend=0.0, merge=0.0)
    ev = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
    for _ in range(2):
        acc = dict.fromkeys(acc, 0.0)
        marks = [ev()]
        marks[0].record()
        means = pool_means(k, BS)
        parts = split_means(means)
        out = torch.empty_like(q)
        _mark(marks, acc, "pool")
        step = launcher.chunk_queries(1, HQ, N, TOPK, D, 2)
        for c0 in range(0, N, step):
            C = min(step, N - c0)
            blk, _ = route_chunk(q, means, c0, C, c0, block_size=BS, top_k=TOPK, sink_blocks=0, parts=parts)
            _mark(marks, acc, "route")
            tiles = build_tiles(blk, HKV, math.ceil(N / BS), bm)
            op, lsep = partials(blk, 1, D, q.dtype)
            _mark(marks, acc, "sort")
            attend(q, k, v, blk, tiles, op, lsep, q_off=c0, pos0=c0, block_size=BS, scale=D**-0.5)
            _mark(marks, acc, "attend")
            merge_partials(op, lsep, blk, out, q_off=c0, nsplit=1)
            _mark(marks, acc, "merge")
    kernel = _module(attend)
    log(f"breakdown N={N} chunk={step} tile kernel {kernel}: " + ", ".join(f"{k_} {v_:.1f} ms" for k_, v_ in acc.items()))
    return dict(N=N, chunk=step, tile_kernel=kernel, **acc)


def tile_kernel() -> str:
    """The module of the tile kernel the launcher takes here at one key split (the Gluon one only on an
    EXCLUSIVE_PROCESS Hopper GPU, moba/triton/compute_mode.py)."""
    return _module(launcher.tile_kernel(*qkv(BS, BS, seed=0), 1)[1])


def _module(attend) -> str:
    return getattr(attend, "func", attend).__module__  # the Triton kernel comes as a functools.partial


def _mark(marks, acc, name) -> None:
    e = torch.cuda.Event(enable_timing=True)
    e.record()
    e.synchronize()
    acc[name] += marks[-1].elapsed_time(e)
    marks.append(e)


def tune(N: int) -> list[dict]:
    """MoBA ms at prefill N for a few tile configurations (head dim 128)."""
    q, k, v = qkv(N, N, seed=4)
    flops = 4 * D * attended_keys(q, k)
    res = []
    default = dict(launcher.TILE_CONFIGS[D])
    for bm, bn, w, s in [(128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 4)]:
        launcher.TILE_CONFIGS[D] = dict(BM=bm, BN=bn, warps=w, stages=s)
        try:
            ms = time_ms(lambda: moba_call(q, k, v), 2)
        except Exception as e:  # a config the compiler rejects (shared memory) is reported, not fatal
            log(f"config {bm, bn, w, s} failed: {str(e).splitlines()[0][:160]}")
            continue
        res.append(dict(BM=bm, BN=bn, warps=w, stages=s, ms=ms, tflops=flops / ms / 1e9))
        log(f"tune N={N}: {res[-1]}")
    launcher.TILE_CONFIGS[D] = default
    return res


def fmt(x, nd=1) -> str:
    return f"{x:,.{nd}f}" if isinstance(x, float) else ("-" if x is None else str(x))


def table(rows, chunk, dec, checks, kernel) -> str:
    lines = [f"Tile kernel: {kernel}.\n",
             "| N | MoBA ms | cuDNN SDPA ms | FA2 SDPA ms | FlexAttention | cuDNN / MoBA | MoBA TFLOP/s (eff.) "
             "| MoBA peak extra GB (inputs GB) |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        ratio = r["cudnn_ms"] / r["moba_ms"] if isinstance(r["cudnn_ms"], float) else None
        flex = "dense (= SDPA)" if r["dense"] else f"n/a: tile union = {100 * r['flex_union']:.0f}% of past blocks"
        lines.append(f"| {r['N']:,} | {fmt(r['moba_ms'])} | {fmt(r['cudnn_ms'])} | {fmt(r['fa2_ms'])} | {flex} | "
                     f"{fmt(ratio, 2)}x | {fmt(r['moba_tflops'], 0)} | {r['peak_extra_gb']:.2f} ({r['inputs_gb']:.1f}) |")  # fmt: skip
    if chunk:
        lines.append(f"\nChunked prefill (64K queries after 960K keys): MoBA {fmt(chunk['moba_ms'])} ms, "
                     f"{fmt(chunk['moba_tflops'], 0)} TFLOP/s eff., per-query cost {fmt(chunk.get('per_query_vs_full'), 2)}x "
                     f"full prefill; FA2 SDPA (lower-right causal) {fmt(chunk.get('fa2_ms'))} ms.")  # fmt: skip
    if dec:
        lines.append(f"\nDecode (1 query over 1M keys, cached block means): MoBA {fmt(dec['moba_ms'], 3)} ms; SDPA over the "
                     f"full cache: cuDNN {fmt(dec['cudnn_ms'], 3)} ms, FA2 {fmt(dec['fa2_ms'], 3)} ms (K/V expanded to 28 "
                     f"heads), FA2 GQA {fmt(dec['sdpa_gqa_flash_ms'], 3)} ms, cuDNN GQA {fmt(dec['sdpa_gqa_cudnn_ms'], 3)} ms.")  # fmt: skip
    lines.append("\nCorrectness vs portable path: " + "; ".join(
        f"{c['case']} rel err {c['rel_err']:.1e} ({'ok' if c['ok'] else 'FAIL'})" for c in checks))  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="32768,131072,262144,524288,1048576")
    p.add_argument("--no-fa2", action="store_true", help="skip the FlashAttention-2 SDPA columns")
    p.add_argument("--no-extra", action="store_true", help="skip the chunked-prefill and decode rows")
    p.add_argument("--tune", type=int, default=0, help="sweep tile configurations at this N first")
    p.add_argument("--breakdown", type=int, default=0, help="time the stages at this N first")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    res = dict(tile_kernel=tile_kernel(), checks=check_correctness())
    log(f"tile kernel: {res['tile_kernel']}")
    if a.breakdown:
        res["breakdown"] = breakdown(a.breakdown)
    if a.tune:
        res["tune"] = tune(a.tune)
    sizes = [int(s) for s in a.sizes.split(",") if s]
    res["rows"] = [moba_row(N, not a.no_fa2) for N in sizes]
    torch.cuda.empty_cache()
    full = next((r for r in res["rows"] if r["N"] == 1 << 20), None)
    res["chunked"] = None if a.no_extra else chunked_row(full, not a.no_fa2)
    res["decode"] = None if a.no_extra else decode_row()
    md = table(res["rows"], res["chunked"], res["decode"], res["checks"], res["tile_kernel"])
    (out / "attention.json").write_text(json.dumps(res, indent=1))
    (out / "attention.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
