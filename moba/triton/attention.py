"""Key-block-centric MoBA attention in Triton (the prefill and chunked-prefill kernel).

For every (batch, KV head, key block) the (query, head, slot) entries of a query chunk that
selected that block are gathered (a CSR list, built by moba/triton/csr.py), cut into tiles of BM
rows, and each tile runs one dense flash-attention pass over its block, the G query heads of a KV
head sharing one tile (GQA-native). The own block is one of the slots; a per-row mask
`key <= query` makes it causal and is a no-op for routed blocks, which lie strictly before the
query. Each (entry, split) writes a normalised partial output and its base-2 log-sum-exp;
moba/triton/decode.py merges them. A row's result does not depend on its tile-mates, so the order
inside a block's list only matters for speed (own-block rows in position order keep the causal
tiles narrow). Random routing is the worst case for query-centric tiles (a 128-query tile's union
of blocks is nearly every past block), which is why the gathering is per key block.
It knows nothing of routing: it reads the blocks table [B, Hq, C, S] (-1 = unused slot).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tile_kernel(
    Q, K, V, OP, LSEP, PERM, TILE_KEY, TILE_ROW, TILE_ROWS,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
    C, Hq, S, Hkv, NB, n_keys, q_off, pos0, Tk, block_size, split_len, qk_scale,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, NSPLIT: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    key = tl.load(TILE_KEY + tl.program_id(0))
    if key < n_keys:
        sp = tl.program_id(1)
        r = tl.arange(0, BM)
        valid = r < tl.load(TILE_ROWS + tl.program_id(0))
        e = tl.load(PERM + tl.load(TILE_ROW + tl.program_id(0)) + r, mask=valid, other=0)
        c = (e // S) % C
        h = (e // (S * C)) % Hq
        b, kvh, j = key // (Hkv * NB), (key // NB) % Hkv, key % NB
        pos = tl.where(valid, pos0 + c, -1)
        d = tl.arange(0, D)
        q_ptr = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + (q_off + c).to(tl.int64) * sqt
        q = tl.load(q_ptr[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        lo = j * block_size + sp * split_len
        hi = tl.minimum(tl.minimum(lo + split_len, j * block_size + block_size), tl.max(pos, 0) + 1)
        pos_min = tl.min(tl.where(valid, pos, Tk), 0)
        mid = lo + tl.maximum(tl.minimum(pos_min + 1, hi) - lo, 0) // BN * BN
        kv = (b, kvh, skb, skh, skt, svb, svh, svt)
        m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BM], dtype=tl.float32)
        acc = tl.zeros([BM, D], dtype=tl.float32)
        for n0 in range(lo, mid, BN):
            kt, vt = _kv_tile(K, V, kv, n0, hi, D, BN, TMA, False)
            m_i, l_i, acc = _online_step(tl.dot(q, kt), vt, m_i, l_i, acc, qk_scale, False)
        for n0 in range(mid, hi, BN):
            n = n0 + tl.arange(0, BN)
            kt, vt = _kv_tile(K, V, kv, n0, hi, D, BN, TMA, True)
            s = tl.where((n[None, :] <= pos[:, None]) & (n < hi)[None, :], tl.dot(q, kt), float("-inf"))
            m_i, l_i, acc = _online_step(s, vt, m_i, l_i, acc, qk_scale, True)
        _store_partial(OP, LSEP, e.to(tl.int64) * NSPLIT + sp, valid, m_i, l_i, acc, D)


@triton.jit
def _kv_tile(K, V, kv, n0, hi, D: tl.constexpr, BN: tl.constexpr, TMA: tl.constexpr, MASK: tl.constexpr):
    """K^T [D, BN] and V [BN, D] at keys n0 .. n0 + BN (K loaded row-major, transposed in registers);
    rows at or past hi are zero when MASK."""
    b, kvh, skb, skh, skt, svb, svh, svt = kv
    if TMA:
        at = [b.to(tl.int32), kvh.to(tl.int32), n0.to(tl.int32), 0]
        kt = tl.trans(tl.reshape(K.load(at), [BN, D]))
        vt = tl.reshape(V.load(at), [BN, D])
    else:
        n = n0 + tl.arange(0, BN)
        d = tl.arange(0, D)
        k_rows = K + b.to(tl.int64) * skb + kvh.to(tl.int64) * skh + n.to(tl.int64) * skt
        v_rows = V + b.to(tl.int64) * svb + kvh.to(tl.int64) * svh + n.to(tl.int64) * svt
        keep = (n < hi)[:, None] if MASK else None
        zero = 0.0 if MASK else None
        kt = tl.trans(tl.load(k_rows[:, None] + d[None, :], mask=keep, other=zero))
        vt = tl.load(v_rows[:, None] + d[None, :], mask=keep, other=zero)
    return kt, vt


@triton.jit
def _online_step(s, vt, m_i, l_i, acc, qk_scale, GUARD: tl.constexpr):
    """One online-softmax step; GUARD handles rows whose scores so far are all -inf."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    if GUARD:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = tl.math.exp2(s * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
    return m_new, l_i, acc


@triton.jit
def _store_partial(OP, LSEP, idx, valid, m_i, l_i, acc, D: tl.constexpr):
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    d = tl.arange(0, D)
    tl.store(OP + idx[:, None] * D + d[None, :], o.to(OP.dtype.element_ty), mask=valid[:, None])
    tl.store(LSEP + idx, lse, mask=valid)


def attend_tiles(q, k, v, blk, tiles, op, lsep, *, q_off, pos0, block_size, scale, nsplit, cfg):
    """Run the tile kernel for one query chunk; fills op [entries * nsplit, D] and lsep.

    cfg: dict BM, BN, warps, stages. K/V go through tensor descriptors where `tma_ok` holds (CUDA).
    """
    B, Hq, C, S = blk.shape
    Hkv, Tk, D = k.shape[1], k.shape[2], k.shape[3]
    bn = cfg["BN"]
    split_len = triton.cdiv(triton.cdiv(block_size, nsplit), bn) * bn
    tma = tma_ok(k) and tma_ok(v)
    kd, vd = (_descriptor(k, bn), _descriptor(v, bn)) if tma else (k, v)
    _tile_kernel[(tiles["n_tiles"], nsplit)](
        q, kd, vd, op, lsep, tiles["perm"], tiles["tile_key"], tiles["tile_row"], tiles["tile_rows"],
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        C, Hq, S, Hkv, triton.cdiv(Tk, block_size), tiles["n_keys"], q_off, pos0, Tk, block_size,
        split_len, scale * 1.4426950408889634,
        D=D, BM=cfg["BM"], BN=bn, NSPLIT=nsplit, TMA=tma,
        num_warps=cfg["warps"], num_stages=cfg["stages"],
    )  # fmt: skip


def tma_ok(t: torch.Tensor) -> bool:
    """A tensor descriptor needs a CUDA tensor, a 16-byte aligned base and 16-byte aligned strides."""
    es = t.element_size()
    return t.is_cuda and t.stride(3) == 1 and t.data_ptr() % 16 == 0 and all(st * es % 16 == 0 for st in t.stride()[:3])


def _descriptor(t: torch.Tensor, bn: int):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, bn, t.shape[3]])
