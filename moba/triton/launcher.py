"""`triton_moba_attention`: chunking, path choice and buffers around the Triton MoBA kernels.

Queries go in chunks sized so that the partial results of a chunk fit in PARTIAL_BUDGET bytes.
Per chunk: the routing kernel writes the blocks table, then either the split-K decode kernel (few
query rows per KV head) or the key-block tile kernel (a CSR of the table, moba/triton/csr.py)
writes partials, and the merge kernel writes the output rows. Nothing waits on the host. The tile
kernel is the warp-specialized Gluon one (moba/triton/hopper.py) on Hopper where it applies and the GPU is
in EXCLUSIVE_PROCESS compute mode (`tile_kernel`): the Gluon kernel has hung when processes time-slice a
GPU (moba/triton/compute_mode.py), so a GPU in the default shared mode gets the Triton tile kernel, about
3% slower at 1M. Why these sizes and configurations: bench/RESULTS.md.
Inputs outside the kernels' range (fp32, head dims other than 64/128/256, CPU tensors without the
Triton interpreter) go to the portable path. It knows nothing of files or models.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from moba.portable import portable_moba_attention
from moba.routing import block_means
from moba.triton import compute_mode
from moba.triton.attention import attend_tiles
from moba.triton.csr import build_tiles
from moba.triton.decode import attend_rows, key_splits, merge_partials, partials
from moba.triton.routing import pool_means, route_chunk, split_means
from moba.types import Routing, settled_blocks

PARTIAL_BUDGET = 7 << 28  # bytes of partials per query chunk: fewer chunks, fewer part-filled tiles
DECODE_ROWS = 16  # at most this many query rows per KV head in a chunk: the split-K decode kernel
HEAD_DIMS = (64, 128, 256)
# Triton tile kernel per head dim; K/V go through tensor descriptors where `attention.tma_ok` holds.
TILE_CONFIGS = {
    64: dict(BM=128, BN=128, warps=8, stages=3),
    128: dict(BM=128, BN=128, warps=8, stages=3),
    256: dict(BM=64, BN=32, warps=8, stages=2),
}


def triton_moba_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int,
    top_k: int,
    sink_blocks: int = 0,
    scale: float | None = None,
    return_routing: bool = False,
    key_means: torch.Tensor | None = None,
    local_blocks: int = 0,
    gate_subblocks: int = 1,
):
    """MoBA attention with the Triton kernels; arguments and result: `moba.types.MobaKernel`.

    The kernels take fp16 or bf16 with D in {64, 128, 256} on CUDA (or under TRITON_INTERPRET=1)
    and the plain gate (local_blocks 0, gate_subblocks 1); anything else, or a scale <= 0, is
    computed by `moba.portable_moba_attention`.
    """
    top_k, sink_blocks, local_blocks = settled_blocks(q, k, v, block_size, top_k, sink_blocks, local_blocks, gate_subblocks)
    plain_gate = local_blocks == 0 and gate_subblocks == 1
    if not plain_gate or not _supported(q, k, v) or (scale is not None and scale <= 0):
        return portable_moba_attention(
            q, k, v, block_size=block_size, top_k=top_k, sink_blocks=sink_blocks, scale=scale,
            return_routing=return_routing, key_means=key_means, local_blocks=local_blocks,
            gate_subblocks=gate_subblocks,
        )  # fmt: skip
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    means = _means(k, block_size, key_means)
    out = torch.empty_like(q)
    S = top_k + sink_blocks
    routing = _routing_buffers(q, S) if return_routing else None
    step = chunk_queries(B, Hq, Tq, S, D, q.element_size())
    parts = split_means(means) if q.dtype == torch.bfloat16 and q.is_cuda and Tq > step else None
    for c0 in range(0, Tq, step):
        C = min(step, Tq - c0)
        blk, scr = route_chunk(
            q, means, c0, C, Tk - Tq + c0, block_size=block_size, top_k=top_k,
            sink_blocks=sink_blocks, scores=return_routing, parts=parts,
        )  # fmt: skip
        _attend_chunk(q, k, v, out, blk, c0, Tk - Tq + c0, block_size, scale)
        if return_routing:
            routing.blocks[:, :, c0 : c0 + C] = blk
            routing.scores[:, :, c0 : c0 + C] = scr
    return (out, routing) if return_routing else out


def chunk_queries(B: int, Hq: int, Tq: int, S: int, D: int, esize: int) -> int:
    """Queries per chunk so that the chunk's partials (output rows + log-sum-exps) fit the budget."""
    per_query = B * Hq * S * (D * esize + 4)
    return max(1, min(Tq, PARTIAL_BUDGET // per_query))


def serves(dtype: torch.dtype, head_dim: int) -> bool:
    """True when the kernels take CUDA tensors of this dtype and head dim (else the portable path runs)."""
    return dtype in (torch.float16, torch.bfloat16) and head_dim in HEAD_DIMS


def _supported(q, k, v) -> bool:
    on_device = q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    same = q.dtype == k.dtype == v.dtype and q.device == k.device == v.device
    return on_device and same and serves(q.dtype, q.shape[3])


def _means(k, block_size, key_means):
    if key_means is not None:
        return key_means.float().contiguous()
    if k.is_cuda:
        return pool_means(k, block_size)
    return block_means(k, block_size)


def _routing_buffers(q, S):
    B, Hq, Tq, _ = q.shape
    blocks = torch.empty(B, Hq, Tq, S, dtype=torch.long, device=q.device)
    return Routing(blocks=blocks, scores=torch.empty(B, Hq, Tq, S, device=q.device))


def _attend_chunk(q, k, v, out, blk, c0, pos0, block_size, scale) -> None:
    Hkv, D = k.shape[1], q.shape[3]
    if blk.shape[2] * blk.shape[1] // Hkv <= DECODE_ROWS:  # query rows per KV head
        attend_rows(q, k, v, blk, out, q_off=c0, pos0=pos0, block_size=block_size, scale=scale)
        return
    cfg = TILE_CONFIGS[D]
    nsplit = key_splits(triton.cdiv(blk.numel(), cfg["BM"]), q.device, block_size, cfg["BN"])
    op, lsep = partials(blk, nsplit, D, q.dtype)
    bm, attend = tile_kernel(q, k, v, nsplit)
    tiles = build_tiles(blk, Hkv, triton.cdiv(k.shape[2], block_size), bm)
    attend(q, k, v, blk, tiles, op, lsep, q_off=c0, pos0=pos0, block_size=block_size, scale=scale)
    merge_partials(op, lsep, blk, out, q_off=c0, nsplit=nsplit)


def tile_kernel(q, k, v, nsplit: int):
    """(tile rows, kernel) of the tile path: Gluon's where it applies on an exclusive-process GPU, else Triton's.

    The kernel is called as kernel(q, k, v, blk, tiles, op, lsep, *, q_off, pos0, block_size, scale),
    tiles cut with that many rows (`build_tiles`).
    """
    hopper = _hopper_module()
    gluon = hopper is not None and hopper.hopper_ok(q, k, v, nsplit)
    if gluon and compute_mode.exclusive_process(q.device.index):  # the device is CUDA once hopper_ok holds
        return hopper.BM, hopper.attend_tiles_hopper
    cfg = TILE_CONFIGS[q.shape[3]]
    return cfg["BM"], functools.partial(attend_tiles, nsplit=nsplit, cfg=cfg)


def gluon_withheld(device: str, head_dim: int) -> bool:
    """True where `tile_kernel` would take the Gluon kernel for this head dim but for the GPU's compute mode
    (shared, not EXCLUSIVE_PROCESS), so the Triton tile kernel runs: a speed difference callers may state."""
    hopper = _hopper_module()
    if hopper is None or head_dim not in hopper.HEAD_DIMS or not torch.cuda.is_available():
        return False
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    return hopper.is_hopper(index) and not compute_mode.exclusive_process(index)


@functools.cache
def _hopper_module():
    """moba.triton.hopper, or None where this Triton has no Gluon."""
    try:
        from moba.triton import hopper
    except ImportError:
        return None
    return hopper
