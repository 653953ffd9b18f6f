"""Exact causal attention for MoBA's degenerate case: when every query's attended set is all of
its past, MoBA equals causal SDPA. Layout [B, H, T, D]; queries are the last Tq of Tk keys."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None):
    """Causal SDPA with the queries as the last Tq keys (bottom-right aligned), GQA-native."""
    Tq, Tk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    mask = causal_lower_right(Tq, Tk)  # never materialized by the fused SDPA kernels
    if gqa and q.is_cuda:  # the fused lower-right kernel takes no GQA: expand K/V instead of falling back to math
        group = q.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def covers_all_blocks(Tk: int, block_size: int, top_k: int, sink_blocks: int) -> bool:
    """True when even the last query attends every past block, so MoBA is exactly causal SDPA."""
    return (Tk - 1) // block_size <= top_k - 1 + sink_blocks
