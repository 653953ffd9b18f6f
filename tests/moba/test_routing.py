"""Routing output: valid, causal, own block and sinks included, scores equal q . mean(K)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moba import moba_attention, naive_moba_attention, portable_moba_attention
from tests.moba.mobatest import make_qkv, rel_err


@pytest.mark.parametrize("fn", [naive_moba_attention, portable_moba_attention, moba_attention])
def test_routing_is_valid(fn):
    bs, top_k, sinks = 32, 3, 2
    q, k, v = make_qkv(2, 6, 2, 150, 400, 64)
    _, r = fn(q, k, v, block_size=bs, top_k=top_k, sink_blocks=sinks, return_routing=True)
    assert r.blocks.shape == (2, 6, 150, top_k + sinks) and r.blocks.dtype == torch.long
    own = torch.arange(250, 400) // bs
    assert torch.equal(r.blocks[..., 0], own.expand(2, 6, 150))
    assert torch.isinf(r.scores[..., 0]).all() and (r.scores[..., 0] > 0).all()
    picked = r.blocks[..., 1:]
    assert ((picked == -1) | ((picked >= 0) & (picked < own[:, None]))).all()
    assert torch.equal(picked[..., top_k - 1 :], torch.tensor([0, 1]).expand(2, 6, 150, 2))
    for row in r.blocks.reshape(-1, top_k + sinks).tolist():
        used = [b for b in row if b >= 0]
        assert len(used) == len(set(used))
    assert torch.equal(r.scores == float("-inf"), r.blocks == -1)


def test_scores_equal_q_dot_block_mean():
    bs = 16
    q, k, v = make_qkv(1, 4, 2, 64, 160, 64)
    _, r = portable_moba_attention(q, k, v, block_size=bs, top_k=4, sink_blocks=1, return_routing=True)
    means = k.reshape(1, 2, 10, bs, 64).mean(3).repeat_interleave(2, 1)  # [1, 4, 10, 64]
    gate = torch.einsum("bhtd,bhnd->bhtn", q, means)
    used = r.blocks[..., 1:] >= 0
    expect = gate.gather(-1, r.blocks[..., 1:].clamp(min=0))
    assert torch.allclose(r.scores[..., 1:][used], expect[used], atol=1e-5)
    routed, rscore = r.blocks[..., 1:4], r.scores[..., 1:4]
    assert (rscore[..., :-1] >= rscore[..., 1:]).all()  # best first
    own = torch.arange(96, 160) // bs
    for t in range(64):
        cands = [b for b in range(1, own[t])]
        best = sorted(cands, key=lambda b: -gate[0, 0, t, b].item())[:3]
        assert sorted(b for b in routed[0, 0, t].tolist() if b >= 0) == sorted(best)


def test_routing_agrees_between_naive_and_portable():
    q, k, v = make_qkv(1, 8, 4, 300, 300, 64)
    _, a = naive_moba_attention(q, k, v, block_size=20, top_k=4, sink_blocks=1, return_routing=True)
    _, b = portable_moba_attention(q, k, v, block_size=20, top_k=4, sink_blocks=1, return_routing=True)
    assert torch.equal(a.blocks, b.blocks)
    assert torch.allclose(a.scores, b.scores, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    hkv=st.integers(1, 3),
    group=st.sampled_from([1, 2, 4, 7]),
    tk=st.integers(1, 400),
    tq_frac=st.floats(0.0, 1.0),
    d=st.sampled_from([64, 128]),
    bs=st.integers(1, 96),
    top_k=st.integers(1, 6),
    sinks=st.integers(0, 2),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_shapes_match_spec(hkv, group, tk, tq_frac, d, bs, top_k, sinks, seed):
    torch.manual_seed(seed)
    tq = max(1, round(tk * tq_frac))
    q, k, v = make_qkv(1, hkv * group, hkv, tq, tk, d)
    kw = dict(block_size=bs, top_k=top_k, sink_blocks=sinks)
    ref, r_ref = naive_moba_attention(q, k, v, return_routing=True, **kw)
    out, r_out = portable_moba_attention(q, k, v, return_routing=True, **kw)
    assert rel_err(out, ref) <= 1e-5
    assert rel_err(moba_attention(q, k, v, **kw), ref) <= 1e-5
    assert torch.equal(r_ref.blocks, r_out.blocks)
