"""The portable path and the public op against the spec (moba/naive.py) and dense oracles."""

import inspect

import pytest
import torch
import torch.nn.functional as F

import moba
import moba.portable
from moba import moba_attention, naive_moba_attention, portable_moba_attention
from moba.ops import _LOADERS
from moba.types import MobaKernel
from tests.moba.mobatest import attended_blocks, block_local_reference, force_sparse, make_qkv, rel_err, spy

# B, Hq, Hkv, Tq, Tk, D, block, top_k, sinks
CASES = [
    (1, 4, 4, 300, 300, 64, 64, 3, 0),  # ragged last block
    (2, 4, 2, 257, 257, 64, 32, 4, 1),
    (1, 8, 2, 100, 1000, 64, 64, 3, 0),  # chunked prefill: Tq < Tk
    (1, 4, 1, 1, 777, 128, 64, 4, 1),  # decode
    (1, 7, 1, 63, 500, 64, 50, 2, 2),  # GQA 7, sinks
    (1, 4, 1, 200, 640, 256, 64, 3, 1),  # D 256
    (1, 2, 2, 128, 128, 128, 16, 1, 0),  # top_k 1
    (2, 6, 3, 31, 31, 64, 128, 5, 0),  # a single partial block
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-H{}x{}-T{}of{}-D{}-bs{}-k{}-s{}".format(*c))
def test_portable_matches_naive_fp32(case):
    B, Hq, Hkv, Tq, Tk, D, bs, top_k, sinks = case
    q, k, v = make_qkv(B, Hq, Hkv, Tq, Tk, D)
    ref = naive_moba_attention(q, k, v, block_size=bs, top_k=top_k, sink_blocks=sinks)
    out = portable_moba_attention(q, k, v, block_size=bs, top_k=top_k, sink_blocks=sinks)
    assert not out.isnan().any()
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES[:5], ids=lambda c: f"T{c[3]}of{c[4]}-D{c[5]}")
def test_portable_matches_naive_half(case, dtype):
    B, Hq, Hkv, Tq, Tk, D, bs, top_k, sinks = case
    q, k, v = make_qkv(B, Hq, Hkv, Tq, Tk, D, dtype=dtype)
    ref = naive_moba_attention(q, k, v, block_size=bs, top_k=top_k, sink_blocks=sinks)
    out = portable_moba_attention(q, k, v, block_size=bs, top_k=top_k, sink_blocks=sinks)
    assert out.dtype == dtype
    assert rel_err(out, ref) <= 1e-2


@pytest.mark.parametrize("budget", [1 << 8, 1 << 30], ids=["grouped", "gathered"])
def test_both_gather_strategies_match_naive(monkeypatch, budget):
    monkeypatch.setattr(moba.portable, "_SCORE_BUDGET", budget)
    q, k, v = make_qkv(1, 4, 2, 180, 400, 64)
    ref = naive_moba_attention(q, k, v, block_size=32, top_k=3, sink_blocks=1)
    out = portable_moba_attention(q, k, v, block_size=32, top_k=3, sink_blocks=1)
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[4], CASES[5]], ids=lambda c: f"T{c[3]}of{c[4]}-D{c[5]}")
def test_grouped_tiles_without_cpu_flash_match_naive(monkeypatch, case):
    """The bmm + exp tiles (CUDA, or a torch without the CPU flash op) and the flash tiles agree with the spec."""
    B, Hq, Hkv, Tq, Tk, D, bs, top_k, sinks = case
    q, k, v = make_qkv(B, Hq, Hkv, Tq, Tk, D)
    ref = naive_moba_attention(q, k, v, block_size=bs, top_k=top_k, sink_blocks=sinks)
    monkeypatch.setattr(moba.portable, "_SCORE_BUDGET", 1 << 12)  # the grouped-tiles path, many small batches
    flash = portable_moba_attention(q, k, v, block_size=bs, top_k=top_k, sink_blocks=sinks)
    monkeypatch.setattr(moba.portable, "_CPU_FLASH", None)
    plain = portable_moba_attention(q, k, v, block_size=bs, top_k=top_k, sink_blocks=sinks)
    assert rel_err(flash, ref) <= 1e-5 and rel_err(plain, ref) <= 1e-5


def _causal_sdpa(q, k, v):
    Tq, Tk = q.shape[2], k.shape[2]
    mask = torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq)  # bottom-right aligned causal
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask)


@pytest.mark.parametrize("budget", [1 << 30, 1 << 12], ids=["gathered", "grouped"])
@pytest.mark.parametrize("Tq,Tk", [(256, 256), (40, 256), (1, 256)])
@pytest.mark.parametrize("fn", [naive_moba_attention, portable_moba_attention, moba_attention])
def test_top_k_covering_all_blocks_is_dense_causal_on_the_sparse_path(monkeypatch, fn, Tq, Tk, budget):
    """With the dense shortcuts taken away, the sparse code itself must give causal SDPA."""
    monkeypatch.setattr(moba.portable, "_SCORE_BUDGET", budget)
    sparse_chunks = force_sparse(monkeypatch)
    q, k, v = make_qkv(1, 4, 2, Tq, Tk, 64)
    out, routing = fn(q, k, v, block_size=32, top_k=8, return_routing=True)
    assert rel_err(out, _causal_sdpa(q, k, v)) <= 1e-5
    assert fn is naive_moba_attention or sparse_chunks  # the naive spec has no shortcut to take
    own = torch.arange(Tk - Tq, Tk) // 32
    assert torch.equal(attended_blocks(routing, 8), (torch.arange(8) <= own[:, None]).expand(1, 4, Tq, 8))


