"""MoBA attention in plain PyTorch, for CPU and CUDA (`moba.types.MobaKernel`). The reference is moba/naive.py.

Queries are processed in chunks. For each chunk the gate picks blocks (moba/routing.py).
Few queries (decode): the own block is attended causally, then each query's picked blocks are
gathered and merged. Many queries (prefill): every (query, slot) pair, the own block being slot 0
with a causal mask, is grouped by (batch, KV head, key block); the groups run as batched dense
tiles (on CPU through PyTorch's flash-attention kernel, which returns the log-sum-exp too) and
each query's partials merge by log-sum-exp. Neither a [Tq, Tk] score matrix nor a
whole-sequence gate is ever held, and GQA never repeats K or V. Math runs in fp32 whatever the
input dtype.
"""

from __future__ import annotations

import torch

from moba.dense import covers_all_blocks, dense_attention
from moba.routing import block_means, select_blocks
from moba.types import Routing, settled_blocks

_SCORE_BUDGET = 1 << 24  # fp32 elements one score tile may hold (64 MiB)
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def portable_moba_attention(
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
    """MoBA attention in plain PyTorch; arguments and result: `moba.types.MobaKernel`."""
    top_k, sink_blocks, local_blocks = settled_blocks(q, k, v, block_size, top_k, sink_blocks, local_blocks, gate_subblocks)
    B, Hq, Tq, D = q.shape
    scale = D**-0.5 if scale is None else scale
    cached = key_means is not None and gate_subblocks == 1  # the cache keeps whole-block means only
    means = key_means if cached else block_means(k, block_size, gate_subblocks)
    out = torch.empty_like(q)
    n_slots = top_k + sink_blocks
    blocks = torch.empty(B, Hq, Tq, n_slots, dtype=torch.long, device=q.device) if return_routing else None
    scores = torch.empty(B, Hq, Tq, n_slots, device=q.device) if return_routing else None
    step = _query_chunk(Hq, D, n_slots)
    for c0 in range(0, Tq, step):
        pos0 = k.shape[2] - Tq + c0
        qc = q[:, :, c0 : c0 + step]
        sel, sc = select_blocks(qc, means, pos0, block_size=block_size, top_k=top_k, sink_blocks=sink_blocks,
                                local_blocks=local_blocks)
        end = pos0 + qc.shape[2]
        if covers_all_blocks(end, block_size, top_k, sink_blocks):  # exact and faster: causal SDPA
            out[:, :, c0 : c0 + step] = dense_attention(qc, k[:, :, :end], v[:, :, :end], scale=scale)
        else:
            out[:, :, c0 : c0 + step] = _attend_chunk(qc, k, v, sel, pos0, block_size, scale).to(q.dtype)
        if return_routing:
            _fill_routing(blocks[:, :, c0 : c0 + step], scores[:, :, c0 : c0 + step], sel, sc, pos0, block_size)
    return (out, Routing(blocks=blocks, scores=scores)) if return_routing else out


def _query_chunk(Hq: int, D: int, n_slots: int) -> int:
    """Queries per chunk: the per-(query, slot) partial outputs [C * Hq * slots, D] fit the budget."""
    return max(16, min(16384, _SCORE_BUDGET // (Hq * n_slots * D)))


def _fill_routing(blocks, scores, sel, sc, pos0, block_size) -> None:
    C = sel.shape[2]
    blocks[..., 0] = (torch.arange(pos0, pos0 + C, device=sel.device) // block_size)
    blocks[..., 1:] = sel
    scores[..., 0] = float("inf")
    scores[..., 1:] = sc


def _attend_chunk(qc, k, v, sel, pos0, block_size, scale) -> torch.Tensor:
    """fp32 [B, Hq, C, D] output for one chunk: own block plus selected blocks."""
    B, Hq, C, S = sel.shape
    if C * Hq * S * block_size * k.shape[3] <= _SCORE_BUDGET:
        m, l, acc = _own_block(qc, k, v, pos0, block_size, scale)
        _gathered_blocks(qc, k, v, sel, block_size, scale, m, l, acc)
        return acc / l.unsqueeze(-1)
    own = (torch.arange(pos0, pos0 + C, device=qc.device) // block_size).expand(B, Hq, C)
    return _grouped_blocks(qc, k, v, torch.cat([own[..., None], sel], -1), pos0, block_size, scale)


def _own_block(qc, k, v, pos0, block_size, scale):
    """Causal attention inside each query's own block -> running (max, sum, acc) in fp32."""
    B, Hq, C, D = qc.shape
    Hkv = k.shape[1]
    m = torch.empty(B, Hq, C, device=qc.device)
    l = torch.empty_like(m)
    acc = torch.empty(B, Hq, C, D, device=qc.device)
    rows = max(1, _SCORE_BUDGET // (Hq * block_size))
    t = 0
    while t < C:
        pos = pos0 + t
        start = pos // block_size * block_size
        n = min(C - t, start + block_size - pos, rows)
        qs = qc[:, :, t : t + n].float().reshape(B, Hkv, -1, D)  # [B, Hkv, G*n, D]
        ks, vs = k[:, :, start : pos + n].float(), v[:, :, start : pos + n].float()
        s = (qs @ ks.transpose(-1, -2) * scale).reshape(B, Hq, n, -1)  # [B, Hq, n, pos+n-start]
        q_pos = torch.arange(pos, pos + n, device=qc.device)[:, None]
        k_pos = torch.arange(start, pos + n, device=qc.device)[None, :]
        s = s.masked_fill(k_pos > q_pos, float("-inf"))
        m[:, :, t : t + n] = s.amax(-1)
        p = torch.exp(s - m[:, :, t : t + n, None])
        l[:, :, t : t + n] = p.sum(-1)
        acc[:, :, t : t + n] = (p.reshape(B, Hkv, -1, p.shape[-1]) @ vs).reshape(B, Hq, n, D)
        t += n
    return m, l, acc


def _gathered_blocks(qc, k, v, sel, block_size, scale, m, l, acc) -> None:
    """Few queries: gather each query's selected blocks and merge them in one step."""
    B, Hq, C, S = sel.shape
    Hkv, D = k.shape[1], k.shape[3]
    if S == 0 or not bool((sel >= 0).any()):
        return
    n_full = k.shape[2] // block_size
    kb = k[:, :, : n_full * block_size].reshape(B, Hkv, n_full, block_size, D)
    vb = v[:, :, : n_full * block_size].reshape(B, Hkv, n_full, block_size, D)
    bi = torch.arange(B, device=qc.device)[:, None, None, None]
    gi = (torch.arange(Hq, device=qc.device) // (Hq // Hkv))[None, :, None, None]
    idx = sel.clamp(min=0)
    ks, vs = kb[bi, gi, idx].float(), vb[bi, gi, idx].float()  # [B, Hq, C, S, bs, D]
    s = torch.einsum("bhcd,bhcsjd->bhcsj", qc.float(), ks) * scale
    s = s.masked_fill((sel < 0)[..., None], float("-inf")).reshape(B, Hq, C, S * block_size)
    _merge(m, l, acc, s, vs.reshape(B, Hq, C, S * block_size, D))


def _grouped_blocks(qc, k, v, sel, pos0, block_size, scale) -> torch.Tensor:
    """Many queries: group the (query, slot) entries by (batch, KV head, key block), attend each
    group as one dense tile (groups batched by size), then merge each query's partials by LSE.
    Slot 0 is the own block, masked causally; a ragged last block is masked the same way."""
    B, Hq, C, S = sel.shape
    Hkv, Tk, D = k.shape[1], k.shape[2], k.shape[3]
    n_blocks = -(-Tk // block_size)
    hit = (sel >= 0).nonzero()  # [n, 4]: b, h, c, slot
    b, h, c = hit[:, 0], hit[:, 1], hit[:, 2]
    key = (b * Hkv + h // (Hq // Hkv)) * n_blocks + sel[sel >= 0]
    key, order = key.sort(stable=True)
    row, pos = ((b * Hq + h) * C + c)[order], (pos0 + c)[order]
    uniq, counts = torch.unique_consecutive(key, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    e_m = torch.empty(len(key) + 1, device=qc.device)  # the last entry absorbs padding
    e_l, e_o = torch.empty_like(e_m), torch.empty(len(key) + 1, D, device=qc.device)
    qf = qc.reshape(B * Hq * C, D)
    # Blocks from the chunk's first own block on hold chunk queries (or the ragged tail): only their
    # tiles need the causal mask; every earlier block lies wholly before each query that picked it.
    own = uniq % n_blocks >= pos0 // block_size
    by_size = (counts + own * (len(key) + 1)).argsort(descending=True)  # masked ones first, widest first
    n_own = int(own.sum())
    i = 0
    while i < len(by_size):
        width = int(counts[by_size[i]])
        n = max(1, min(len(by_size) - i, _SCORE_BUDGET // (width * block_size)))
        n = min(n, n_own - i) if i < n_own else n  # a batch is all masked or all unmasked
        segs, masked = by_size[i : i + n], i < n_own
        i += n
        slot = starts[segs, None] + torch.arange(width, device=qc.device)  # [n, width] entry ids
        ok = torch.arange(width, device=qc.device) < counts[segs, None]
        slot = torch.where(ok, slot, len(key))
        src = torch.where(ok, slot, starts[segs, None])  # padding reads a real entry, writes the spare
        _tile(qf, k, v, uniq[segs], row[src], pos[src], slot, n_blocks, block_size, scale, masked, e_m, e_l, e_o)
    return _combine(row, e_m[:-1], e_l[:-1], e_o[:-1], B * Hq * C).reshape(B, Hq, C, D)


def _tile(qf, k, v, seg_key, rows, qpos, slot, n_blocks, block_size, scale, masked, e_m, e_l, e_o) -> None:
    """Dense tiles for n segments: queries rows [n, width] against their key block (causally masked
    when `masked`); writes the per-entry (max, sum, output) partials at `slot` [n, width]."""
    Hkv, Tk = k.shape[1], k.shape[2]
    bg, j = seg_key // n_blocks, seg_key % n_blocks
    bb, g = bg // Hkv, bg % Hkv
    kpos = j[:, None] * block_size + torch.arange(block_size, device=qf.device)  # [n, bs]
    kidx = kpos.clamp(max=Tk - 1)
    ks = k[bb[:, None], g[:, None], kidx].float()  # [n, bs, D]
    vs = v[bb[:, None], g[:, None], kidx].float()
    qs = qf[rows].float()  # [n, width, D]
    if qf.device.type == "cpu" and _CPU_FLASH is not None:
        _tile_flash(qs, ks, vs, kpos, qpos, masked, slot, scale, e_m, e_l, e_o)
        return
    s = torch.bmm(qs, ks.transpose(1, 2)) * scale  # [n, width, bs]
    if masked:
        s = s.masked_fill(kpos[:, None, :] > qpos[:, :, None], float("-inf"))
    m = s.amax(-1)
    p = torch.exp(s - m.unsqueeze(-1))
    e_m[slot] = m
    e_l[slot] = p.sum(-1)
    e_o[slot] = torch.bmm(p, vs)


def _tile_flash(qs, ks, vs, kpos, qpos, masked, slot, scale, e_m, e_l, e_o) -> None:
    """CPU: the tiles through PyTorch's flash-attention kernel, which returns the log-sum-exp, so
    each entry's partial is (lse, 1, normalised output); faster than bmm + exp (bench/RESULTS.md)."""
    mask = None
    if masked:
        mask = torch.zeros(qs.shape[0], 1, qs.shape[1], ks.shape[1], device=qs.device)
        mask.masked_fill_((kpos[:, None, :] > qpos[:, :, None])[:, None], float("-inf"))
    out, lse = _CPU_FLASH(qs[:, None], ks[:, None], vs[:, None], 0.0, False, attn_mask=mask, scale=scale)
    e_m[slot] = lse[:, 0]
    e_l[slot] = 1.0
    e_o[slot] = out[:, 0]


def _combine(row, e_m, e_l, e_o, n_rows) -> torch.Tensor:
    """LSE-merge per-entry partials into per-row outputs [n_rows, D]."""
    m = torch.full((n_rows,), float("-inf"), device=e_m.device).scatter_reduce(0, row, e_m, "amax")
    w = torch.exp(e_m - m[row])
    l = torch.zeros(n_rows, device=e_m.device).index_add_(0, row, e_l * w)
    o = torch.zeros(n_rows, e_o.shape[1], device=e_m.device).index_add_(0, row, e_o * w[:, None])
    return o / l[:, None]


def _merge(m, l, acc, s, vs) -> None:
    """Fold scores s [..., n] over values vs [..., n, D] into the running (m, l, acc) in place."""
    m_new = torch.maximum(m, s.amax(-1))
    alpha = torch.exp(m - m_new)
    p = torch.exp(s - m_new.unsqueeze(-1))
    l.mul_(alpha).add_(p.sum(-1))
    acc.mul_(alpha.unsqueeze(-1)).add_((p.unsqueeze(-2) @ vs).squeeze(-2))
    m.copy_(m_new)
