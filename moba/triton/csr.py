"""CSR of a MoBA blocks table by (batch, KV head, key block), cut into tiles for the tile kernel.

The table is int32 [B, Hq, C, S] for a query chunk at positions pos0 .. pos0 + C - 1: slot 0 is the
query's own block, the other slots blocks strictly before it, -1 an unused slot. Its entries
e = ((b * Hq + h) * C + c) * S + slot are grouped by key = (b * Hkv + h // G) * n_blocks + block
(G = Hq // Hkv) with no host sync, by one of three methods: "count" (a stable counting sort, the
default), "ticket" (own entries ranked analytically, the others by atomic tickets) or "sort" (a stable
torch.sort). It knows nothing of attention or of how the table was routed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# "count" by default up to this many key blocks (it keeps a histogram row in registers). On an H200, last 1M
# chunk, GPU time per chunk (CUDA graph): count 0.655 ms, ticket 0.907 ms (atomics on ~1K hot counters).
COUNT_MAX_BLOCKS = 4096
COUNT_TILE = (256, 2)  # counting_sort (tb, ts); H200 GPU time a 1M chunk: (256, 2) 0.438 ms, (128, 8) 0.655
METHODS = ("ticket", "count", "sort")


def build_tiles(blk: torch.Tensor, Hkv: int, n_blocks: int, bm: int, *, pos0: int, block_size: int,
                method: str | None = None):  # fmt: skip
    """CSR of the blocks table by (batch, KV head, block), cut into tiles of bm rows; no host sync.

    Args:
        blk: int32 [B, Hq, C, S] of queries at positions pos0 .. pos0 + C - 1; entry
            e = ((b * Hq + h) * C + c) * S + slot; slot 0 the own block, -1 = unused.
        method: "count" (`counting_sort`, the default up to COUNT_MAX_BLOCKS blocks), "ticket"
            (`ticket_csr`) or "sort" (torch.sort, the default above; bincount syncs with the host).
    Returns:
        dict of device tensors perm (entries grouped by key: in stable-sort order for "count" and
        "sort"; for "ticket" own-block entries first in that order, the rest in any order), tile_key
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
    if method == "ticket":
        perm, off, cnt = ticket_csr(blk.contiguous(), Hkv, n_blocks, pos0=pos0, block_size=block_size)
    elif method == "count":
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
def _own_range(j, pos0, C, block_size):
    """First chunk query in block j and how many of the chunk's queries are in it."""
    lo = tl.maximum(j * block_size - pos0, 0)
    return lo, tl.maximum(tl.minimum(j * block_size + block_size - pos0, C) - lo, 0)


@triton.jit
def _own_count_kernel(CNT, n_keys, NB, C, G, pos0, block_size, BK: tl.constexpr):
    k = tl.program_id(0) * BK + tl.arange(0, BK)
    _, n_c = _own_range(k % NB, pos0, C, block_size)
    tl.store(CNT + k, G * n_c, mask=k < n_keys)


@triton.jit
def _entry(BLK, n, C, Hq, G, Hkv, NB, pos0, block_size, S: tl.constexpr, BE: tl.constexpr):
    """This program's entries: (e, key, live, own, c, h); slot 0 is taken as the own block, not read."""
    e = tl.program_id(0) * BE + tl.arange(0, BE)
    slot, c, bh = e % S, (e // S) % C, e // (S * C)
    own = (slot == 0) & (e < n)
    j = tl.load(BLK + e, mask=(e < n) & ~own, other=-1)
    j = tl.where(own, (pos0 + c) // block_size, j)
    h = bh % Hq
    live = j >= 0
    return e, tl.where(live, ((bh // Hq) * Hkv + h // G) * NB + j, 0), live, own, c, h


@triton.jit
def _ticket_kernel(BLK, CNT, TICKET, n, C, Hq, G, Hkv, NB, pos0, block_size, S: tl.constexpr, BE: tl.constexpr):
    e, key, live, own, c, h = _entry(BLK, n, C, Hq, G, Hkv, NB, pos0, block_size, S, BE)
    lo, n_c = _own_range((pos0 + c) // block_size, pos0, C, block_size)
    routed = tl.atomic_add(CNT + key, 1, mask=live & ~own, sem="relaxed")
    tl.store(TICKET + e, tl.where(own, (h % G) * n_c + c - lo, routed), mask=live)


@triton.jit
def _place_kernel(BLK, TICKET, KEY_OFF, PERM, n, C, Hq, G, Hkv, NB, pos0, block_size, S: tl.constexpr,
                  BE: tl.constexpr):  # fmt: skip
    e, key, live, _, _, _ = _entry(BLK, n, C, Hq, G, Hkv, NB, pos0, block_size, S, BE)
    at = tl.load(KEY_OFF + key, mask=live, other=0) + tl.load(TICKET + e, mask=live, other=0)
    tl.store(PERM + at, e, mask=live)


def ticket_csr(blk: torch.Tensor, Hkv: int, n_blocks: int, *, pos0: int, block_size: int, be: int = 1024):
    """CSR of the blocks table with two passes over the entries and one atomic per routed entry.

    A key's list starts with its own-block entries in (head, query) order, ranked analytically
    (the same order a stable sort gives them); the other entries follow in atomic-ticket order,
    which varies from run to run. Slot 0 is taken to be the own block (pos0 + c) // block_size, as
    the routing kernel writes it, and is not read; other entries with block -1 are left out.
    Args:
        blk: int32 [B, Hq, C, S], contiguous, fewer than 2**31 entries; queries at pos0 .. pos0 + C - 1.
    Returns:
        (perm int32 [B * Hq * C * S], only its first key_cnt.sum() entries written; key_off, key_cnt
        int64 [B * Hkv * n_blocks]).
    """
    B, Hq, C, S = blk.shape
    n, n_keys, G = blk.numel(), B * Hkv * n_blocks, Hq // Hkv
    cnt = torch.empty(n_keys, device=blk.device, dtype=torch.int32)
    _own_count_kernel[(triton.cdiv(n_keys, 1024),)](cnt, n_keys, n_blocks, C, G, pos0, block_size, BK=1024)
    ticket = torch.empty(n, device=blk.device, dtype=torch.int32)
    grid = (triton.cdiv(n, be),)
    _ticket_kernel[grid](blk, cnt, ticket, n, C, Hq, G, Hkv, n_blocks, pos0, block_size, S=S, BE=be, num_warps=4)
    key_cnt = cnt.long()
    key_off = cnt.cumsum(0, dtype=torch.int64) - key_cnt
    perm = torch.empty(n, device=blk.device, dtype=torch.int32)
    _place_kernel[grid](blk, ticket, key_off, perm, n, C, Hq, G, Hkv, n_blocks, pos0, block_size, S=S, BE=be,
                        num_warps=4)  # fmt: skip
    return perm, key_off, key_cnt


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
