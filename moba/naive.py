"""The MoBA spec: a dense-mask fp32 reference, small sizes only.

Read it line by line against moba/README.md. It builds the full [Tq, Tk] mask, so it is
O(Tq * Tk) in memory and never used on a hot path. Arguments and layout: `moba.types.MobaKernel`.
"""

from __future__ import annotations

import torch

from moba.types import Routing, settled_blocks


def naive_moba_attention(
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
    """Reference MoBA attention (`moba.types.MobaKernel`); `key_means` is ignored: the spec pools `k`."""
    top_k, sink_blocks, local_blocks = settled_blocks(q, k, v, block_size, top_k, sink_blocks, local_blocks, gate_subblocks)
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    qf, kf, vf = q.float(), k.float(), v.float()
    kf = kf.repeat_interleave(group, dim=1)  # a GQA query head reads its KV head: [B, Hq, Tk, D]
    vf = vf.repeat_interleave(group, dim=1)

    dev = q.device
    q_pos = torch.arange(Tk - Tq, Tk, device=dev)  # absolute positions of the queries
    k_pos = torch.arange(Tk, device=dev)
    own = q_pos // block_size  # [Tq] block of each query
    n_full = Tk // block_size  # only complete blocks can be candidates
    sub = block_size // gate_subblocks  # a block is scored by the best of its gate_subblocks parts
    means = kf[:, :, : n_full * block_size].reshape(B, Hq, n_full * gate_subblocks, sub, D).mean(3)
    parts = qf @ means.transpose(-1, -2)  # [B, Hq, Tq, n_full * gate_subblocks]: q . mean(K_part), fp32
    gate = parts.reshape(B, Hq, Tq, n_full, gate_subblocks).amax(-1)  # [B, Hq, Tq, n_full]

    block_ids = torch.arange(n_full, device=dev)
    before_own = block_ids[None, :] < own[:, None]  # [Tq, n_full] strictly past blocks
    is_sink = block_ids[None, :] < sink_blocks
    candidate = before_own & ~is_sink  # routed among the past blocks that are not sinks
    sinks = before_own & is_sink
    local = candidate & (block_ids[None, :] >= own[:, None] - local_blocks)  # always routed, first

    masked_gate = gate.masked_fill(~candidate, float("-inf")).masked_fill(local, float("inf"))
    n_pick = min(top_k - 1, n_full)
    picked = torch.zeros(B, Hq, Tq, n_full, dtype=torch.bool, device=dev)
    if n_pick > 0:
        top_val, top_idx = masked_gate.topk(n_pick, dim=-1)
        picked.scatter_(-1, top_idx, top_val > float("-inf"))
    chosen = picked | sinks  # [B, Hq, Tq, n_full]

    key_block = k_pos // block_size  # [Tk]
    own_keys = (key_block[None, :] == own[:, None]) & (k_pos[None, :] <= q_pos[:, None])  # [Tq, Tk]
    full_block_keys = key_block < n_full
    idx = key_block.clamp(max=max(n_full - 1, 0)).expand(B, Hq, Tq, Tk)
    chosen_keys = torch.zeros(B, Hq, Tq, Tk, dtype=torch.bool, device=dev)
    if n_full > 0:
        chosen_keys = chosen.gather(-1, idx) & full_block_keys
    mask = chosen_keys | own_keys  # [B, Hq, Tq, Tk]

    logits = (qf @ kf.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~mask, float("-inf"))
    out = (logits.softmax(-1) @ vf).to(q.dtype)
    if not return_routing:
        return out
    return out, _routing(sinks, picked, gate.masked_fill(local, float("inf")), own, top_k, sink_blocks)


def _routing(sinks, picked, gate, own, top_k, sink_blocks) -> Routing:
    """Slots: [own, routed best-first (top_k - 1), sinks in id order (sink_blocks)]; -1 unused."""
    B, Hq, Tq, n_full = gate.shape
    blocks = torch.full((B, Hq, Tq, top_k + sink_blocks), -1, dtype=torch.long, device=gate.device)
    scores = torch.full(blocks.shape, float("-inf"), device=gate.device)
    blocks[..., 0] = own
    scores[..., 0] = float("inf")
    routed_gate = gate.masked_fill(~picked, float("-inf"))
    if n_full > 0 and top_k > 1:
        n = min(top_k - 1, n_full)
        val, ids = routed_gate.topk(n, dim=-1)
        blocks[..., 1 : 1 + n] = ids.masked_fill(val == float("-inf"), -1)
        scores[..., 1 : 1 + n] = val
    for s in range(min(sink_blocks, n_full)):
        on = sinks[:, s].expand(B, Hq, Tq)
        blocks[..., top_k + s] = torch.where(on, s, -1)
        scores[..., top_k + s] = torch.where(on, gate[..., s], float("-inf"))
    return Routing(blocks=blocks, scores=scores)
