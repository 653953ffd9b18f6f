"""The Triton MoBA kernels against the portable path (the reference on GPU).

On CUDA every kernel runs for real on many shapes (end to end with the Hopper tile kernel where it applies
and with the Triton one): ragged tails, GQA ratios 1/4/7/8, Tq < Tk,
Tq = 1, sinks, head dims 64/128/256, fp16 and bf16, and every torch.empty the launcher takes is
NaN-poisoned (conftest.py), so an unwritten output element fails. Without CUDA but with Triton,
a subset runs in one subprocess under TRITON_INTERPRET=1 (fp16 only: the interpreter computes
bf16 dots wrongly). Without Triton the module is skipped.
"""

import json

import pytest
import torch

import moba
from moba import portable_moba_attention
from moba.routing import block_means, select_blocks
from tests.moba.mobatest import make_qkv, rel_err, run_interpreted

triton = pytest.importorskip("triton", reason="needs Triton")
CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")

# B, Hq, Hkv, Tq, Tk, D, block, top_k, sinks
CASES = [
    (1, 4, 4, 1000, 1000, 64, 64, 3, 0),  # GQA 1, ragged tail
    (2, 8, 2, 777, 777, 128, 128, 4, 1),  # GQA 4, batch 2, sinks
    (1, 28, 4, 600, 2000, 128, 128, 5, 0),  # GQA 7, chunked prefill
    (1, 16, 2, 1, 3000, 128, 256, 4, 1),  # GQA 8, decode
    (1, 7, 1, 2, 1500, 64, 100, 3, 2),  # GQA 7, two queries, block not a multiple of the tile
    (1, 8, 1, 300, 1300, 256, 64, 3, 1),  # D 256, GQA 8
    (1, 4, 2, 50, 5000, 64, 512, 4, 0),  # few queries on the tile path: key splits
    (1, 2, 2, 4096, 4096, 128, 256, 8, 0),  # many tiles per block
    (1, 4, 1, 513, 513, 64, 50, 1, 0),  # top_k 1: block-local
    (1, 14, 2, 333, 333, 64, 32, 6, 3),  # GQA 7, many sinks
]
IDS = ["B{}-H{}x{}-T{}of{}-D{}-bs{}-k{}-s{}".format(*c) for c in CASES]


def _run(case, dtype, device, **kw):
    B, Hq, Hkv, Tq, Tk, D, bs, top_k, sinks = case
    from moba.triton import triton_moba_attention

    q, k, v = make_qkv(B, Hq, Hkv, Tq, Tk, D, dtype=dtype, device=device)
    args = dict(block_size=bs, top_k=top_k, sink_blocks=sinks, return_routing=True, **kw)
    out, r = triton_moba_attention(q, k, v, **args)
    ref, rr = portable_moba_attention(q, k, v, **args)
    return out, ref, r, rr


def _routing_agrees(r, rr) -> None:
    same = (r.blocks == rr.blocks).all(-1)
    assert same.float().mean() >= 0.999  # a near-tie may flip under another summation order
    assert torch.equal(r.scores[same] == float("-inf"), rr.scores[same] == float("-inf"))
    fin = torch.isfinite(rr.scores) & same[..., None]
    assert torch.allclose(r.scores[fin], rr.scores[fin], rtol=1e-4, atol=1e-4)


@gpu
@pytest.mark.parametrize("hopper", [True, False], ids=["gluon", "triton-tiles"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_kernels_match_portable(monkeypatch, case, dtype, hopper):
    import moba.triton.launcher as launcher
    from moba.triton import compute_mode

    if hopper:  # the Gluon kernel where it applies (a Hopper GPU), as on an exclusive-process one
        monkeypatch.setattr(compute_mode, "exclusive_process", lambda ordinal: True)
    else:
        monkeypatch.setattr(launcher, "_hopper_module", lambda: None)
    out, ref, r, rr = _run(case, dtype, "cuda")
    assert out.dtype == dtype and not out.isnan().any()
    assert rel_err(out, ref) <= 1e-2
    _routing_agrees(r, rr)


@gpu
def test_output_buffers_are_poisoned():
    assert torch.empty(4, device="cuda").isnan().all()  # conftest.py poisons every torch.empty


@gpu
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5]], ids=[IDS[1], IDS[3], IDS[5]])
def test_pool_kernel_matches_block_means(case):
    from moba.triton.routing import pool_means

    B, Hq, Hkv, Tq, Tk, D, bs, _, _ = case
    k = torch.randn(B, Hkv, Tk, D, device="cuda", dtype=torch.bfloat16)
    assert torch.allclose(pool_means(k, bs), block_means(k, bs), rtol=1e-5, atol=1e-6)


