"""The key-block tile kernel for Hopper (sm_90) in Gluon, warp-specialized; used by the launcher there.

The launcher takes it only on a GPU in EXCLUSIVE_PROCESS compute mode (`nvidia-smi -c EXCLUSIVE_PROCESS`):
with three processes time-slicing one H200 it hung in all three (cause unknown), while one process per GPU
never did (bench/hang_probe.py, bench/RESULTS.md, moba/triton/compute_mode.py). On a GPU in the default
(shared) mode the Triton tile kernel runs.

Same contract as `attend_tiles` (moba/triton/attention.py) with one key split: one program per tile
of 128 gathered (query, head) rows of one (batch, KV head, key block), partial outputs and base-2
log-sum-exps per entry. What it adds is the schedule of FlashAttention-3. The tile's queries are
gathered into shared memory (cp.async, tracked by `q_bar`) while three partitions start: a producer
warp streams the block's K/V tiles by TMA into a ring of STAGES shared-memory slots (`ready`
barriers with expected bytes; a slot is refilled once both consumers released it on `empty`), and
two consumer warpgroups own rows 0-63 and 64-127 and overlap, inside each warpgroup, the QK^T wgmma
of key tile i and the P.V wgmma of tile i-1 with the softmax of tile i; register reallocation gives
them 232 registers a thread and the producer 40. Its time against the Triton kernel's, and the
schedules measured and not kept (ping-pong consumers, persistent CTAs, three consumers), are in
bench/RESULTS.md.
It knows nothing of routing and needs CUDA with compute capability 9.x and Triton's Gluon.
Layout: q [B, Hq, Tq, D]; k, v [B, Hkv, Tk, D] read through 4-D tensor descriptors.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from moba.triton.attention import tma_ok

HALF = gl.constexpr(64)  # rows per consumer warpgroup; a tile is 2 * HALF rows
BM = 128  # rows of a tile (the CSR must be cut with this)
BN = 128  # keys of a K/V tile
HEAD_DIMS = (64, 128)  # head dims the kernel takes
STAGES = 3  # K/V ring slots: 3 * 64 KiB + 32 KiB of Q at D 128
REGS = (232, 40)  # consumer and producer registers per thread after reallocation
MAXNREG = 168  # 65,536 registers over the 12 warps at launch


@gluon.jit
def _tile_rows(PERM, TILE_ROW, TILE_ROWS, S, C, Hq, pos0, Tk, first, N: gl.constexpr, layout: gl.constexpr):
    """Entries, query index, head, validity and position of N rows of this program's tile from row `first`."""
    i = first + gl.arange(0, N, layout=layout)
    valid = i < gl.load(TILE_ROWS + gl.program_id(0))
    e = gl.load(PERM + gl.load(TILE_ROW + gl.program_id(0)) + i, mask=valid, other=0)
    c = (e // S) % C
    return e, c, (e // (S * C)) % Hq, valid, gl.where(valid, pos0 + c, Tk)


@gluon.jit
def _producer(args):
    (k_desc, v_desc, k_buf, v_buf, ready, empty, q_smem, q_bar, Q, OP, LSEP, PERM, TILE_ROW, TILE_ROWS,
     S, C, Hq, pos0, Tk, b, kvh, lo, hi, n_iter, qk_scale) = args  # fmt: skip
    NS: gl.constexpr = k_buf.type.shape[0]
    BLOCK_N: gl.constexpr = k_buf.type.shape[3]
    for t in range(n_iter):
        slot = t % NS
        mbarrier.wait(empty.index(slot), ((t // NS) & 1) ^ 1)
        bar = ready.index(slot)
        mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [b, kvh, lo + t * BLOCK_N, 0], bar, k_buf.index(slot))
        tma.async_copy_global_to_shared(v_desc, [b, kvh, lo + t * BLOCK_N, 0], bar, v_buf.index(slot))


@gluon.jit
def _masked(s, n0, mask_from, pos, hi, qk_scale, BLOCK_N: gl.constexpr, layout: gl.constexpr):
    """Scaled base-2 scores; keys past a row's position or past hi are -inf."""
    s = s * qk_scale
    if n0 + BLOCK_N > mask_from:
        n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))
        keep = (gl.expand_dims(n, 0) <= gl.expand_dims(pos, 1)) & gl.expand_dims(n < hi, 0)
        s = gl.where(keep, s, float("-inf"))
    return s


@gluon.jit
def _consumer(args, CID: gl.constexpr):
    (k_desc, v_desc, k_buf, v_buf, ready, empty, q_smem, q_bar, Q, OP, LSEP, PERM, TILE_ROW, TILE_ROWS,
     S, C, Hq, pos0, Tk, b, kvh, lo, hi, n_iter, qk_scale) = args  # fmt: skip
    NS: gl.constexpr = k_buf.type.shape[0]
    BLOCK_N: gl.constexpr = k_buf.type.shape[3]
    D: gl.constexpr = k_buf.type.shape[4]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])  # fmt: skip
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    e, c, h, valid, pos = _tile_rows(PERM, TILE_ROW, TILE_ROWS, S, C, Hq, pos0, Tk, CID * HALF, HALF,
                                     gl.SliceLayout(1, s_layout))  # fmt: skip
    mask_from = gl.minimum(gl.min(pos, 0) + 1, hi)
    q = q_smem.slice(CID * HALF, HALF, dim=0)
    zero_s = gl.zeros([HALF, BLOCK_N], gl.float32, s_layout)
    mbarrier.wait(q_bar, 0)
    fence_async_shared()

    mbarrier.wait(ready.index(0), 0)
    s = warpgroup_mma(q, _kv(k_buf, 0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
    s = _masked(s, lo, mask_from, pos, hi, qk_scale, BLOCK_N, s_layout)
    m_i = gl.max(s, 1)
    p = gl.exp2(s - gl.expand_dims(m_i, 1))
    l_i = gl.sum(p, 1)
    acc = gl.zeros([HALF, D], gl.float32, o_layout)
    for i in range(1, n_iter):
        slot = i % NS
        prev = (i - 1) % NS
        mbarrier.wait(ready.index(slot), (i // NS) & 1)
        s = warpgroup_mma(q, _kv(k_buf, slot).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        p_op = gl.convert_layout(p.to(Q.dtype.element_ty), p_layout)
        acc = warpgroup_mma(p_op, _kv(v_buf, prev), acc, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))
        s = _masked(s, lo + i * BLOCK_N, mask_from, pos, hi, qk_scale, BLOCK_N, s_layout)
        m_new = gl.maximum(m_i, gl.max(s, 1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s - gl.expand_dims(m_new, 1))
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
        acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
        mbarrier.arrive(empty.index(prev), count=1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
    last = (n_iter - 1) % NS
    p_op = gl.convert_layout(p.to(Q.dtype.element_ty), p_layout)
    acc = warpgroup_mma(p_op, _kv(v_buf, last), acc, is_async=True)
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
def _kv(buf, slot):
    """Slot `slot` of a K/V ring as a [BN, D] shared-memory tile."""
    return buf.index(slot).reshape([buf.type.shape[3], buf.type.shape[4]])


@gluon.jit
def _consumer1(args):
    _consumer(args, 1)


@gluon.jit
def _ws_tile_kernel(
    Q, k_desc, v_desc, OP, LSEP, PERM, TILE_KEY, TILE_ROW, TILE_ROWS,
    sqb, sqh, sqt, C, Hq, S, Hkv, NB, n_keys, q_off, pos0, Tk, block_size, qk_scale,
    D: gl.constexpr, NS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
    CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr,
):  # fmt: skip
    key = gl.load(TILE_KEY + gl.program_id(0)).to(gl.int32)
    if key < n_keys:
        q_ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        b, kvh, j = key // (Hkv * NB), (key // NB) % Hkv, key % NB
        e, c, h, valid, pos = _tile_rows(PERM, TILE_ROW, TILE_ROWS, S, C, Hq, pos0, Tk, 0, 2 * HALF,
                                         gl.SliceLayout(1, q_ld))  # fmt: skip
        q_smem = gl.allocate_shared_memory(Q.dtype.element_ty, [2 * HALF, D],
                                           gl.NVMMASharedLayout.get_default_for([2 * HALF, D], Q.dtype.element_ty))  # fmt: skip
        k_buf = gl.allocate_shared_memory(k_desc.dtype, [NS] + k_desc.block_type.shape, k_desc.layout)
        v_buf = gl.allocate_shared_memory(v_desc.dtype, [NS] + v_desc.block_type.shape, v_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NS):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)
        mbarrier.init(q_bar, count=num_warps * 32)
        fence_async_shared()
        gl.thread_barrier()
        d = gl.arange(0, D, layout=gl.SliceLayout(0, q_ld))
        q_off_rows = b.to(gl.int64) * sqb + h.to(gl.int64) * sqh + (q_off + c).to(gl.int64) * sqt
        q_rows = Q + gl.multiple_of(q_off_rows, 8)  # hopper_ok: 16-byte aligned rows
        q_ptrs = gl.expand_dims(q_rows, 1) + gl.expand_dims(d, 0)
        # the queries arrive by cp.async, so the producer's first K/V loads overlap them
        async_copy.async_copy_global_to_shared(q_smem, q_ptrs, mask=gl.expand_dims(valid, 1))
        async_copy.mbarrier_arrive(q_bar, increment_count=False)
        lo = j * block_size
        hi = gl.minimum(lo + block_size, gl.max(gl.where(valid, pos, 0), 0) + 1)
        n_iter = gl.cdiv(hi - lo, k_desc.block_type.shape[2])
        args = (k_desc, v_desc, k_buf, v_buf, ready, empty, q_smem, q_bar, Q, OP, LSEP, PERM, TILE_ROW,
                TILE_ROWS, S, C, Hq, pos0, Tk, b, kvh, lo, hi, n_iter, qk_scale)  # fmt: skip
        gl.warp_specialize([(_consumer, (args, 0)), (_consumer1, (args,)), (_producer, (args,))], [4, 1],
                           [CONSUMER_REGS, PRODUCER_REGS])  # fmt: skip


def hopper_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, nsplit: int) -> bool:
    """Whether `attend_tiles_hopper` runs these inputs: sm_90, one key split, D 64/128, 16-byte aligned q/k/v rows."""
    if not (q.is_cuda and nsplit == 1 and q.shape[3] in HEAD_DIMS):
        return False
    return is_hopper(q.device) and all(tma_ok(t) for t in (q, k, v))


def is_hopper(device) -> bool:
    """Whether CUDA `device` has compute capability 9.x, the only one the kernel compiles for."""
    return torch.cuda.get_device_capability(device)[0] == 9


def attend_tiles_hopper(q, k, v, blk, tiles, op, lsep, *, q_off, pos0, block_size, scale):
    """Fill op [entries, D] and lsep [entries] for one query chunk (as `attend_tiles` with nsplit 1).

    q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] fp16/bf16 with `hopper_ok`; tiles from `build_tiles` with bm=BM.
    """
    B, Hq, C, S = blk.shape
    Hkv, Tk, D = k.shape[1], k.shape[2], k.shape[3]
    _ws_tile_kernel[(tiles["n_tiles"],)](
        q, _desc(k), _desc(v), op, lsep, tiles["perm"], tiles["tile_key"], tiles["tile_row"], tiles["tile_rows"],
        *q.stride()[:3], C, Hq, S, Hkv, -(-Tk // block_size), tiles["n_keys"],
        q_off, pos0, Tk, block_size, scale * 1.4426950408889634,
        D=D, NS=STAGES, CONSUMER_REGS=REGS[0],
        PRODUCER_REGS=REGS[1], num_warps=4, maxnreg=MAXNREG,
    )  # fmt: skip


def _desc(t: torch.Tensor) -> TensorDescriptor:
    dt = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for([1, 1, BN, t.shape[3]], dt)
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, BN, t.shape[3]], layout)
