"""An experiment: the key-block tile kernel of moba/triton/attention.py in Gluon for Hopper (sm_90).

Measured by bench/kern_variants.py on an H200 (last 1M chunk): correct (rel err 5e-5 against the
Triton kernel) but slower, 18.35 ms with 3 stages against the Triton kernel's 15.98 ms, so the
library does not use it. Likely causes: a CTA-wide barrier per key tile before the TMA refill and
no producer/consumer warp specialization (FlashAttention-3 also ping-pongs two warpgroups).

Same contract as `attend_tiles` with one key split: one program per tile of BM gathered (query,
head) rows of one key block, partial outputs and base-2 log-sum-exps per entry. What Gluon adds
over the Triton kernel is the schedule (as in FlashAttention-3's intra-warpgroup overlap): the
QK^T wgmma of key tile i is issued before the P·V wgmma of tile i-1 and the softmax of tile i runs
while that P·V is in flight; K/V tiles stream through a ring of STAGES shared-memory slots by TMA.
It knows nothing of routing and needs CUDA with compute capability 9.x.
Layout: K/V are read through [B * Hkv, Tk, D] tensor descriptors, so k.stride(0) == Hkv * k.stride(1).
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from moba.triton.hopper import _masked


@gluon.jit
def _rows(PERM, TILE_END, KEY_OFF, KEY_CNT, key, S, C, Hq, pos0, Tk, BM: gl.constexpr, layout: gl.constexpr):
    cnt = gl.load(KEY_CNT + key)
    local = gl.program_id(0) - (gl.load(TILE_END + key) - (cnt + BM - 1) // BM)
    r = local * BM + gl.arange(0, BM, layout=layout)
    valid = r < cnt
    e = gl.load(PERM + gl.load(KEY_OFF + key) + r, mask=valid, other=0)
    c = (e // S) % C
    h = (e // (S * C)) % Hq
    return e, c, h, valid, gl.where(valid, pos0 + c, Tk)


@gluon.jit
def _issue(k_desc, v_desc, k_buf, v_buf, bars, t, n_iter, bh, lo, BN: gl.constexpr, STAGES: gl.constexpr):
    ok = t < n_iter
    slot = t % STAGES
    bar = bars.index(slot)
    mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes, pred=ok)
    tma.async_copy_global_to_shared(k_desc, [bh, lo + t * BN, 0], bar, k_buf.index(slot), pred=ok)
    tma.async_copy_global_to_shared(v_desc, [bh, lo + t * BN, 0], bar, v_buf.index(slot), pred=ok)


@gluon.jit
def _gl_tile_kernel(
    Q, k_desc, v_desc, OP, LSEP, PERM, TILE_KEY, TILE_END, KEY_OFF, KEY_CNT,
    sqb, sqh, sqt, C, Hq, S, Hkv, NB, n_keys, q_off, pos0, Tk, block_size, qk_scale,
    D: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr,
):  # fmt: skip
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BN, 16])  # fmt: skip
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, D, 16])  # fmt: skip
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    q_ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    key = gl.load(TILE_KEY + gl.program_id(0)).to(gl.int32)
    if key < n_keys:
        b, kvh, j = key // (Hkv * NB), (key // NB) % Hkv, key % NB
        e, c, h, valid, pos = _rows(PERM, TILE_END, KEY_OFF, KEY_CNT, key, S, C, Hq, pos0, Tk, BM,
                                    gl.SliceLayout(1, q_ld))  # fmt: skip
        d = gl.arange(0, D, layout=gl.SliceLayout(0, q_ld))
        q_rows = Q + b.to(gl.int64) * sqb + h.to(gl.int64) * sqh + (q_off + c).to(gl.int64) * sqt
        q = gl.load(gl.expand_dims(q_rows, 1) + gl.expand_dims(d, 0), mask=gl.expand_dims(valid, 1), other=0.0)
        q_smem = gl.allocate_shared_memory(Q.dtype.element_ty, [BM, D],
                                           gl.NVMMASharedLayout.get_default_for([BM, D], Q.dtype.element_ty))  # fmt: skip
        q_smem.store(q)
        k_buf = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
        v_buf = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        fence_async_shared()
        gl.thread_barrier()

        pos_s = gl.convert_layout(pos, row_s)
        lo = j * block_size
        hi = gl.minimum(lo + block_size, gl.max(gl.where(valid, pos, 0), 0) + 1)
        mask_from = gl.minimum(gl.min(pos, 0) + 1, hi)
        n_iter = gl.cdiv(hi - lo, BN)
        bh = b * Hkv + kvh
        for t in gl.static_range(STAGES):
            _issue(k_desc, v_desc, k_buf, v_buf, bars, t, n_iter, bh, lo, BN, STAGES)

        zero_s = gl.zeros([BM, BN], gl.float32, s_layout)
        mbarrier.wait(bars.index(0), phase=0)
        s = warpgroup_mma(q_smem, k_buf.index(0).reshape([BN, D]).permute((1, 0)), zero_s, use_acc=False,
                          is_async=True)  # fmt: skip
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        s = _masked(s, lo, mask_from, pos_s, hi, qk_scale, BN, s_layout)
        m_i = gl.max(s, 1)
        p = gl.exp2(s - gl.expand_dims(m_i, 1))
        l_i = gl.sum(p, 1)
        acc = gl.zeros([BM, D], gl.float32, o_layout)
        for i in range(1, n_iter):
            slot = i % STAGES
            mbarrier.wait(bars.index(slot), phase=(i // STAGES) & 1)
            s = warpgroup_mma(q_smem, k_buf.index(slot).reshape([BN, D]).permute((1, 0)), zero_s, use_acc=False,
                              is_async=True)  # fmt: skip
            p_op = gl.convert_layout(p.to(Q.dtype.element_ty), p_layout)
            acc = warpgroup_mma(p_op, v_buf.index((i - 1) % STAGES).reshape([BN, D]), acc, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))
            s = _masked(s, lo + i * BN, mask_from, pos_s, hi, qk_scale, BN, s_layout)
            m_new = gl.maximum(m_i, gl.max(s, 1))
            alpha = gl.exp2(m_i - m_new)
            p = gl.exp2(s - gl.expand_dims(m_new, 1))
            l_i = l_i * alpha + gl.sum(p, 1)
            m_i = m_new
            acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
            gl.thread_barrier()
            _issue(k_desc, v_desc, k_buf, v_buf, bars, i + STAGES - 1, n_iter, bh, lo, BN, STAGES)
        p_op = gl.convert_layout(p.to(Q.dtype.element_ty), p_layout)
        acc = warpgroup_mma(p_op, v_buf.index((n_iter - 1) % STAGES).reshape([BN, D]), acc, is_async=True)
        acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))

        l_o = gl.convert_layout(l_i, row_o)
        o = acc / gl.expand_dims(l_o, 1)
        lse = gl.convert_layout(m_i + gl.log2(l_i), row_o)
        e_o = gl.convert_layout(e, row_o).to(gl.int64)
        ok = gl.convert_layout(valid, row_o)
        d_o = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
        gl.store(OP + gl.expand_dims(e_o * D, 1) + gl.expand_dims(d_o, 0), o.to(OP.dtype.element_ty),
                 mask=gl.expand_dims(ok, 1))  # fmt: skip
        gl.store(LSEP + e_o, lse, mask=ok)


def hopper_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, nsplit: int) -> bool:
    """Whether `attend_tiles_hopper` can run these inputs: sm_90, one key split, D 64/128, TMA-able K/V."""
    if not (q.is_cuda and torch.cuda.get_device_capability(q.device)[0] == 9 and nsplit == 1):
        return False
    es = k.element_size()
    return q.shape[3] in (64, 128) and all(
        t.stride(3) == 1 and t.stride(0) == t.shape[1] * t.stride(1) and t.data_ptr() % 16 == 0
        and t.stride(1) * es % 16 == 0 and t.stride(2) * es % 16 == 0
        for t in (k, v)
    )  # fmt: skip


def _desc(t: torch.Tensor, bn: int) -> TensorDescriptor:
    B, H, T, D = t.shape
    flat = t.as_strided((B * H, T, D), (t.stride(1), t.stride(2), 1))
    dt = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for([1, bn, D], dt)
    return TensorDescriptor(flat, [B * H, T, D], [t.stride(1), t.stride(2), 1], [1, bn, D], layout)


def attend_tiles_hopper(q, k, v, blk, tiles, op, lsep, *, q_off, pos0, block_size, scale, bm=128, bn=128,
                        stages=2, warps=8):  # fmt: skip
    """The Gluon tile kernel for one query chunk (arguments as `attend_tiles` with nsplit 1)."""
    B, Hq, C, S = blk.shape
    Hkv, Tk, D = k.shape[1], k.shape[2], k.shape[3]
    _gl_tile_kernel[(tiles["n_tiles"],)](
        q, _desc(k, bn), _desc(v, bn), op, lsep, tiles["perm"], tiles["tile_key"], tiles["tile_end"],
        tiles["key_off"], tiles["key_cnt"], *q.stride()[:3], C, Hq, S, Hkv, -(-Tk // block_size), tiles["n_keys"],
        q_off, pos0, Tk, block_size, scale * 1.4426950408889634,
        D=D, BM=bm, BN=bn, STAGES=stages, num_warps=warps,
    )  # fmt: skip
