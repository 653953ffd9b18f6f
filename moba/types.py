"""Shared result type and argument checks for every MoBA path. Knows no kernels."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Routing:
    """What the gate chose, per query.

    blocks: int64 [B, Hq, Tq, top_k + sink_blocks], both capped first at the number of key blocks
        (`clamp_blocks`). Slot 0 is the query's own block, slots
        1 .. top_k-1 the routed blocks best first, then one slot per sink block. -1 marks an
        unused slot (fewer candidates than slots, or a sink that is not before the own block).
    scores: fp32, same shape. The gate score q . mean(K_block) of each slot; +inf for the own
        block (always attended, never scored) and -inf for unused slots.
    """

    blocks: torch.Tensor
    scores: torch.Tensor


def check_inputs(q, k, v, block_size: int, top_k: int, sink_blocks: int) -> None:
    """Raise ValueError naming the problem when the arguments break the op's contract."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [B, H, T, D]; got {q.dim()}, {k.dim()}, {v.dim()} dims")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or head dim")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[1]})")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"more queries ({q.shape[2]}) than keys ({k.shape[2]}): queries are the last Tq keys")
    if block_size < 1 or top_k < 1 or sink_blocks < 0:
        raise ValueError(
            f"need block_size >= 1, top_k >= 1, sink_blocks >= 0; got {block_size}, {top_k}, {sink_blocks}"
        )


def clamp_blocks(Tk: int, block_size: int, top_k: int, sink_blocks: int) -> tuple[int, int]:
    """(top_k, sink_blocks) capped at the number of key blocks, ceil(Tk / block_size).

    Slots beyond it could only ever hold -1, so every buffer is sized by the capped values: a
    top_k of 10**6 ("every block") costs what top_k = n_blocks costs, with the same result.
    """
    n_blocks = -(-Tk // block_size)
    return max(1, min(top_k, n_blocks)), min(sink_blocks, n_blocks)
