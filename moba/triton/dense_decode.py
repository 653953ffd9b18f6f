"""Exact attention of one decode query per head over a whole static cache, GQA-grouped, in Triton.

One program per (batch row, KV head, slice of keys) loads each key and value tile once for all the
query heads that share the KV head (`tl.dot` of [G, D] queries by [D, BN] keys), where a program per
query head (moba/triton/decode.py's split-K kernel over a table of every block) fetches every tile G
times (7 for Qwen2.5-7B). The slices'
partial outputs and base-2 log-sum-exps go to decode.py's merge. The number of valid keys is read
from a device tensor, so a captured CUDA graph replays it at every length. Layout: q [B, Hq, 1, D],
k and v [B, Hkv, capacity, D] (the whole buffers), query head h uses KV head h // (Hq // Hkv).
Knows nothing of MoBA routing or models.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moba.triton.decode import merge_partials, partials, sm_count

BN = 64  # keys a tile
PER_SM = 4  # programs per streaming multiprocessor the slices aim for


@triton.jit
def _dense_kernel(
    Q, K, V, OP, LSEP, LEN,
    sqb, sqh, skb, skh, skt, svb, svh, svt,
    Hq, Hkv, G, S, split_len, qk_scale,
    D: tl.constexpr, GP: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    bk, sl = tl.program_id(0), tl.program_id(1)
    b, kh = bk // Hkv, bk % Hkv
    g = tl.arange(0, GP)
    live = g < G
    h = kh * G + g
    d = tl.arange(0, D)
    q = tl.load(Q + b.to(tl.int64) * sqb + h[:, None].to(tl.int64) * sqh + d[None, :], mask=live[:, None], other=0.0)
    k_base = K + b.to(tl.int64) * skb + kh.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + kh.to(tl.int64) * svh
    lo = sl * split_len
    hi = tl.minimum(lo + split_len, tl.load(LEN).to(tl.int32))
    m_i = tl.full([GP], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, D], dtype=tl.float32)
    for n0 in range(lo, hi, BN):  # none for a slice past the length: it writes an empty partial
        n = n0 + tl.arange(0, BN)
        inside = n < hi
        kt = tl.load(k_base + n[:, None].to(tl.int64) * skt + d[None, :], mask=inside[:, None], other=0.0)
        s = tl.where(inside[None, :], tl.dot(q, tl.trans(kt)) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        vt = tl.load(v_base + n[:, None].to(tl.int64) * svt + d[None, :], mask=inside[:, None], other=0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        m_i = m_new
    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    idx = (b * Hq + h).to(tl.int64) * S + sl
    tl.store(OP + idx[:, None] * D + d[None, :], o.to(OP.dtype.element_ty), mask=live[:, None])
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(tl.where(l_i == 0.0, 1.0, l_i)))
    tl.store(LSEP + idx, lse, mask=live)


def slice_len(capacity: int, programs_per_slice: int, device: torch.device) -> int:
    """Keys a slice: whole tiles, enough slices that about PER_SM programs run per SM."""
    want = triton.cdiv(PER_SM * sm_count(device), max(programs_per_slice, 1))
    return max(BN, triton.cdiv(triton.cdiv(capacity, want), BN) * BN)


def dense_decode(q, k, v, length, *, scale: float) -> torch.Tensor:
    """Attention of q [B, Hq, 1, D] (the query at position length - 1) over keys 0 .. length - 1 of the
    buffers k, v [B, Hkv, capacity, D]; length: int64 [1] on the device. Returns [B, Hq, 1, D]."""
    B, Hq, _, D = q.shape
    Hkv, capacity = k.shape[1], k.shape[2]
    G = Hq // Hkv
    split = slice_len(capacity, B * Hkv, q.device)
    S = triton.cdiv(capacity, split)
    table = torch.zeros(B, Hq, 1, S, dtype=torch.int32, device=q.device)  # every slice: the merge's rows
    op, lsep = partials(table, 1, D, q.dtype)
    _dense_kernel[(B * Hkv, S)](
        q, k, v, op, lsep, length,
        q.stride(0), q.stride(1), *k.stride()[:3], *v.stride()[:3],
        Hq, Hkv, G, S, split, scale * 1.4426950408889634,
        D=D, GP=max(16, triton.next_power_of_2(G)), BN=BN, num_warps=4,
    )  # fmt: skip
    out = torch.empty_like(q)
    merge_partials(op, lsep, table, out, q_off=0, nsplit=1)
    return out
