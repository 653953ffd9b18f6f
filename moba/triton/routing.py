"""Triton kernels for MoBA routing: block means of the keys, and gate + top-k per query.

The routing kernel streams over the pooled keys of one KV head for a tile of (query, GQA head)
rows and keeps a running top-k in registers, by repeated max extraction above a running threshold.
No [blocks, heads, Tq] gate is ever written. For bf16 queries on CUDA the gate runs on tensor cores:
the fp32 means are split into three bf16 parts whose sum is exact (`split_means`), so three bf16
dots give fp32-accurate scores (only the summation order differs from an fp32 matmul, which can
swap near-tied blocks; moba/README.md). Other queries use fp32 FMA dots.
It knows nothing of attention.
Layout: q [B, Hq, Tq, D]; means [B, Hkv, n_full, D] fp32; the blocks table it writes is int32
[B, Hq, C, top_k + sink_blocks] = [own, routed best-first, sinks], -1 for an unused slot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SPLIT_MIN_ROWS = 16  # fewer (query, head) rows per KV head (decode): the fp32 FMA gate, no split means


@triton.jit
def _pool_kernel(K, M, block_size, skb, skh, skt, smb, smh, smn, Hkv, D: tl.constexpr, BT: tl.constexpr):
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // Hkv, bh % Hkv
    d = tl.arange(0, D)
    base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh + (j * block_size).to(tl.int64) * skt
    acc = tl.zeros([BT, D], dtype=tl.float32)
    for t0 in range(0, block_size, BT):
        t = t0 + tl.arange(0, BT)
        rows = base + t[:, None].to(tl.int64) * skt
        acc += tl.load(rows + d[None, :], mask=t[:, None] < block_size, other=0.0)
    mean = tl.sum(acc, 0) / block_size
    tl.store(M + b.to(tl.int64) * smb + h.to(tl.int64) * smh + j.to(tl.int64) * smn + d, mean)


def pool_means(k: torch.Tensor, block_size: int) -> torch.Tensor:
    """fp32 means of the complete key blocks: [B, Hkv, Tk // block_size, D] (as moba.block_means)."""
    B, Hkv, Tk, D = k.shape
    n_full = Tk // block_size
    means = torch.empty(B, Hkv, n_full, D, device=k.device, dtype=torch.float32)
    if n_full:
        _pool_kernel[(n_full, B * Hkv)](
            k, means, block_size, *k.stride()[:3], *means.stride()[:3], Hkv, D=D, BT=32, num_warps=4
        )
    return means


@triton.jit
def _gate_tile(q, m_base, smn, sp, own, n_full, n0, D: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr):
    n = n0 + tl.arange(0, BN)
    d = tl.arange(0, D)
    ptr = m_base + n[:, None] * smn + d[None, :]
    inside = n[:, None] < n_full
    if SPLIT:
        s = tl.dot(q, tl.trans(tl.load(ptr + 2 * sp, mask=inside, other=0.0)))
        s = tl.dot(q, tl.trans(tl.load(ptr + sp, mask=inside, other=0.0)), s)
        s = tl.dot(q, tl.trans(tl.load(ptr, mask=inside, other=0.0)), s)
    else:
        s = tl.dot(q, tl.trans(tl.load(ptr, mask=inside, other=0.0)), input_precision="ieee")
    return tl.where(n[None, :] < own[:, None], s, float("-inf")), n


@triton.jit
def _top_by_extraction(q, m_base, smn, sp, own, n_full, sink_blocks, n_hi, D: tl.constexpr, BM: tl.constexpr,
                       BN: tl.constexpr, KP: tl.constexpr, N_ROUTE: tl.constexpr, SPLIT: tl.constexpr):  # fmt: skip
    slot = tl.arange(0, KP)[None, :]
    best_v = tl.where(slot < N_ROUTE, float("-inf"), float("inf")) + tl.zeros([BM, KP], dtype=tl.float32)
    best_i = tl.full([BM, KP], -1, dtype=tl.int32)
    thr = tl.full([BM], float("-inf"), dtype=tl.float32)
    for n0 in range(sink_blocks, n_hi, BN):
        s, n = _gate_tile(q, m_base, smn, sp, own, n_full, n0, D, BN, SPLIT)
        s = tl.where(s > thr[:, None], s, float("-inf"))
        mx, at = tl.max(s, 1, return_indices=True, return_indices_tie_break_left=True)
        go = tl.max(mx, 0) > float("-inf")
        while go:
            put = (slot == tl.argmin(best_v, 1, tie_break_left=True)[:, None]) & (mx > thr)[:, None]
            best_v = tl.where(put, mx[:, None], best_v)
            best_i = tl.where(put, (n0 + at)[:, None], best_i)
            thr = tl.min(best_v, 1)
            s = tl.where((n[None, :] == (n0 + at)[:, None]) | (s <= thr[:, None]), float("-inf"), s)
            mx, at = tl.max(s, 1, return_indices=True, return_indices_tie_break_left=True)
            go = tl.max(mx, 0) > float("-inf")
    return _best_first(best_v, best_i, BM, KP, N_ROUTE)


@triton.jit
def _best_first(best_v, best_i, BM: tl.constexpr, KP: tl.constexpr, N_ROUTE: tl.constexpr):
    slot = tl.arange(0, KP)[None, :]
    v = tl.where(slot < N_ROUTE, best_v, float("-inf"))
    score = tl.full([BM, KP], float("-inf"), dtype=tl.float32)
    idx = tl.full([BM, KP], -1, dtype=tl.int32)
    for i in range(N_ROUTE):
        mx = tl.max(v, 1)
        at = tl.argmax(v, 1, tie_break_left=True)
        got = tl.sum(tl.where(slot == at[:, None], best_i, 0), 1)
        score = tl.where(slot == i, mx[:, None], score)
        idx = tl.where(slot == i, got[:, None], idx)
        v = tl.where(slot == at[:, None], float("-inf"), v)
    return score, idx


@triton.jit
def _route_kernel(
    Q, M, P, BLK, SCR,
    sqb, sqh, sqt, smb, smh, smn, spb, sph, spn, sp,
    C, Hq, Hkv, G, q_off, pos0, n_full, block_size, sink_blocks,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, KP: tl.constexpr, N_ROUTE: tl.constexpr,
    SINKS: tl.constexpr, WRITE_SCORES: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    S: tl.constexpr = 1 + N_ROUTE + SINKS
    bk = tl.program_id(1)
    b, kvh = bk // Hkv, bk % Hkv
    r = tl.program_id(0) * BM + tl.arange(0, BM)
    valid = r < C * G
    c, h = r // G, kvh * G + r % G
    own = tl.where(valid, (pos0 + c) // block_size, 0)
    d = tl.arange(0, D)
    q_ptr = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + (q_off + c).to(tl.int64) * sqt
    q = tl.load(q_ptr[:, None] + d[None, :], mask=valid[:, None], other=0.0)
    if not SPLIT:
        q = q.to(tl.float32)
    m_base = M + b.to(tl.int64) * smb + kvh.to(tl.int64) * smh
    row = ((b * Hq + h).to(tl.int64) * C + c) * S
    out_mask = valid[:, None]
    if N_ROUTE > 0:
        n_hi = tl.max(tl.minimum(own, n_full), 0)
        if SPLIT:
            g_base, g_stride = P + b.to(tl.int64) * spb + kvh.to(tl.int64) * sph, spn
        else:
            g_base, g_stride = m_base, smn
        score, idx = _top_by_extraction(q, g_base, g_stride, sp, own, n_full, sink_blocks, n_hi, D, BM, BN, KP,
                                        N_ROUTE, SPLIT)  # fmt: skip
        slot = tl.arange(0, KP)[None, :]
        m_route = out_mask & (slot < N_ROUTE)
        tl.store(BLK + row[:, None] + 1 + slot, tl.where(score == float("-inf"), -1, idx), mask=m_route)
        if WRITE_SCORES:
            tl.store(SCR + row[:, None] + 1 + slot, score, mask=m_route)
    tl.store(BLK + row, own, mask=valid)
    if WRITE_SCORES:
        tl.store(SCR + row, float("inf"), mask=valid)
    for si in tl.static_range(SINKS):
        on = si < own
        tl.store(BLK + row + 1 + N_ROUTE + si, tl.where(on, si, -1), mask=valid)
        if WRITE_SCORES:
            ms = tl.load(m_base + si * smn + d, mask=(d < D) & (si < n_full), other=0.0)
            sc = tl.sum(q.to(tl.float32) * ms[None, :], 1)
            tl.store(SCR + row + 1 + N_ROUTE + si, tl.where(on, sc, float("-inf")), mask=valid)


def split_means(means: torch.Tensor) -> torch.Tensor:
    """Three bf16 parts whose sum is exactly the fp32 means: [3, *means.shape] bf16.

    A bf16 query times each part is exact in fp32, so three bf16 tensor-core dots give the gate
    to fp32 accuracy (only the summation order differs from an fp32 matmul).
    """
    hi = means.to(torch.bfloat16)
    rest = means - hi.float()
    mid = rest.to(torch.bfloat16)
    return torch.stack([hi, mid, (rest - mid.float()).to(torch.bfloat16)])


def route_chunk(q, means, q_off, C, pos0, *, block_size, top_k, sink_blocks, scores=False, parts=None, tile=None):
    """Blocks (and optionally scores) for queries q[:, :, q_off : q_off + C] at positions pos0 ...

    Args:
        q: [B, Hq, Tq, D] fp16/bf16, last dim contiguous. means: [B, Hkv, n_full, D] fp32.
        parts: `split_means(means)` when already computed (bf16 CUDA queries: the gate then runs on
            tensor cores, above SPLIT_MIN_ROWS rows per KV head); made here otherwise. Other
            queries use fp32 FMA dots.
        tile: (rows, blocks, warps) of one program; default `route_tile`.
        top_k, sink_blocks: already capped at the number of key blocks (`moba.types.clamp_blocks`,
            as the launcher does): the kernel's register tile and sink loop are sized by them.
    Returns:
        (blocks int32 [B, Hq, C, top_k + sink_blocks], scores fp32 of that shape or None).
    """
    B, Hq, _, D = q.shape
    Hkv, n_full = means.shape[1], means.shape[2]
    G = Hq // Hkv
    S = top_k + sink_blocks
    blk = torch.empty(B, Hq, C, S, device=q.device, dtype=torch.int32)
    scr = torch.empty(B, Hq, C, S, device=q.device, dtype=torch.float32) if scores else blk
    split = q.dtype == torch.bfloat16 and q.is_cuda and n_full > 0 and top_k > 1 and C * G > SPLIT_MIN_ROWS
    if split and parts is None:
        parts = split_means(means)
    parts = parts if split else means[None]
    kp = triton.next_power_of_2(max(top_k - 1, 1))
    bm, bn, warps = tile or route_tile(split, D)
    bn = max(bn, kp)
    grid = (triton.cdiv(C * G, bm), B * Hkv)
    _route_kernel[grid](
        q, means, parts, blk, scr, *q.stride()[:3], *means.stride()[:3], *parts.stride()[1:4], parts.stride(0),
        C, Hq, Hkv, G, q_off, pos0, n_full, block_size, sink_blocks,
        D=D, BM=bm, BN=bn, KP=kp, N_ROUTE=top_k - 1, SINKS=sink_blocks,
        WRITE_SCORES=scores, SPLIT=split, num_warps=warps,
    )  # fmt: skip
    return blk, (scr if scores else None)


def route_tile(split: bool, D: int) -> tuple[int, int, int]:
    """(rows, blocks, warps) of a routing program: tensor-core tiles for the split gate, FMA tiles otherwise."""
    if split:
        return (64, 64, 4)  # the fastest of the tiles timed at 1M on an H200 (bench/RESULTS.md)
    return (32, 64, 4) if D <= 128 else (16, 64, 4)
