"""The contract every MoBA path implements (`MobaKernel`), its result type and its argument checks.

Knows no kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class Routing:
    """What the gate chose, per query.

    blocks: int64 [B, Hq, Tq, top_k + sink_blocks], both capped first at the number of key blocks
        (`clamp_blocks`). Slot 0 is the query's own block, slots
        1 .. top_k-1 the routed blocks best first, then one slot per sink block. -1 marks an
        unused slot (fewer candidates than slots, or a sink that is not before the own block).
    scores: fp32, same shape. The gate score q . mean(K_block) of each slot; +inf for the own
        block and for the `local_blocks` blocks just before it (always attended, never scored),
        -inf for unused slots.
    """

    blocks: torch.Tensor
    scores: torch.Tensor


def check_inputs(q, k, v, block_size: int, top_k: int, sink_blocks: int, local_blocks: int = 0,
                 gate_subblocks: int = 1) -> None:
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
    if not 0 <= local_blocks < top_k:
        raise ValueError(f"need 0 <= local_blocks < top_k (local blocks take routed slots); got {local_blocks}, {top_k}")
    if gate_subblocks < 1 or block_size % gate_subblocks:
        raise ValueError(f"gate_subblocks must be >= 1 and divide block_size; got {gate_subblocks}, {block_size}")


class MobaKernel(Protocol):
    """One MoBA implementation: `moba.moba_attention`, the spec (naive), portable and Triton.

    Semantics in moba/README.md; every implementation takes exactly these arguments (a new option
    is one more keyword-only parameter with a default, here and in each implementation;
    tests/moba/test_op.py checks that the signatures agree).

    Args:
        q: [B, Hq, Tq, D] queries; absolute positions Tk - Tq .. Tk - 1 (the last Tq keys).
        k, v: [B, Hkv, Tk, D]; Hq % Hkv == 0 (GQA without repeating K/V).
        block_size: keys per block; block i holds positions [i*bs, (i+1)*bs).
        top_k: blocks per query counting its own block; top_k - 1 are routed.
        sink_blocks: the first blocks, always attended when before the own block. Default 0.
        scale: softmax scale. Default D ** -0.5.
        return_routing: also return a `Routing` (blocks and gate scores per query). Default False.
        key_means: optional cached [B, Hkv, Tk // block_size, D] fp32 means of the complete key
            blocks (a KV cache keeps them so that decode does not re-pool it); the spec ignores it.
        local_blocks: the blocks just before the own block, always attended; they take routed
            slots (local_blocks < top_k). Default 0.
        gate_subblocks: the gate scores a block by the best of its S equal parts' mean keys
            (S divides block_size). Default 1 (the whole block's mean).
    Returns:
        out [B, Hq, Tq, D] in q's dtype, or (out, routing) when return_routing.
    Raises:
        ValueError: on shapes or parameters outside the contract (`check_inputs`).
    """

    def __call__(
        self,
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
    ) -> torch.Tensor | tuple[torch.Tensor, Routing]: ...


def settled_blocks(q, k, v, block_size: int, top_k: int, sink_blocks: int, local_blocks: int = 0,
                   gate_subblocks: int = 1) -> tuple[int, int, int]:
    """Every kernel's preamble: `check_inputs`, then (top_k, sink_blocks, local_blocks) with top-k and sinks
    capped at the key blocks (`clamp_blocks`) and the local blocks at the routed slots."""
    check_inputs(q, k, v, block_size, top_k, sink_blocks, local_blocks, gate_subblocks)
    top_k, sink_blocks = clamp_blocks(k.shape[2], block_size, top_k, sink_blocks)
    return top_k, sink_blocks, min(local_blocks, top_k - 1)


def clamp_blocks(Tk: int, block_size: int, top_k: int, sink_blocks: int) -> tuple[int, int]:
    """(top_k, sink_blocks) capped at the number of key blocks, ceil(Tk / block_size).

    Slots beyond it could only ever hold -1, so every buffer is sized by the capped values: a
    top_k of 10**6 ("every block") costs what top_k = n_blocks costs, with the same result.
    """
    n_blocks = -(-Tk // block_size)
    return max(1, min(top_k, n_blocks)), min(sink_blocks, n_blocks)