@gpu
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_routing_kernel_matches_select_blocks(case):
    from moba.triton.routing import route_chunk

    B, Hq, Hkv, Tq, Tk, D, bs, top_k, sinks = case
    q, k, _ = make_qkv(B, Hq, Hkv, Tq, Tk, D, dtype=torch.bfloat16, device="cuda")
    means = block_means(k, bs)
    c0, C = Tq // 3, Tq - Tq // 3
    blk, scr = route_chunk(
        q, means, c0, C, Tk - Tq + c0, block_size=bs, top_k=top_k, sink_blocks=sinks, scores=True
    )
    sel, sc = select_blocks(q[:, :, c0:], means, Tk - Tq + c0, block_size=bs, top_k=top_k, sink_blocks=sinks)
    own = torch.arange(Tk - Tq + c0, Tk, device="cuda") // bs
    assert torch.equal(blk[..., 0].long(), own.expand(B, Hq, C))
    ref = moba.Routing(blocks=torch.cat([own.expand(B, Hq, C)[..., None], sel], -1), scores=sc)
    _routing_agrees(moba.Routing(blocks=blk.long(), scores=scr[..., 1:]), moba.Routing(ref.blocks, sc))


def _csr_cases(device):
    """(blocks table, Hkv, n_blocks, pos0, block_size) shaped as the routing kernel writes them: slot 0
    the own block, the others earlier blocks or -1, the last slot block 0 (a sink: one hot key), two
    trailing blocks no entry names. Chunks start on and inside a block; one has a single query."""
    g = torch.Generator().manual_seed(1)
    shapes = [(1, 4, 2, 37, 5, 0, 8), (2, 8, 2, 300, 6, 85, 16), (1, 7, 1, 1, 4, 100, 32), (1, 28, 4, 600, 12, 1000, 64)]
    if device == "cuda":
        shapes.append((1, 28, 4, 12291, 12, (1 << 20) - 12291, 4096))  # the last chunk at 1M
    for B, Hq, Hkv, C, S, pos0, bs in shapes:
        own = ((pos0 + torch.arange(C)) // bs).expand(B, Hq, C)[..., None]
        past = (torch.rand(B, Hq, C, S - 1, generator=g) * own).long()
        past = torch.where((own == 0) | (torch.rand(past.shape, generator=g) < 0.2), -1, past)
        past[..., -1] = torch.where(own[..., 0] > 0, 0, -1)
        blk = torch.cat([own, past], -1).to(torch.int32)
        yield blk.to(device), Hkv, int(own.max()) + 3, pos0, bs


def _csr_agrees(blk, Hkv, nb, pos0, bs) -> dict:
    """What the Triton counting sort gets wrong against the stable torch.sort (empty list: nothing)."""
    from moba.triton.csr import build_tiles
    from tests.moba.mobatest import csr_mismatches

    got = {m: build_tiles(blk, Hkv, nb, 16, method=m) for m in ("count", "sort")}
    return {"count": csr_mismatches(got["count"], got["sort"])}


@gpu
def test_csr_methods_match_stable_sort():
    for blk, Hkv, nb, pos0, bs in _csr_cases("cuda"):
        assert _csr_agrees(blk, Hkv, nb, pos0, bs) == {"count": []}


@pytest.mark.parametrize("bm", [16, 128])
def test_tiles_know_their_rows(bm):
    from moba.triton.csr import build_tiles

    for blk, Hkv, nb, _, _ in _csr_cases("cpu"):
        t = build_tiles(blk, Hkv, nb, bm, method="sort")
        first, n_live = 0, int(t["tile_end"][-1])
        assert (t["tile_key"][n_live:] == t["n_keys"]).all()
        for key, (off, cnt) in enumerate(zip(t["key_off"].tolist(), t["key_cnt"].tolist())):
            for r0 in range(0, cnt, bm):  # every tile of this key, in order
                assert t["tile_key"][first] == key
                assert (t["tile_row"][first], t["tile_rows"][first]) == (off + r0, min(bm, cnt - r0))
                first += 1
        assert first == n_live


@gpu
@pytest.mark.parametrize("rows", [0, 1 << 20], ids=["tile-path", "decode-path"])
@pytest.mark.parametrize("case", [CASES[2], CASES[3], CASES[4], CASES[6]], ids=[IDS[2], IDS[3], IDS[4], IDS[6]])
def test_decode_and_tile_paths_agree(monkeypatch, case, rows):
    import moba.triton.launcher as launcher

    monkeypatch.setattr(launcher, "DECODE_ROWS", rows)
    out, ref, _, _ = _run(case, torch.bfloat16, "cuda")
    assert not out.isnan().any() and rel_err(out, ref) <= 1e-2


@gpu
def test_chunked_queries_match_one_chunk(monkeypatch):
    import moba.triton.launcher as launcher

    monkeypatch.setattr(launcher, "PARTIAL_BUDGET", 1 << 18)  # many small query chunks
    assert launcher.chunk_queries(1, 8, 3000, 4, 128, 2) < 100
    out, ref, r, rr = _run((1, 8, 2, 3000, 3500, 128, 128, 4, 1), torch.bfloat16, "cuda")
    assert rel_err(out, ref) <= 1e-2
    _routing_agrees(r, rr)


@gpu
def test_cached_key_means_and_scale():
    from moba.triton import triton_moba_attention

    q, k, v = make_qkv(1, 8, 2, 1, 4000, 128, dtype=torch.bfloat16, device="cuda")
    args = dict(block_size=256, top_k=4, scale=0.05)
    out = triton_moba_attention(q, k, v, key_means=block_means(k, 256), **args)
    assert rel_err(out, portable_moba_attention(q, k, v, **args)) <= 1e-2
    assert rel_err(out, portable_moba_attention(q, k, v, block_size=256, top_k=4)) > 1e-2


@gpu
def test_public_op_dispatches_to_triton_and_falls_back(monkeypatch):
    import moba.triton.launcher as launcher
    from moba import ops

    q, k, v = make_qkv(1, 4, 2, 700, 700, 64, dtype=torch.bfloat16, device="cuda")
    assert ops._resolve(q).__module__ == "moba.triton.launcher"
    out = moba.moba_attention(q, k, v, block_size=64, top_k=3)
    assert rel_err(out, portable_moba_attention(q, k, v, block_size=64, top_k=3)) <= 1e-2
    calls = []
    monkeypatch.setattr(launcher, "portable_moba_attention", lambda *a, **kw: calls.append(a) or portable_moba_attention(*a, **kw))
    q32, k32, v32 = (t.float() for t in (q, k, v))  # fp32 goes to the portable path
    a = launcher.triton_moba_attention(q32, k32, v32, block_size=64, top_k=3)
    assert len(calls) == 1 and calls[0][0] is q32
    # not torch.equal: the portable merge sums with index_add_, whose CUDA atomics add in any order
    assert rel_err(a, portable_moba_attention(q32, k32, v32, block_size=64, top_k=3)) <= 1e-6


INTERP_CASES = [CASES[0][:3] + (300, 300, 64, 32, 3, 0), (1, 7, 1, 63, 500, 64, 50, 2, 2),
                (1, 4, 1, 1, 777, 128, 64, 4, 1), (1, 8, 1, 5, 900, 64, 64, 3, 1),
                (1, 16, 2, 3, 700, 64, 64, 3, 0), (2, 4, 2, 130, 257, 128, 32, 4, 1),
                (1, 8, 2, 200, 333, 64, 32, 3, 1)]  # fmt: skip
# partial-buffer budget of each case: the last one runs in chunks of 45 queries, each starting inside a block
INTERP_BUDGETS = [1 << 30] * (len(INTERP_CASES) - 1) + [45 * 8 * 4 * (64 * 2 + 4)]

# every Triton kernel the launcher and build_tiles launch on CPU, by module (the pool kernel is CUDA only)
INTERP_KERNELS = {
    "routing": ["_route_kernel"],
    "attention": ["_tile_kernel"],
    "decode": ["_decode_kernel", "_merge_kernel"],
    "csr": ["_count_kernel", "_scatter_kernel"],
}

_INTERP_SCRIPT = """
    import importlib, json, sys
    import torch
    empty = torch.empty
    def poisoned(*a, **kw):
        t = empty(*a, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-(2**30))
    torch.empty = poisoned
    from tests.moba.mobatest import make_qkv, rel_err, run_interpreted
    from moba import portable_moba_attention
    from moba.triton import launcher, triton_moba_attention

    launches, fallbacks = {}, []
    class Launches:  # counts kernel[grid](...) launches, then runs the kernel
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel
        def __getitem__(self, grid):
            launches[self.name] = launches.get(self.name, 0) + 1
            return self.kernel[grid]
    cases, budgets, kernels = json.loads(sys.argv[1])
    for mod, names in kernels.items():
        mod = importlib.import_module("moba.triton." + mod)
        for name in names:
            setattr(mod, name, Launches(name, getattr(mod, name)))
    portable = launcher.portable_moba_attention
    launcher.portable_moba_attention = lambda *a, **kw: fallbacks.append(1) or portable(*a, **kw)

    torch.manual_seed(0)
    res = []
    for (B, Hq, Hkv, Tq, Tk, D, bs, k_, s_), budget in zip(cases, budgets):
        launcher.PARTIAL_BUDGET = budget
        q, k, v = make_qkv(B, Hq, Hkv, Tq, Tk, D, dtype=torch.float16)
        a = dict(block_size=bs, top_k=k_, sink_blocks=s_, return_routing=True)
        launches.clear()
        out, r = triton_moba_attention(q, k, v, **a)
        ran, fell_back = dict(launches), len(fallbacks)
        ref, rr = portable_moba_attention(q, k, v, **a)
        step = launcher.chunk_queries(B, Hq, Tq, k_ + s_, D, 2)
        res.append([rel_err(out, ref), bool(out.isnan().any()), bool(torch.equal(r.blocks, rr.blocks)), step, ran,
                    fell_back])
    from tests.moba.test_triton import _csr_agrees, _csr_cases
    launches.clear()
    res.append([[_csr_agrees(*c) for c in _csr_cases("cpu")], dict(launches)])
    print(json.dumps(res))
"""


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted(_INTERP_SCRIPT, json.dumps([INTERP_CASES, INTERP_BUDGETS, INTERP_KERNELS]))


@pytest.mark.skipif(CUDA, reason="the CUDA tests run these kernels for real")
@pytest.mark.parametrize("i", range(len(INTERP_CASES)), ids=["B{}-H{}x{}-T{}of{}-D{}-bs{}-k{}-s{}".format(*c) for c in INTERP_CASES])
def test_kernels_under_interpreter(interpreted, i):
    from moba.triton.launcher import DECODE_ROWS

    B, Hq, Hkv, Tq = INTERP_CASES[i][:4]
    err, has_nan, same_blocks, step, launches, fallbacks = interpreted[i]
    assert not has_nan and same_blocks
    assert err <= 1e-2
    chunks = [min(step, Tq - c0) for c0 in range(0, Tq, step)]
    assert (len(chunks) > 1) == (INTERP_BUDGETS[i] < 1 << 30)
    decode = sum(C * Hq // Hkv <= DECODE_ROWS for C in chunks)  # the launcher's choice per chunk
    assert fallbacks == 0  # the Triton kernels ran, not the portable path
    assert launches["_route_kernel"] == launches["_merge_kernel"] == len(chunks)
    assert launches.get("_decode_kernel", 0) == decode
    assert launches.get("_tile_kernel", 0) == launches.get("_count_kernel", 0) == len(chunks) - decode


@pytest.mark.skipif(CUDA, reason="the CUDA tests run these kernels for real")
def test_interpreter_cases_cover_both_attention_kernels(interpreted):
    ran = [interpreted[i][4] for i in range(len(INTERP_CASES))]
    assert any("_decode_kernel" in r for r in ran) and any("_tile_kernel" in r for r in ran)


@pytest.mark.skipif(CUDA, reason="the CUDA tests run these kernels for real")
def test_csr_methods_under_interpreter(interpreted):
    agree, launches = interpreted[-1]
    assert agree == [{"count": []}] * 4
    n = len(agree)  # "count": counting_sort; "sort" launches nothing
    assert launches == {"_count_kernel": n, "_scatter_kernel": n}