@pytest.mark.parametrize("top_k,sinks,taken", [(8, 0, True), (7, 1, True), (7, 0, False)])
@pytest.mark.parametrize("Tq,Tk", [(256, 256), (40, 256), (1, 256)])
def test_dense_shortcut_is_taken_exactly_when_it_covers_and_equals_sparse(monkeypatch, Tq, Tk, top_k, sinks, taken):
    q, k, v = make_qkv(1, 4, 2, Tq, Tk, 64)
    args = dict(block_size=32, top_k=top_k, sink_blocks=sinks)
    with pytest.MonkeyPatch.context() as mp:
        ran = force_sparse(mp)
        sparse = portable_moba_attention(q, k, v, **args)
        assert ran
    op_dense = spy(monkeypatch, moba.ops, "dense_attention")
    portable_dense = spy(monkeypatch, moba.portable, "dense_attention")
    chunks = spy(monkeypatch, moba.portable, "_attend_chunk")
    out = moba_attention(q, k, v, **args)
    assert (len(op_dense), bool(chunks)) == ((1, False) if taken else (0, True))
    assert rel_err(out, sparse) <= 1e-5
    del chunks[:]
    out = portable_moba_attention(q, k, v, **args)  # portable's own per-chunk shortcut
    assert (bool(portable_dense), bool(chunks)) == (taken, not taken)
    assert rel_err(out, sparse) <= 1e-5


@pytest.mark.parametrize("fn", [naive_moba_attention, portable_moba_attention, moba_attention])
def test_top_k_one_is_block_local(fn):
    q, k, v = make_qkv(1, 6, 3, 90, 300, 64)
    out = fn(q, k, v, block_size=40, top_k=1)
    assert rel_err(out, block_local_reference(q, k, v, 40)) <= 1e-5


@pytest.mark.parametrize("fn", [naive_moba_attention, portable_moba_attention, moba_attention])
def test_small_top_k_attends_fewer_keys_than_dense(monkeypatch, fn):
    """Sparsity guard: each query attends its own block causally plus at most top_k - 1 routed and
    the sink blocks, far fewer keys than dense, and the output is not dense attention."""
    q, k, v = make_qkv(1, 4, 2, 512, 512, 64)
    bs, top_k, sinks = 32, 3, 1
    dense_calls = spy(monkeypatch, moba.ops, "dense_attention") + spy(monkeypatch, moba.portable, "dense_attention")
    out, routing = fn(q, k, v, block_size=bs, top_k=top_k, sink_blocks=sinks, return_routing=True)
    assert not dense_calls
    pos = torch.arange(512)
    own = pos // bs
    hit = attended_blocks(routing, 16)
    assert hit[..., pos, own].all()
    n = hit.sum(-1)
    assert (n <= top_k + sinks).all() and (n[..., own >= top_k + sinks] == top_k + sinks).all()
    keys = (hit & (torch.arange(16) < own[:, None])).sum(-1) * bs + pos % bs + 1
    assert keys.sum() < 0.5 * (pos + 1).sum() * 4
    assert rel_err(out, _causal_sdpa(q, k, v)) > 0.05


def test_scale_is_honoured():
    q, k, v = make_qkv(1, 2, 2, 100, 100, 64)
    ref = naive_moba_attention(q, k, v, block_size=16, top_k=3, scale=0.3)
    out = portable_moba_attention(q, k, v, block_size=16, top_k=3, scale=0.3)
    assert rel_err(out, ref) <= 1e-5
    assert rel_err(out, portable_moba_attention(q, k, v, block_size=16, top_k=3)) > 1e-3


def test_cached_key_means_give_the_same_result():
    q, k, v = make_qkv(1, 4, 2, 1, 500, 64)
    means = moba.block_means(k, 32)
    out = portable_moba_attention(q, k, v, block_size=32, top_k=3, key_means=means)
    assert rel_err(out, portable_moba_attention(q, k, v, block_size=32, top_k=3)) <= 1e-6


def test_naive_backend_selectable():
    q, k, v = make_qkv(1, 2, 1, 64, 256, 64)
    moba.set_backend("naive")
    try:
        a = moba_attention(q, k, v, block_size=16, top_k=2)
    finally:
        moba.set_backend("auto")
    assert rel_err(a, portable_moba_attention(q, k, v, block_size=16, top_k=2)) <= 1e-5
    with pytest.raises(ValueError, match="unknown MoBA backend"):
        moba.set_backend("cuda-magic")


@pytest.mark.parametrize(
    "shapes,kwargs,match",
    [
        (((1, 3, 8, 16), (1, 2, 8, 16)), {}, "multiple of KV heads"),
        (((1, 2, 9, 16), (1, 2, 8, 16)), {}, "more queries"),
        (((1, 2, 8, 16), (1, 2, 8, 32)), {}, "head dim"),
        (((1, 2, 8, 16), (1, 2, 8, 16)), {"top_k": 0}, "top_k >= 1"),
        (((2, 8, 16), (1, 2, 8, 16)), {}, "4-D"),
    ],
)
def test_bad_inputs_raise(shapes, kwargs, match):
    q, k = torch.randn(*shapes[0]), torch.randn(*shapes[1])
    args = {"block_size": 4, "top_k": 2} | kwargs
    for fn in (moba_attention, naive_moba_attention, portable_moba_attention):
        with pytest.raises(ValueError, match=match):
            fn(q, k, k, **args)


def _params(fn) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values() if p.name != "self"]


@pytest.mark.parametrize("name", ["op", *_LOADERS])
def test_every_backend_takes_the_kernel_contract(name):
    fn = moba_attention if name == "op" else _LOADERS[name]()
    assert _params(fn) == _params(MobaKernel.__call__)
