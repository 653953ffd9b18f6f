"""CSR of a MoBA blocks table by (batch, KV head, key block), cut into tiles for the tile kernel.

The table is int32 [B, Hq, C, S] for a query chunk: slot 0 is the query's own block, the other
slots blocks strictly before it, -1 an unused slot. Its entries e = ((b * Hq + h) * C + c) * S + slot are grouped by key = (b * Hkv + h // G) * n_blocks + block
(G = Hq // Hkv) in stable-sort order: a counting sort with no host sync up to COUNT_MAX_BLOCKS key
blocks (it keeps a histogram row in registers), torch.sort above. It knows nothing of attention or
of how the table was routed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

COUNT_MAX_BLOCKS = 4096
COUNT_TILE = (256, 2)  # counting_sort (tb, ts): the fastest timed on an H200 (bench/RESULTS.md)
METHODS = ("count", "sort")


def build_tiles(blk: torch.Tensor, Hkv: int, n_blocks: int, bm: int, *, method: str | None = None):
    """CSR of the blocks table by (batch, KV head, block), cut into tiles of bm rows; no host sync.

    Args:
        blk: int32 [B, Hq, C, S] of a query chunk; entry e = ((b * Hq + h) * C + c) * S + slot;
            slot 0 the own block, -1 = unused.
        method: "count" (`counting_sort`, the default up to COUNT_MAX_BLOCKS blocks) or "sort"
            (torch.sort, the default above; bincount syncs with the host). Both give one order.
    Returns:
        dict of device tensors perm (entries grouped by key, in stable-sort order), tile_key
        (key of each tile slot, n_keys past the last tile), tile_end (inclusive cumulative tile count
        per key), key_off, key_cnt, tile_row and tile_rows (int32 first perm index and row count of each
        tile; meaningless past the last tile), and the host ints n_keys and n_tiles (an upper bound on the
        tile count).
    Raises:
        ValueError: an unknown method.
    """
    B, Hq, C, S = blk.shape
    dev = blk.device
    n_keys = B * Hkv * n_blocks
    method = method or ("count" if n_blocks <= COUNT_MAX_BLOCKS else "sort")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "count":
        perm, off, cnt = counting_sort(blk.contiguous(), Hkv, n_blocks, *COUNT_TILE)
    else:
        perm, off, cnt = _torch_sort(blk, Hkv, n_blocks)
    per_key = (cnt + bm - 1) // bm
    tile_end = per_key.cumsum(0)
    n_tiles = triton.cdiv(blk.numel(), bm) + n_keys
    t = torch.arange(n_tiles, device=dev)
    tile_key = torch.searchsorted(tile_end, t, right=True)
    kc = tile_key.clamp(max=n_keys - 1)
    first = (t - tile_end[kc] + per_key[kc]) * bm  # the tile's first row within its key's list
    return dict(perm=perm, tile_key=tile_key, tile_end=tile_end, key_off=off, key_cnt=cnt,
                tile_row=(off[kc] + first).to(torch.int32), tile_rows=(cnt[kc] - first).clamp(max=bm).to(torch.int32),
                n_keys=n_keys, n_tiles=n_tiles)  # fmt: skip


def _torch_sort(blk, Hkv, n_blocks):
    B, Hq = blk.shape[:2]
    n_keys = B * Hkv * n_blocks
    heads = torch.arange(Hq, device=blk.device) // (Hq // Hkv)
    base = ((torch.arange(B, device=blk.device)[:, None] * Hkv + heads[None, :]) * n_blocks).to(torch.int32)
    key = torch.where(blk >= 0, blk + base[:, :, None, None], n_keys).reshape(-1)
    _, perm = torch.sort(key, stable=True)
    cnt = torch.bincount(key, minlength=n_keys + 1)[:n_keys]
    return perm, cnt.cumsum(0) - cnt, cnt


@triton.jit
def _count_kernel(BLK, CNT, C, NB, S: tl.constexpr, SP: tl.constexpr, TB: tl.constexpr, NBP: tl.constexpr):
    t, bh = tl.program_id(0), tl.program_id(1)
    c = t * TB + tl.arange(0, TB)[:, None]
    slot = tl.arange(0, SP)[None, :]
    ok = (c < C) & (slot < S)
    j = tl.load(BLK + (bh.to(tl.int64) * C + c) * S + slot, mask=ok, other=-1)
    hist = tl.histogram(tl.reshape(tl.maximum(j, 0), [TB * SP]), NBP, mask=tl.reshape(j >= 0, [TB * SP]))
    bins = tl.arange(0, NBP)
    tl.store(CNT + (bh.to(tl.int64) * tl.num_programs(0) + t) * NB + bins, hist, mask=bins < NB)


@triton.jit
def _scatter_kernel(BLK, START, PERM, C, NB, S: tl.constexpr, SP: tl.constexpr, TB: tl.constexpr,
                    TS: tl.constexpr, NBP: tl.constexpr):  # fmt: skip
    t, bh = tl.program_id(0), tl.program_id(1)
    bins = tl.arange(0, NBP)
    at = tl.load(START + (bh.to(tl.int64) * tl.num_programs(0) + t) * NB + bins, mask=bins < NB, other=0)
    E: tl.constexpr = TS * SP
    i = tl.arange(0, E)
    for c0 in range(t * TB, tl.minimum(t * TB + TB, C), TS):
        c = c0 + i // SP
        slot = i % SP
        ok = (c < C) & (slot < S)
        e = (bh * C + c) * S + slot
        j = tl.load(BLK + e.to(tl.int64), mask=ok, other=-1)
        live = j >= 0
        jj = tl.maximum(j, 0)
        before = (jj[:, None] == jj[None, :]) & live[None, :] & (i[None, :] < i[:, None])
        rank = tl.sum(before.to(tl.int32), 1)
        tl.store(PERM + tl.gather(at, jj, 0) + rank, e, mask=live)
        at += tl.histogram(jj, NBP, mask=live)


def counting_sort(blk: torch.Tensor, Hkv: int, n_blocks: int, tb: int, ts: int):
    """Stable CSR of the blocks table by (batch, KV head, block) with two small kernels.

    A histogram per (batch, head, tile of tb queries), an exclusive scan of those counts in entry
    order, and a scatter that ranks equal keys inside tiles of ts queries (tb a multiple of ts;
    build_tiles passes COUNT_TILE). Gives the same order as a stable sort of the keys; entries
    with block -1 are left out.
    Args:
        blk: int32 [B, Hq, C, S], contiguous; entry e = ((b * Hq + h) * C + c) * S + slot.
    Returns:
        (perm int32 [B * Hq * C * S], only its first key_cnt.sum() entries written; key_off, key_cnt
        int64 [B * Hkv * n_blocks]).
    """
    B, Hq, C, S = blk.shape
    nt = triton.cdiv(C, tb)
    nbp = triton.next_power_of_2(n_blocks)
    sp = triton.next_power_of_2(S)
    cnt = torch.empty(B * Hq, nt, n_blocks, device=blk.device, dtype=torch.int32)
    _count_kernel[(nt, B * Hq)](blk, cnt, C, n_blocks, S=S, SP=sp, TB=tb, NBP=nbp, num_warps=4)
    grouped = cnt.view(B, Hkv, (Hq // Hkv) * nt, n_blocks)
    key_cnt = grouped.sum(2, dtype=torch.int64).reshape(-1)
    key_off = key_cnt.cumsum(0) - key_cnt
    start = (grouped.cumsum(2, dtype=torch.int32) - grouped) + key_off.view(B, Hkv, 1, n_blocks).to(torch.int32)
    perm = torch.empty(blk.numel(), device=blk.device, dtype=torch.int32)
    _scatter_kernel[(nt, B * Hq)](blk, start, perm, C, n_blocks, S=S, SP=sp, TB=tb, TS=ts, NBP=nbp, num_warps=4)
    return perm, key_off, key_cnt
