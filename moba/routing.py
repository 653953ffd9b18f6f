"""Block pooling and the gate, shared by the portable path and the Triton launcher.

Layout: q [B, Hq, Tq, D], k [B, Hkv, Tk, D], block means [B, Hkv, n_full, D] fp32. The
functions here see one chunk of queries at a time, so the [B, Hq, Tq, n_blocks] gate of a
whole long sequence is never held. They know nothing of attention itself.
"""

from __future__ import annotations

import torch


def block_means(k: torch.Tensor, block_size: int, subblocks: int = 1) -> torch.Tensor:
    """Mean key of every complete block (or of each of its `subblocks` equal parts), in fp32.

    Args:
        k: [B, Hkv, Tk, D] keys.
    Returns:
        [B, Hkv, Tk // block_size, D] fp32, or [B, Hkv, Tk // block_size, subblocks, D] when
        subblocks > 1. A ragged tail block is not pooled: it is never a candidate.
    """
    B, H, Tk, D = k.shape
    n_full = Tk // block_size
    full = k[:, :, : n_full * block_size].float()
    if subblocks == 1:
        return full.reshape(B, H, n_full, block_size, D).mean(3)
    return full.reshape(B, H, n_full, subblocks, block_size // subblocks, D).mean(4)


def select_blocks(
    q: torch.Tensor,
    means: torch.Tensor,
    q_start: int,
    *,
    block_size: int,
    top_k: int,
    sink_blocks: int,
    local_blocks: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed and sink blocks for a chunk of queries (the own block is not included).

    Args:
        q: [B, Hq, C, D] queries at absolute positions q_start .. q_start + C - 1.
        means: [B, Hkv, n_full, D] fp32 block means, or [B, Hkv, n_full, S, D] sub-block means
            (a block then scores the best of its S parts).
        local_blocks: the blocks just before the own block (sinks aside) take routed slots first,
            scored +inf; the gate fills the remaining top_k - 1 - local_blocks slots.
    Returns:
        (blocks, scores): int64 and fp32 [B, Hq, C, top_k - 1 + sink_blocks]. Routed blocks
        best first, then sinks in id order; -1 with score -inf marks an unused slot.
    """
    B, Hq, C, D = q.shape
    n_full = means.shape[2]
    n_route = top_k - 1
    blocks = torch.full((B, Hq, C, n_route + sink_blocks), -1, dtype=torch.long, device=q.device)
    scores = torch.full(blocks.shape, float("-inf"), device=q.device)
    if n_full == 0 or blocks.shape[-1] == 0:
        return blocks, scores
    gate = gate_scores(q, means)  # [B, Hq, C, n_full]
    own = (torch.arange(q_start, q_start + C, device=q.device) // block_size)[:, None]  # [C, 1]
    ids = torch.arange(n_full, device=q.device)[None, :]
    past = ids < own  # [C, n_full]
    n_pick = min(n_route, n_full)
    if n_pick > 0:
        routed = gate.masked_fill(~past | (ids < sink_blocks), float("-inf"))
        if local_blocks:
            routed = routed.masked_fill(past & (ids >= sink_blocks) & (ids >= own - local_blocks), float("inf"))
        val, idx = routed.topk(n_pick, dim=-1)
        blocks[..., :n_pick] = idx.masked_fill(val == float("-inf"), -1)
        scores[..., :n_pick] = val
    n_sink = min(sink_blocks, n_full)
    if n_sink > 0:
        on = past[:, :n_sink].expand(B, Hq, C, n_sink)
        sink_ids = torch.arange(n_sink, device=q.device).expand(B, Hq, C, n_sink)
        blocks[..., n_route : n_route + n_sink] = torch.where(on, sink_ids, -1)
        scores[..., n_route : n_route + n_sink] = gate[..., :n_sink].masked_fill(~on, float("-inf"))
    return blocks, scores


def gate_scores(q: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """s = q . mean(K_block) in fp32 per query head, without repeating GQA means: [B, Hq, C, n_full].
    With sub-block means [B, Hkv, n_full, S, D] a block scores max_s q . mean(K_block part s)."""
    B, Hq, C, D = q.shape
    Hkv, n_full = means.shape[1], means.shape[2]
    qg = q.float().reshape(B, Hkv, (Hq // Hkv) * C, D)
    flat = means.reshape(B, Hkv, -1, D)
    s = (qg @ flat.transpose(-1, -2)).reshape(B, Hq, C, n_full, -1)
    return s.amax(-1) if s.shape[-1] > 1 else s[..., 0]
