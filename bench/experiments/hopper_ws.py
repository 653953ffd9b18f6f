"""An experiment, not yet run on a GPU: the key-block tile kernel in Gluon with warp specialization (sm_90).

Same contract as `attend_tiles` with one key split (moba/triton/attention.py). One program per tile of
BM = 128 gathered (query, head) rows of one key block; three partitions:
- a producer warp streams K/V tiles of the block into a ring of STAGES shared-memory slots by TMA
  (`ready` barriers, expect-tx), and refills a slot once both consumers released it (`empty`, count 2);
- two consumer warpgroups (the default partition and a 4-warp worker) own rows 0-63 and 64-127; each
  runs the in-warpgroup overlap of FlashAttention-3: QK^T of tile i and P.V of tile i-1 in flight
  while the softmax of tile i runs, and writes its rows' partial outputs and base-2 log-sum-exps.
The two consumers run unsynchronised, so the warp schedulers can overlap one's softmax with the
other's wgmma (FA3 enforces that ping-pong with named barriers; this does not).
Compared with bench/experiments/hopper_tile.py there is no CTA-wide barrier per key tile.
Layout: K/V are read through [B * Hkv, Tk, D] tensor descriptors, so k.stride(0) == Hkv * k.stride(1).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from bench.experiments.hopper_tile import _desc, hopper_ok

HALF = gl.constexpr(64)  # rows per consumer warpgroup


@gluon.jit
def _tile_rows(PERM, TILE_END, KEY_OFF, KEY_CNT, key, S, C, Hq, pos0, Tk, first, N: gl.constexpr,
               layout: gl.constexpr):  # fmt: skip
    """Entries, query index, head, validity and position of N rows of this program's tile from row `first`."""
    cnt = gl.load(KEY_CNT + key).to(gl.int32)
    local = gl.program_id(0) - (gl.load(TILE_END + key).to(gl.int32) - (cnt + 2 * HALF - 1) // (2 * HALF))
    r = local * (2 * HALF) + first + gl.arange(0, N, layout=layout)
    valid = r < cnt
    e = gl.load(PERM + gl.load(KEY_OFF + key) + r, mask=valid, other=0)
    c = (e // S) % C
    return e, c, (e // (S * C)) % Hq, valid, gl.where(valid, pos0 + c, Tk)


@gluon.jit
def _producer(args):
    (k_desc, v_desc, k_buf, v_buf, ready, empty, q_smem, Q, OP, LSEP, PERM, TILE_END, KEY_OFF, KEY_CNT,
     key, S, C, Hq, pos0, Tk, bh, lo, hi, n_iter, qk_scale) = args  # fmt: skip
    STAGES: gl.constexpr = k_buf.type.shape[0]
    BN: gl.constexpr = k_buf.type.shape[2]
    for t in range(n_iter):
        slot = t % STAGES
        mbarrier.wait(empty.index(slot), ((t // STAGES) & 1) ^ 1)
        bar = ready.index(slot)
        mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [bh, lo + t * BN, 0], bar, k_buf.index(slot))
        tma.async_copy_global_to_shared(v_desc, [bh, lo + t * BN, 0], bar, v_buf.index(slot))


@gluon.jit
def _masked(s, n0, mask_from, pos, hi, qk_scale, BN: gl.constexpr, layout: gl.constexpr):
    """Scaled base-2 scores; keys past a row's position or past hi are -inf."""
    s = s * qk_scale
    if n0 + BN > mask_from:
        n = n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, layout))
        keep = (gl.expand_dims(n, 0) <= gl.expand_dims(pos, 1)) & gl.expand_dims(n < hi, 0)
        s = gl.where(keep, s, float("-inf"))
    return s


@gluon.jit
def _consumer(args, CID: gl.constexpr):
    (k_desc, v_desc, k_buf, v_buf, ready, empty, q_smem, Q, OP, LSEP, PERM, TILE_END, KEY_OFF, KEY_CNT,
     key, S, C, Hq, pos0, Tk, bh, lo, hi, n_iter, qk_scale) = args  # fmt: skip
    STAGES: gl.constexpr = k_buf.type.shape[0]
    BN: gl.constexpr = k_buf.type.shape[2]
    D: gl.constexpr = k_buf.type.shape[3]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    e, c, h, valid, pos = _tile_rows(PERM, TILE_END, KEY_OFF, KEY_CNT, key, S, C, Hq, pos0, Tk, CID * HALF, HALF,
                                     row_s)  # fmt: skip
    mask_from = gl.minimum(gl.min(pos, 0) + 1, hi)
    q = q_smem.slice(CID * HALF, HALF, dim=0)
    zero_s = gl.zeros([HALF, BN], gl.float32, s_layout)

    mbarrier.wait(ready.index(0), 0)
    s = warpgroup_mma(q, k_buf.index(0).reshape([BN, D]).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
    s = _masked(s, lo, mask_from, pos, hi, qk_scale, BN, s_layout)
    m_i = gl.max(s, 1)
    p = gl.exp2(s - gl.expand_dims(m_i, 1))
    l_i = gl.sum(p, 1)
    acc = gl.zeros([HALF, D], gl.float32, o_layout)
    for i in range(1, n_iter):
        slot = i % STAGES
        prev = (i - 1) % STAGES
        mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
        s = warpgroup_mma(q, k_buf.index(slot).reshape([BN, D]).permute((1, 0)), zero_s, use_acc=False,
                          is_async=True)  # fmt: skip
        p_op = gl.convert_layout(p.to(Q.dtype.element_ty), p_layout)
        acc = warpgroup_mma(p_op, v_buf.index(prev).reshape([BN, D]), acc, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))
        s = _masked(s, lo + i * BN, mask_from, pos, hi, qk_scale, BN, s_layout)
        m_new = gl.maximum(m_i, gl.max(s, 1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s - gl.expand_dims(m_new, 1))
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
        acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
        mbarrier.arrive(empty.index(prev), count=1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
    last = (n_iter - 1) % STAGES
    p_op = gl.convert_layout(p.to(Q.dtype.element_ty), p_layout)
    acc = warpgroup_mma(p_op, v_buf.index(last).reshape([BN, D]), acc, is_async=True)
    acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
    mbarrier.arrive(empty.index(last), count=1)

    o = acc / gl.expand_dims(gl.convert_layout(l_i, row_o), 1)
    e_o = gl.convert_layout(e, row_o).to(gl.int64)
    ok = gl.convert_layout(valid, row_o)
    d = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    gl.store(OP + gl.expand_dims(e_o * D, 1) + gl.expand_dims(d, 0), o.to(OP.dtype.element_ty),
             mask=gl.expand_dims(ok, 1))  # fmt: skip
    gl.store(LSEP + e_o, gl.convert_layout(m_i + gl.log2(l_i), row_o), mask=ok)


@gluon.jit
def _consumer1(args):
    _consumer(args, 1)


@gluon.jit
def _ws_tile_kernel(
    Q, k_desc, v_desc, OP, LSEP, PERM, TILE_KEY, TILE_END, KEY_OFF, KEY_CNT,
    sqb, sqh, sqt, C, Hq, S, Hkv, NB, n_keys, q_off, pos0, Tk, block_size, qk_scale,
    D: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr, PRODUCER_REGS: gl.constexpr,
    CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr,
):  # fmt: skip
    key = gl.load(TILE_KEY + gl.program_id(0)).to(gl.int32)
    if key < n_keys:
        q_ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        b, kvh, j = key // (Hkv * NB), (key // NB) % Hkv, key % NB
        e, c, h, valid, pos = _tile_rows(PERM, TILE_END, KEY_OFF, KEY_CNT, key, S, C, Hq, pos0, Tk, 0, 2 * HALF,
                                         gl.SliceLayout(1, q_ld))  # fmt: skip
        d = gl.arange(0, D, layout=gl.SliceLayout(0, q_ld))
        q_rows = Q + b.to(gl.int64) * sqb + h.to(gl.int64) * sqh + (q_off + c).to(gl.int64) * sqt
        q = gl.load(gl.expand_dims(q_rows, 1) + gl.expand_dims(d, 0), mask=gl.expand_dims(valid, 1), other=0.0)
        q_smem = gl.allocate_shared_memory(Q.dtype.element_ty, [2 * HALF, D],
                                           gl.NVMMASharedLayout.get_default_for([2 * HALF, D], Q.dtype.element_ty))  # fmt: skip
        q_smem.store(q)
        k_buf = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
        v_buf = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)
        fence_async_shared()
        gl.thread_barrier()
        lo = j * block_size
        hi = gl.minimum(lo + block_size, gl.max(gl.where(valid, pos, 0), 0) + 1)
        args = (k_desc, v_desc, k_buf, v_buf, ready, empty, q_smem, Q, OP, LSEP, PERM, TILE_END, KEY_OFF, KEY_CNT,
                key, S, C, Hq, pos0, Tk, b * Hkv + kvh, lo, hi, gl.cdiv(hi - lo, BN), qk_scale)  # fmt: skip
        gl.warp_specialize([(_consumer, (args, 0)), (_consumer1, (args,)), (_producer, (args,))], [4, 1],
                           [CONSUMER_REGS, PRODUCER_REGS])  # fmt: skip


def attend_tiles_ws(q, k, v, blk, tiles, op, lsep, *, q_off, pos0, block_size, scale, bn=128, stages=2,
                    regs=(232, 40), maxnreg=168):  # fmt: skip
    """The warp-specialized Gluon tile kernel for one query chunk (arguments as `attend_tiles`, nsplit 1, BM 128)."""
    B, Hq, C, S = blk.shape
    Hkv, Tk, D = k.shape[1], k.shape[2], k.shape[3]
    _ws_tile_kernel[(tiles["n_tiles"],)](
        q, _desc(k, bn), _desc(v, bn), op, lsep, tiles["perm"], tiles["tile_key"], tiles["tile_end"],
        tiles["key_off"], tiles["key_cnt"], *q.stride()[:3], C, Hq, S, Hkv, -(-Tk // block_size), tiles["n_keys"],
        q_off, pos0, Tk, block_size, scale * 1.4426950408889634,
        D=D, BN=bn, STAGES=stages, CONSUMER_REGS=regs[0], PRODUCER_REGS=regs[1], num_warps=4, maxnreg=maxnreg,
    )  # fmt: skip


__all__ = ["attend_tiles_ws", "hopper_ok"]
