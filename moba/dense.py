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
    if Tq == 1:
        return one_query_attention(q, k, v, scale=scale)
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    mask = causal_lower_right(Tq, Tk)  # never materialized by the fused SDPA kernels
    if gqa and q.is_cuda:  # the fused lower-right kernel takes no GQA: expand K/V instead of falling back to math
        group = q.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, *,
                        scale: float | None = None) -> torch.Tensor:
    """One query per head, q [B, Hq, 1, D], over the keys k, v [B, Hkv, Tk, D] where `mask` (bool [Tk], None:
    all) is True: [B, Hq, 1, D]. The query heads that share a KV head are folded into the query axis
    ([B, Hkv, Hq/Hkv, D]), so GQA reads the KV heads in place: no expanded copy of the cache (at 1M keys
    that copy is gigabytes a layer a token) and the fused kernels run."""
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    folded = q.reshape(B, Hkv, Hq // Hkv, D)
    m = None if mask is None else mask[None, None, None, :]
    return F.scaled_dot_product_attention(folded, k, v, attn_mask=m, scale=scale).reshape(B, Hq, 1, D)


def covers_all_blocks(Tk: int, block_size: int, top_k: int, sink_blocks: int) -> bool:
    """True when even the last query attends every past block, so MoBA is exactly causal SDPA."""
    return (Tk - 1) // block_size <= top_k - 1 + sink_blocks
