"""Decode attention for one query over static-shape cache buffers, the length held on the device.

CUDA-graph decode replays one captured step for every token, so nothing here may read a value
back to the host or depend on a Python value that changes from token to token. Every function
takes the whole preallocated buffers k, v [B, Hkv, capacity, D] and `length`, an int64 [1]
tensor on their device: the number of valid keys, the query sitting at position length - 1.
Routing (`static_route`) scores every block of the block-sums buffer and masks by the length,
with a static top-k; attention runs the split-K Triton kernel on CUDA (fp16/bf16, D 64/128/256)
and plain PyTorch elsewhere. Semantics are moba/README.md's; routing is not recorded here.
Knows nothing of models or caches.
"""

from __future__ import annotations

import importlib

import torch

from moba.dense import one_query_attention
from moba.ops import backend_for
from moba.routing import block_means, gate_scores

_TRITON_HEAD_DIMS = (64, 128, 256)


def static_moba_decode(q, k, v, length, block_sums, *, block_size: int, top_k: int, sink_blocks: int = 0,
                       scale: float | None = None, local_blocks: int = 0, gate_subblocks: int = 1) -> torch.Tensor:  # fmt: skip
    """MoBA attention of the query at position length - 1 over the first `length` keys.

    Args:
        q: [B, Hq, 1, D]. k, v: [B, Hkv, capacity, D]; only the first `length` positions are read.
        length: int64 [1] device tensor, 1 <= length <= capacity.
        block_sums: fp32 [B, Hkv, n_blocks, D] sums of the keys of every block (a partial or empty
            block may hold anything: only blocks before the query's own block are scored).
        block_size, top_k, sink_blocks, scale, local_blocks, gate_subblocks: as in
            `moba.moba_attention`. With gate_subblocks > 1 the part means are pooled from the whole
            key buffer at every step (exact, and O(capacity) a step).
    Returns:
        [B, Hq, 1, D] in q's dtype; equal to `moba_attention(q, k[:, :, :length], ...)`.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    gate_keys = block_sums if gate_subblocks == 1 else block_means(k, block_size, gate_subblocks)
    blk = static_route(q, gate_keys, length, block_size=block_size, top_k=top_k, sink_blocks=sink_blocks,
                       local_blocks=local_blocks)
    if _use_triton(q, k, v, scale):
        decode = importlib.import_module("moba.triton.decode")
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        return decode.static_decode(q, k, v, blk, length, block_size=block_size, scale=scale)
    return _gathered(q, k, v, blk, length, block_size, scale)


def static_route(q, block_sums, length, *, block_size: int, top_k: int, sink_blocks: int,
                 local_blocks: int = 0) -> torch.Tensor:  # fmt: skip
    """Attended blocks of the query at length - 1: int32 [B, Hq, 1, S].

    Slot 0 is the own block, then min(top_k - 1, n_blocks) routed slots best first (the
    `local_blocks` before the own block first), then min(sink_blocks, n_blocks) sink slots; -1 marks
    an unused slot. The gate q . sum(K_block) ranks blocks as q . mean does (a positive factor
    apart), so the sums are never divided; sub-block means [B, Hkv, n, S, D] are taken too.
    """
    B, Hq = q.shape[:2]
    n_blocks = block_sums.shape[2]
    own = torch.div(length - 1, block_size, rounding_mode="floor")  # [1]
    ids = torch.arange(n_blocks, device=q.device)
    routable = (ids < own) & (ids >= sink_blocks)
    n_pick = min(top_k - 1, n_blocks)
    gate = gate_scores(q, block_sums).masked_fill(~routable, float("-inf"))  # [B, Hq, 1, n_blocks]
    if local_blocks:
        gate = gate.masked_fill(routable & (ids >= own - local_blocks), float("inf"))
    val, idx = gate.topk(n_pick, dim=-1)
    routed = idx.masked_fill(val == float("-inf"), -1)
    sink_ids = ids[: min(sink_blocks, n_blocks)]
    sinks = torch.where(sink_ids < own, sink_ids, -1).expand(B, Hq, 1, -1)
    return torch.cat([own.expand(B, Hq, 1, 1), routed, sinks], -1).to(torch.int32)


def static_dense_decode(q, k, v, length, *, scale: float | None = None) -> torch.Tensor:
    """Exact attention of the query at length - 1 over keys 0 .. length - 1: [B, Hq, 1, D].

    On CUDA the Triton kernel of moba/triton/dense_decode.py runs it: one program per (KV head, slice of
    keys) for all the query heads of that KV head, so one query spreads over the GPU and the cache is
    read once, not once per query head. Elsewhere: masked SDPA with GQA folded (`one_query_attention`).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if _use_triton(q, k, v, scale):
        kernel = importlib.import_module("moba.triton.dense_decode")
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        return kernel.dense_decode(q, k, v, length, scale=scale)
    return one_query_attention(q, k, v, torch.arange(k.shape[2], device=q.device) < length, scale=scale)


def static_sliding_decode(q, k, v, length, window: int, *, scale: float | None = None) -> torch.Tensor:
    """Attention of the query at p = length - 1 over keys p - window < key <= p (transformers'
    sliding window), gathered as a static [window] slice: [B, Hq, 1, D]."""
    pos = length - window + torch.arange(window, device=q.device)
    ks = k.index_select(2, pos.clamp(0, k.shape[2] - 1))
    vs = v.index_select(2, pos.clamp(0, k.shape[2] - 1))
    return one_query_attention(q, ks, vs, pos >= 0, scale=scale)


def _use_triton(q, k, v, scale) -> bool:
    same = q.dtype == k.dtype == v.dtype and q.is_cuda
    fits = q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in _TRITON_HEAD_DIMS
    return backend_for(q) == "triton" and same and fits and scale > 0


def _gathered(q, k, v, blk, length, block_size, scale) -> torch.Tensor:
    """Plain PyTorch: gather the attended blocks' keys ([B, Hq, S * block_size]), mask the positions
    at or past `length` and unused slots, one fp32 softmax."""
    B, Hq, _, D = q.shape
    Hkv, capacity = k.shape[1], k.shape[2]
    width = min(block_size, capacity)  # a block holds no more keys than the buffer
    pos = blk.long()[..., None] * block_size + torch.arange(width, device=q.device)  # [B, Hq, 1, S, width]
    valid = ((blk >= 0)[..., None] & (pos < length)).reshape(B, Hq, -1)
    pos = pos.clamp(0, capacity - 1).reshape(B, Hq, -1)
    bi = torch.arange(B, device=q.device)[:, None, None]
    hi = (torch.arange(Hq, device=q.device) // (Hq // Hkv))[None, :, None]
    ks, vs = k[bi, hi, pos].float(), v[bi, hi, pos].float()  # [B, Hq, S * bs, D]
    s = (ks @ q.float().transpose(-1, -2)).squeeze(-1) * scale
    p = s.masked_fill(~valid, float("-inf")).softmax(-1)
    return (p[:, :, None, :] @ vs).to(q.dtype)
