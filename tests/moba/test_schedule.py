"""The tile schedule the attention kernels run on: routed blocks table -> CSR -> tiles, under hostile inputs.

The Gluon tile kernel (moba/triton/hopper.py) waits on barriers for the key tiles of its block that lie at
or before its rows: a live tile whose rows all sit before the block start has none, and the kernel must
not wait for one (it writes empty partials). These tests check the other side of that contract on the
kernels that build the schedule: for queries and key means holding NaN, +-inf and fp16 maxima, and with
every torch.empty filled with garbage (0x7fffffff / NaN), the routing kernel finishes, names no block
after a query's own, the counting sort writes every live entry exactly once, and every live tile has a
row that reaches its block. Without CUDA the kernels run under TRITON_INTERPRET=1 (fp16: the interpreter
computes bf16 dots wrongly); on CUDA they run for real in bf16 (the tensor-core gate).
"""

import json

import pytest
import torch

from tests.moba.mobatest import make_qkv, run_interpreted

triton = pytest.importorskip("triton", reason="needs Triton")
CUDA = torch.cuda.is_available()

# B, Hq, Hkv, Tq, Tk, D, block, top_k, sinks
CASES = [
    (1, 4, 2, 300, 700, 64, 32, 4, 1),  # chunked prefill, chunk starting inside a block
    (2, 6, 2, 129, 129, 64, 16, 6, 1),  # batch 2, one query past a full tile of one block
    (1, 7, 1, 200, 1000, 128, 64, 3, 0),  # GQA 7, no sink
]
IDS = ["B{}-H{}x{}-T{}of{}-D{}-bs{}-k{}-s{}".format(*c) for c in CASES]
GARBAGE_INT = 0x7FFFFFFF


def empty_tiles(blk: torch.Tensor, tiles: dict, pos0: int, block_size: int, n_blocks: int) -> list[int]:
    """Live tiles whose rows all sit before their block's first key (the Gluon kernel's n_iter < 1)."""
    C, S = blk.shape[2], blk.shape[3]
    bad = []
    for t in range(int(tiles["tile_end"][-1])):
        r0, n = int(tiles["tile_row"][t]), int(tiles["tile_rows"][t])
        e = tiles["perm"][r0 : r0 + n].long()
        pos = pos0 + (e // S) % C
        if n < 1 or int(pos.max()) < int(tiles["tile_key"][t]) % n_blocks * block_size:
            bad.append(t)
    return bad


def hostile_inputs(case, dtype, device):
    """q, k and fp32 key means with NaN, +-inf and fp16-max entries in a few rows."""
    from moba.routing import block_means

    B, Hq, Hkv, Tq, Tk, D, bs = case[:7]
    q, k, _ = make_qkv(B, Hq, Hkv, Tq, Tk, D, dtype=dtype, device=device)
    q[0, 0, 5], q[0, 1, 7], q[0, -1, Tq // 2], q[0, 2, 3] = float("nan"), float("inf"), -float("inf"), 6.0e4
    means = block_means(k.float(), bs).contiguous()
    means[0, 0, 1], means[0, -1, 2] = float("nan"), float("inf")
    return q, k, means


def schedule_report(case, dtype, device) -> dict:
    """What the routing kernel and the counting sort get wrong on hostile inputs ({} = nothing)."""
    from moba.triton.csr import build_tiles
    from moba.triton.routing import route_chunk

    B, Hq, Hkv, Tq, Tk, D, bs, top_k, sinks = case
    q, _, means = hostile_inputs(case, dtype, device)
    pos0, nb = Tk - Tq, -(-Tk // bs)
    blk, _ = route_chunk(q, means, 0, Tq, pos0, block_size=bs, top_k=top_k, sink_blocks=sinks)
    blk, own = blk.cpu(), (pos0 + torch.arange(Tq)) // bs
    report = {}
    if not bool(((blk <= own[None, None, :, None]) & (blk >= -1)).all()):
        report["blocks after own"] = int((blk - own[None, None, :, None]).max())
    tiles = build_tiles(blk.to(device), Hkv, nb, 128)
    tiles = {k: v.cpu() if torch.is_tensor(v) else v for k, v in tiles.items()}
    n = int(tiles["key_cnt"].sum())
    live = torch.nonzero(blk.reshape(-1) >= 0).reshape(-1)
    if not torch.equal(tiles["perm"][:n].long().sort().values, live):
        report["perm"] = "not every live entry exactly once"
    bad = empty_tiles(blk, tiles, pos0, bs, nb)
    if bad:
        report["empty tiles"] = bad[:8]
    return report


_INTERP_SCRIPT = """
    import json, sys
    import torch
    empty = torch.empty
    def garbage(*a, **kw):
        t = empty(*a, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(0x7FFFFFFF)
    torch.empty = garbage
    from tests.moba.test_schedule import schedule_report
    torch.manual_seed(0)
    print(json.dumps([schedule_report(tuple(c), torch.float16, "cpu") for c in json.loads(sys.argv[1])]))
"""


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted(_INTERP_SCRIPT, json.dumps(CASES))


@pytest.mark.skipif(CUDA, reason="the CUDA test runs these kernels for real")
@pytest.mark.parametrize("i", range(len(CASES)), ids=IDS)
def test_schedule_under_interpreter(interpreted, i):
    assert interpreted[i] == {}


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_schedule_on_cuda(monkeypatch, case):
    monkeypatch.setattr(torch, "empty", _filled(torch.empty))
    assert schedule_report(case, torch.bfloat16, "cuda") == {}


def _filled(factory):
    def make(*args, **kwargs):
        t = factory(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(GARBAGE_INT)

    return make


def test_empty_tiles_finds_a_block_after_the_queries():
    """The check above can fail: a table naming the next block for every query of a block gives, per block,
    a tile made only of queries before it (stable entry order puts them first)."""
    from moba.triton.csr import build_tiles

    C, bs, nb = 256, 128, 2
    own = (torch.arange(C) // bs)[None, None, :, None]
    nxt = torch.where(own + 1 < nb, own + 1, -1)
    blk = torch.cat([own, nxt], -1).to(torch.int32)
    tiles = build_tiles(blk, 1, nb, 128, method="sort")
    assert empty_tiles(blk, tiles, 0, bs, nb) == [1]
    own_only = blk[..., :1].contiguous()
    assert empty_tiles(own_only, build_tiles(own_only, 1, nb, 128, method="sort"), 0, bs, nb) == []
