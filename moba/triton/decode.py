"""Split-K MoBA attention for a few queries (decode) and the merge of partial results, in Triton.

Decode: one program per (query row, slot, split) streams one slice of one selected block
(flash-decoding), so a single token spreads over the whole GPU; the own block is slot 0, masked
causally. Merge: for every query row, the partials of all its slots and splits (written by this
kernel or by moba/triton/attention.py) are combined through their log-sum-exps into the output.
Layout: blocks table int32 [B, Hq, C, S]; partials op [B*Hq*C*S*nsplit, D], lsep of that length
(base-2 log-sum-exp, -inf for an empty slice). `static_decode` chains both for one query read
from a device-side length (CUDA-graph decode over preallocated buffers). Knows nothing of routing.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_kernel(
    Q, K, V, BLK, OP, LSEP, POS,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
    C, Hq, G, S, q_off, pos0, block_size, split_len, qk_scale,
    D: tl.constexpr, BN: tl.constexpr, NSPLIT: tl.constexpr, POS_FROM_PTR: tl.constexpr,
):  # fmt: skip
    row, slot, sp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    e = row.to(tl.int64) * S + slot
    blk = tl.load(BLK + e)
    if blk >= 0:
        c, h, b = row % C, (row // C) % Hq, row // (C * Hq)
        pos = pos0 + c
        if POS_FROM_PTR:
            pos += tl.load(POS).to(tl.int32)
        d = tl.arange(0, D)
        q_ptr = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + (q_off + c).to(tl.int64) * sqt
        q = tl.load(q_ptr + d).to(tl.float32) * qk_scale
        k_base = K + b.to(tl.int64) * skb + (h // G).to(tl.int64) * skh
        v_base = V + b.to(tl.int64) * svb + (h // G).to(tl.int64) * svh
        lo = blk * block_size + sp * split_len
        hi = tl.minimum(tl.minimum(lo + split_len, blk * block_size + block_size), pos + 1)
        m_i = tl.full([BN], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BN], dtype=tl.float32)
        acc = tl.zeros([BN, D], dtype=tl.float32)
        for n0 in range(lo, hi, BN):
            n = n0 + tl.arange(0, BN)
            inside = n < hi
            kt = tl.load(k_base + n[:, None].to(tl.int64) * skt + d[None, :], mask=inside[:, None], other=0.0)
            vt = tl.load(v_base + n[:, None].to(tl.int64) * svt + d[None, :], mask=inside[:, None], other=0.0)
            s = tl.where(inside, tl.sum(kt.to(tl.float32) * q[None, :], 1), float("-inf"))
            m_new = tl.maximum(m_i, s)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_use)
            p = tl.math.exp2(s - m_use)
            l_i = l_i * alpha + p
            acc = acc * alpha[:, None] + p[:, None] * vt.to(tl.float32)
            m_i = m_new
        m = tl.max(m_i, 0)
        m_use = tl.where(m == float("-inf"), 0.0, m)
        w = tl.math.exp2(m_i - m_use)
        l = tl.sum(l_i * w, 0)
        o = tl.sum(acc * w[:, None], 0) / tl.where(l == 0.0, 1.0, l)
        idx = e * NSPLIT + sp
        tl.store(OP + idx * D + d, o.to(OP.dtype.element_ty))
        tl.store(LSEP + idx, tl.where(l == 0.0, float("-inf"), m + tl.math.log2(tl.where(l == 0.0, 1.0, l))))


def attend_decode(q, k, v, blk, op, lsep, *, q_off, pos0, block_size, scale, nsplit, bn=64, length=None):
    """Split-K attention of the chunk's rows over their selected blocks; fills op and lsep.

    Row c of the chunk sits at position pos0 + c, plus the value of `length` (an int64 [1] device
    tensor, read by the kernel) when given: decode over static buffers passes pos0 = -1 and the
    device length, so the kernel launch carries no per-step Python value.
    """
    B, Hq, C, S = blk.shape
    D = q.shape[3]
    split_len = triton.cdiv(triton.cdiv(block_size, nsplit), bn) * bn
    _decode_kernel[(B * Hq * C, S, nsplit)](
        q, k, v, blk, op, lsep, blk if length is None else length,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        C, Hq, Hq // k.shape[1], S, q_off, pos0, block_size, split_len, scale * 1.4426950408889634,
        D=D, BN=bn, NSPLIT=nsplit, POS_FROM_PTR=length is not None, num_warps=4,
    )  # fmt: skip


@triton.jit
def _merge_kernel(
    OP, LSEP, BLK, O, sob, soh, sot, n_rows, C, Hq, S, q_off,
    D: tl.constexpr, BR: tl.constexpr, NSPLIT: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    valid = r < n_rows
    r64 = r.to(tl.int64)
    m = tl.full([BR], float("-inf"), dtype=tl.float32)
    for slot in range(S):
        used = valid & (tl.load(BLK + r64 * S + slot, mask=valid, other=-1) >= 0)
        for sp in tl.static_range(NSPLIT):
            lse = tl.load(LSEP + (r64 * S + slot) * NSPLIT + sp, mask=used, other=float("-inf"))
            m = tl.maximum(m, lse)
    m = tl.where(m == float("-inf"), 0.0, m)
    d = tl.arange(0, D)
    l = tl.zeros([BR], dtype=tl.float32)
    acc = tl.zeros([BR, D], dtype=tl.float32)
    for slot in range(S):
        used = valid & (tl.load(BLK + r64 * S + slot, mask=valid, other=-1) >= 0)
        for sp in tl.static_range(NSPLIT):
            idx = (r64 * S + slot) * NSPLIT + sp
            w = tl.math.exp2(tl.load(LSEP + idx, mask=used, other=float("-inf")) - m)
            o = tl.load(OP + idx[:, None] * D + d[None, :], mask=used[:, None], other=0.0)
            acc += w[:, None] * o.to(tl.float32)
            l += w
    out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
    c, h, b = r % C, (r // C) % Hq, r // (C * Hq)
    o_ptr = O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + (q_off + c).to(tl.int64) * sot
    tl.store(o_ptr[:, None] + d[None, :], out.to(O.dtype.element_ty), mask=valid[:, None])


def merge_partials(op, lsep, blk, out, *, q_off, nsplit):
    """out[:, :, q_off : q_off + C] = the log-sum-exp merge of every row's partials."""
    B, Hq, C, S = blk.shape
    D = out.shape[3]
    n_rows = B * Hq * C
    br = 32 if D <= 128 else 16
    _merge_kernel[(triton.cdiv(n_rows, br),)](
        op, lsep, blk, out, *out.stride()[:3], n_rows, C, Hq, S, q_off,
        D=D, BR=br, NSPLIT=nsplit, num_warps=4,
    )  # fmt: skip


