"""An experiment: the warp-specialized tile kernel (moba/triton/hopper.py) with three options, for sm_90.

Same contract as `attend_tiles` with one key split (moba/triton/attention.py). A tile is NC * 64
gathered (query, head) rows of one key block. Partitions: NC consumer warpgroups (64 rows each; the
FlashAttention-3 in-warpgroup overlap of QK^T, softmax and P.V) and one producer warp streaming K/V
by TMA through a ring of STAGES slots. Options:
- pingpong: the consumers take turns issuing their wgmmas (an mbarrier per consumer, round robin),
  so one's softmax overlaps another's matrix work (FlashAttention-3's inter-warpgroup schedule);
- persistent (grid of one CTA per SM looping over tiles) or one CTA per tile: the same code, a loop
  over t = pid, pid + grid, ...; every partition decodes each tile itself;
- NC 2 or 3 consumers (128- or 192-row tiles: less K/V traffic per FLOP with 3).
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

from bench.experiments.hopper_tile import _desc, hopper_ok
from moba.triton.hopper import _masked

ROWS = gl.constexpr(64)  # rows per consumer warpgroup


@gluon.jit
def _tile(PERM, TILE_KEY, TILE_END, KEY_CNT, KEY_OFF, t, n_keys, NB, S, C, pos0, block_size,
          BM: gl.constexpr, BMP: gl.constexpr, BN: gl.constexpr, layout: gl.constexpr):  # fmt: skip
    """Tile t: its key (clamped), first CSR row, K/V row base, key range start and number of key tiles (0: none)."""
    key = gl.load(TILE_KEY + t).to(gl.int32)
    live = key < n_keys
    key = gl.minimum(key, n_keys - 1)
    cnt = gl.load(KEY_CNT + key).to(gl.int32)
    row0 = (t - (gl.load(TILE_END + key).to(gl.int32) - (cnt + BM - 1) // BM)) * BM
    r = row0 + gl.arange(0, BMP, layout=layout)
    valid = (r < cnt) & (r < row0 + BM)
    e = gl.load(PERM + gl.load(KEY_OFF + key) + r, mask=valid, other=0)
    lo = (key % NB) * block_size
    hi = gl.minimum(lo + block_size, gl.max(gl.where(valid, pos0 + (e // S) % C, 0), 0) + 1)
    return key, row0, key // NB, lo, hi, gl.where(live, gl.cdiv(hi - lo, BN), 0)


@gluon.jit
def _producer(args):
    (k_desc, v_desc, k_buf, v_buf, q_smem, ready, empty, turn, Q, OP, LSEP, PERM, TILE_KEY, TILE_END, KEY_OFF,
     KEY_CNT, sqb, sqh, sqt, C, Hq, S, NB, n_keys, n_tiles, q_off, pos0, Tk, block_size, qk_scale, pingpong) = args  # fmt: skip
    STAGES: gl.constexpr = k_buf.type.shape[0]
    BN: gl.constexpr = k_buf.type.shape[2]
    BM: gl.constexpr = q_smem.type.shape[0] * ROWS
    BMP: gl.constexpr = 256 if BM > 128 else 128
    rows: gl.constexpr = gl.BlockedLayout([BMP // 32], [32], [1], [0])
    it = 0
    for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        key, row0, bh, lo, hi, n_iter = _tile(PERM, TILE_KEY, TILE_END, KEY_CNT, KEY_OFF, t, n_keys, NB, S, C, pos0,
                                              block_size, BM, BMP, BN, rows)  # fmt: skip
        for i in range(n_iter):
            slot = it % STAGES
            mbarrier.wait(empty.index(slot), ((it // STAGES) & 1) ^ 1)
            bar = ready.index(slot)
            mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [bh, lo + i * BN, 0], bar, k_buf.index(slot))
            tma.async_copy_global_to_shared(v_desc, [bh, lo + i * BN, 0], bar, v_buf.index(slot))
            it += 1


@gluon.jit
def _my_turn(turn, g, CID: gl.constexpr, pingpong):
    if pingpong:
        mbarrier.wait(turn.index(CID), g & 1)


@gluon.jit
def _pass_turn(turn, CID: gl.constexpr, NC: gl.constexpr, pingpong):
    if pingpong:
        mbarrier.arrive(turn.index((CID + 1) % NC), count=1)


@gluon.jit
def _load_q(Q, q, PERM, KEY_OFF, KEY_CNT, key, row0, sqh, sqt, S, C, Hq, q_off, D: gl.constexpr,
            layout: gl.constexpr):  # fmt: skip
    """This consumer's 64 query rows of the tile into shared memory q (batch 1)."""
    cnt = gl.load(KEY_CNT + key).to(gl.int32)
    r = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
    e = gl.load(PERM + gl.load(KEY_OFF + key) + r, mask=r < cnt, other=0)
    rows = Q + ((e // (S * C)) % Hq).to(gl.int64) * sqh + (q_off + (e // S) % C).to(gl.int64) * sqt
    d = gl.arange(0, D, layout=gl.SliceLayout(0, layout))
    q.store(gl.load(gl.expand_dims(rows, 1) + gl.expand_dims(d, 0), mask=gl.expand_dims(r < cnt, 1), other=0.0))
    fence_async_shared()
    gl.thread_barrier()


@gluon.jit
def _consumer(args, CID: gl.constexpr, NC: gl.constexpr):
    (k_desc, v_desc, k_buf, v_buf, q_smem, ready, empty, turn, Q, OP, LSEP, PERM, TILE_KEY, TILE_END, KEY_OFF,
     KEY_CNT, sqb, sqh, sqt, C, Hq, S, NB, n_keys, n_tiles, q_off, pos0, Tk, block_size, qk_scale, pingpong) = args  # fmt: skip
    STAGES: gl.constexpr = k_buf.type.shape[0]
    BN: gl.constexpr = k_buf.type.shape[2]
    D: gl.constexpr = k_buf.type.shape[3]
    BM: gl.constexpr = q_smem.type.shape[0] * ROWS
    BMP: gl.constexpr = 256 if BM > 128 else 128
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    q_ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    rows: gl.constexpr = gl.BlockedLayout([BMP // 128], [32], [4], [0])
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    q = q_smem.index(CID)
    zero_s = gl.zeros([ROWS, BN], gl.float32, s_layout)
    it = 0
    g = 0
    for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        key, row0, bh, lo, hi, n_iter = _tile(PERM, TILE_KEY, TILE_END, KEY_CNT, KEY_OFF, t, n_keys, NB, S, C, pos0,
                                              block_size, BM, BMP, BN, rows)  # fmt: skip
        if n_iter > 0:
            row0 += CID * ROWS
            _load_q(Q, q, PERM, KEY_OFF, KEY_CNT, key, row0, sqh, sqt, S, C, Hq, q_off, D, q_ld)
            cnt = gl.load(KEY_CNT + key).to(gl.int32)
            r = row0 + gl.arange(0, ROWS, layout=row_s)
            valid = r < cnt
            e = gl.load(PERM + gl.load(KEY_OFF + key) + r, mask=valid, other=0)
            pos = gl.where(valid, pos0 + (e // S) % C, Tk)
            mask_from = gl.minimum(gl.min(pos, 0) + 1, hi)

            _my_turn(turn, g, CID, pingpong)
            mbarrier.wait(ready.index(it % STAGES), (it // STAGES) & 1)
            s = warpgroup_mma(q, k_buf.index(it % STAGES).reshape([BN, D]).permute((1, 0)), zero_s, use_acc=False,
                              is_async=True)  # fmt: skip
            _pass_turn(turn, CID, NC, pingpong)
            g += 1
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
            s = _masked(s, lo, mask_from, pos, hi, qk_scale, BN, s_layout)
            m_i = gl.max(s, 1)
            p = gl.exp2(s - gl.expand_dims(m_i, 1))
            l_i = gl.sum(p, 1)
            acc = gl.zeros([ROWS, D], gl.float32, o_layout)
            for i in range(1, n_iter):
                slot = (it + i) % STAGES
                prev = (it + i - 1) % STAGES
                p_op = gl.convert_layout(p.to(Q.dtype.element_ty), p_layout)
                _my_turn(turn, g, CID, pingpong)
                mbarrier.wait(ready.index(slot), ((it + i) // STAGES) & 1)
                s = warpgroup_mma(q, k_buf.index(slot).reshape([BN, D]).permute((1, 0)), zero_s, use_acc=False,
                                  is_async=True)  # fmt: skip
                acc = warpgroup_mma(p_op, v_buf.index(prev).reshape([BN, D]), acc, is_async=True)
                _pass_turn(turn, CID, NC, pingpong)
                g += 1
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
            last = (it + n_iter - 1) % STAGES
            p_op = gl.convert_layout(p.to(Q.dtype.element_ty), p_layout)
            _my_turn(turn, g, CID, pingpong)
            acc = warpgroup_mma(p_op, v_buf.index(last).reshape([BN, D]), acc, is_async=True)
            _pass_turn(turn, CID, NC, pingpong)
            g += 1
            acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
            mbarrier.arrive(empty.index(last), count=1)
            it += n_iter

            o = acc / gl.expand_dims(gl.convert_layout(l_i, row_o), 1)
            e_o = gl.convert_layout(e, row_o).to(gl.int64)
            ok = gl.convert_layout(valid, row_o)
            d = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
            gl.store(OP + gl.expand_dims(e_o * D, 1) + gl.expand_dims(d, 0), o.to(OP.dtype.element_ty),
                     mask=gl.expand_dims(ok, 1))  # fmt: skip
            gl.store(LSEP + e_o, gl.convert_layout(m_i + gl.log2(l_i), row_o), mask=ok)


@gluon.jit
def _consumer0_2(args):
    _consumer(args, 0, 2)


@gluon.jit
def _consumer1_2(args):
    _consumer(args, 1, 2)


@gluon.jit
def _consumer0_3(args):
    _consumer(args, 0, 3)


@gluon.jit
def _consumer1_3(args):
    _consumer(args, 1, 3)


@gluon.jit
def _consumer2_3(args):
    _consumer(args, 2, 3)


@gluon.jit
def _ws2_kernel(
    Q, k_desc, v_desc, OP, LSEP, PERM, TILE_KEY, TILE_END, KEY_OFF, KEY_CNT,
    sqb, sqh, sqt, C, Hq, S, NB, n_keys, n_tiles, q_off, pos0, Tk, block_size, qk_scale, pingpong,
    D: gl.constexpr, NC: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr,
    PRODUCER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr,
):  # fmt: skip
    q_smem = gl.allocate_shared_memory(Q.dtype.element_ty, [NC, ROWS, D],
                                       gl.NVMMASharedLayout.get_default_for([ROWS, D], Q.dtype.element_ty))  # fmt: skip
    k_buf = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_buf = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [NC, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=NC)
    for i in gl.static_range(NC):
        mbarrier.init(turn.index(i), count=1)
    fence_async_shared()
    gl.thread_barrier()
    mbarrier.arrive(turn.index(0), count=1)
    args = (k_desc, v_desc, k_buf, v_buf, q_smem, ready, empty, turn, Q, OP, LSEP, PERM, TILE_KEY, TILE_END,
            KEY_OFF, KEY_CNT, sqb, sqh, sqt, C, Hq, S, NB, n_keys, n_tiles, q_off, pos0, Tk, block_size,
            qk_scale, pingpong)  # fmt: skip
    if NC == 2:
        gl.warp_specialize([(_consumer0_2, (args,)), (_consumer1_2, (args,)), (_producer, (args,))], [4, 1],
                           [CONSUMER_REGS, PRODUCER_REGS])  # fmt: skip
    else:
        gl.warp_specialize([(_consumer0_3, (args,)), (_consumer1_3, (args,)), (_consumer2_3, (args,)),
                            (_producer, (args,))], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS])  # fmt: skip


def attend_tiles_ws2(q, k, v, blk, tiles, op, lsep, *, q_off, pos0, block_size, scale, nc=2, bn=128, stages=3,
                     pingpong=False, persistent=False, regs=None, maxnreg=None):  # fmt: skip
    """The kernel for one query chunk (arguments as `attend_tiles`, nsplit 1); tiles built with bm = 64 * nc."""
    B, Hq, C, S = blk.shape
    Tk, D = k.shape[2], k.shape[3]
    assert B == 1, "the experiment decodes b from the key with B = 1 only"
    regs = regs or ((232, 40) if nc == 2 else (160, 24))
    maxnreg = maxnreg or (168 if nc == 2 else 128)
    n_tiles = tiles["n_tiles"]
    grid = min(n_tiles, torch.cuda.get_device_properties(q.device).multi_processor_count) if persistent else n_tiles
    _ws2_kernel[(grid,)](
        q, _desc(k, bn), _desc(v, bn), op, lsep, tiles["perm"], tiles["tile_key"], tiles["tile_end"],
        tiles["key_off"], tiles["key_cnt"], *q.stride()[:3], C, Hq, S, -(-Tk // block_size), tiles["n_keys"],
        n_tiles, q_off, pos0, Tk, block_size, scale * 1.4426950408889634, int(pingpong),
        D=D, NC=nc, BN=bn, STAGES=stages, CONSUMER_REGS=regs[0], PRODUCER_REGS=regs[1],
        num_warps=4, maxnreg=maxnreg,
    )  # fmt: skip


__all__ = ["attend_tiles_ws2", "hopper_ok"]
