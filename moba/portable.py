"""MoBA attention in plain PyTorch, for CPU and CUDA. The reference is moba/naive.py.

Layout: q [B, Hq, Tq, D], k and v [B, Hkv, Tk, D]; the queries are the last Tq keys.
Queries are processed in chunks. For each chunk the gate picks blocks (moba/routing.py),
the own block is attended causally, and the picked blocks are attended either by gathering
them per query (few queries: decode) or by grouping the queries that picked each key block
(prefill). Partial results merge through a running log-sum-exp, so neither a [Tq, Tk] score
matrix nor a whole-sequence gate is ever held, and GQA never repeats K or V. Math runs in
fp32 whatever the input dtype.
"""

from __future__ import annotations

import torch

from moba.routing import block_means, select_blocks
from moba.types import Routing, check_inputs

_SCORE_BUDGET = 1 << 24  # fp32 elements one score tile may hold (64 MiB)


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
):
    """MoBA attention; see `moba.moba_attention` for the contract.

    key_means: optional [B, Hkv, Tk // block_size, D] fp32 means of the complete key blocks
        (a KV cache keeps them up to date so that decode does not re-pool the cache).
    """
    check_inputs(q, k, v, block_size, top_k, sink_blocks)
    B, Hq, Tq, D = q.shape
    scale = D**-0.5 if scale is None else scale
    means = block_means(k, block_size) if key_means is None else key_means
    out = torch.empty_like(q)
    n_slots = top_k + sink_blocks
    blocks = torch.empty(B, Hq, Tq, n_slots, dtype=torch.long, device=q.device) if return_routing else None
    scores = torch.empty(B, Hq, Tq, n_slots, device=q.device) if return_routing else None
    step = _query_chunk(Hq // k.shape[1], block_size)
    for c0 in range(0, Tq, step):
        pos0 = k.shape[2] - Tq + c0
        qc = q[:, :, c0 : c0 + step]
        sel, sc = select_blocks(qc, means, pos0, block_size=block_size, top_k=top_k, sink_blocks=sink_blocks)
        out[:, :, c0 : c0 + step] = _attend_chunk(qc, k, v, sel, pos0, block_size, scale).to(q.dtype)
        if return_routing:
            _fill_routing(blocks[:, :, c0 : c0 + step], scores[:, :, c0 : c0 + step], sel, sc, pos0, block_size)
    return (out, Routing(blocks=blocks, scores=scores)) if return_routing else out


def _query_chunk(group: int, block_size: int) -> int:
    return max(16, min(16384, _SCORE_BUDGET // (group * block_size)))


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
    else:
        own = (torch.arange(pos0, pos0 + C, device=qc.device) // block_size).expand(B, Hq, C)
        m = torch.full((B, Hq, C), float("-inf"), device=qc.device)
        l = torch.zeros(B, Hq, C, device=qc.device)
        acc = torch.zeros(B, Hq, C, qc.shape[3], device=qc.device)
        _grouped_blocks(qc, k, v, torch.cat([own[..., None], sel], -1), pos0, block_size, scale, m, l, acc)
    return acc / l.unsqueeze(-1)


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
    _merge(m, l, acc, s, vs.reshape(B, Hq, C, S * block_size, D), batched=True)


def _grouped_blocks(qc, k, v, sel, pos0, block_size, scale, m, l, acc) -> None:
    """Many queries: for each (batch, KV head, key block), attend every query that picked it.
    A query's own block (slot 0) is masked causally."""
    B, Hq, C, S = sel.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    n_blocks = -(-Tk // block_size)
    hit = (sel >= 0).nonzero()  # [n, 4]: b, h, c, slot
    b, h, c = hit[:, 0], hit[:, 1], hit[:, 2]
    key = (b * Hkv + h // (Hq // Hkv)) * n_blocks + sel[sel >= 0]
    key, order = key.sort(stable=True)
    row, pos = ((b * Hq + h) * C + c)[order], (pos0 + c)[order]
    uniq, counts = torch.unique_consecutive(key, return_counts=True)
    qf = qc.reshape(B * Hq * C, -1)
    mf, lf, af = m.view(-1), l.view(-1), acc.view(B * Hq * C, -1)
    start = 0
    for kid, cnt in zip(uniq.tolist(), counts.tolist()):
        r, p = row[start : start + cnt], pos[start : start + cnt]
        start += cnt
        bg, j = divmod(kid, n_blocks)
        bb, g = divmod(bg, Hkv)
        lo, hi = j * block_size, min((j + 1) * block_size, Tk)
        s = qf[r].float() @ k[bb, g, lo:hi].float().T * scale  # [cnt, <= bs]
        if hi - 1 > int(p.min()):
            s = s.masked_fill(torch.arange(lo, hi, device=s.device)[None, :] > p[:, None], float("-inf"))
        _merge_rows(mf, lf, af, r, s, v[bb, g, lo:hi].float())


def _merge(m, l, acc, s, vs, batched) -> None:
    """Fold scores s [..., n] over values vs into the running (m, l, acc) in place."""
    m_new = torch.maximum(m, s.amax(-1))
    alpha = torch.exp(m - m_new)
    p = torch.exp(s - m_new.unsqueeze(-1))
    l.mul_(alpha).add_(p.sum(-1))
    pv = (p.unsqueeze(-2) @ vs).squeeze(-2) if batched else p @ vs
    acc.mul_(alpha.unsqueeze(-1)).add_(pv)
    m.copy_(m_new)


def _merge_rows(mf, lf, af, r, s, vs) -> None:
    m, l, acc = mf[r], lf[r], af[r]
    _merge(m, l, acc, s, vs, batched=False)
    mf[r], lf[r], af[r] = m, l, acc