def attend_rows(q, k, v, blk, out, *, q_off, pos0, block_size, scale, length=None) -> None:
    """Split-K decode of a chunk's few rows, merged into out[:, :, q_off : q_off + C].

    blk: int32 [B, Hq, C, S]; pos0 and length as in `attend_decode`. About 16 programs per SM run.
    """
    nsplit = key_splits(blk.numel(), q.device, block_size, 64, per_sm=16)
    op, lsep = partials(blk, nsplit, q.shape[3], q.dtype)
    attend_decode(q, k, v, blk, op, lsep, q_off=q_off, pos0=pos0, block_size=block_size, scale=scale,
                  nsplit=nsplit, length=length)  # fmt: skip
    merge_partials(op, lsep, blk, out, q_off=q_off, nsplit=nsplit)


def static_decode(q, k, v, blk, length, *, block_size: int, scale: float):
    """One decode query per row over static-shape buffers, with no per-step host value.

    q: [B, Hq, 1, D] fp16/bf16; k, v: [B, Hkv, capacity, D] whole cache buffers; blk: int32
    [B, Hq, 1, S] attended block ids (slot 0 the own block, -1 unused); length: int64 [1] on the
    device, the number of valid keys (the query sits at length - 1, its own block is masked there).
    Returns out [B, Hq, 1, D] in q's dtype.
    """
    out = torch.empty_like(q)
    attend_rows(q, k, v, blk, out, q_off=0, pos0=-1, block_size=block_size, scale=scale, length=length)
    return out


def key_splits(programs: int, device: torch.device, block_size: int, bn: int, per_sm: int = 4) -> int:
    """Key splits per block so that at least per_sm programs per SM run; 1 when there are enough."""
    want = triton.cdiv(per_sm * sm_count(device), max(programs, 1))
    return max(1, min(want, triton.cdiv(block_size, bn), 16))


def partials(blk, nsplit: int, D: int, dtype):
    """Partial outputs [blk.numel() * nsplit, D] and their log-sum-exps, uninitialised."""
    n = blk.numel() * nsplit
    return torch.empty(n, D, device=blk.device, dtype=dtype), torch.empty(n, device=blk.device)


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 elsewhere: the Triton interpreter)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count
