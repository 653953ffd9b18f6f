"""The gate options (local blocks, sub-block gate) on every path against the spec and against oracles
written here without moba: all routed slots local == a sliding window of whole blocks; one sub-block
== the plain gate; the routing marks local blocks +inf; the static decode step agrees."""

import pytest
import torch

from moba import moba_attention, naive_moba_attention, portable_moba_attention
from moba.ops import backend_for, moba_routing
from moba.routing import block_means
from moba.static import static_moba_decode
from tests.moba.mobatest import make_qkv, rel_err

# B, Hq, Hkv, Tq, Tk, D, block, top_k, sinks, local, sub
CASES = [
    (1, 4, 2, 300, 300, 64, 32, 4, 0, 1, 1),
    (1, 4, 2, 300, 300, 64, 32, 4, 1, 2, 1),
    (2, 4, 1, 120, 520, 64, 40, 3, 1, 1, 4),  # chunked prefill, GQA 4
    (1, 6, 3, 1, 777, 64, 64, 4, 1, 1, 2),  # decode
    (1, 4, 4, 257, 257, 64, 16, 5, 0, 0, 8),
]


def _ids(c):
    return "B{}-H{}x{}-T{}of{}-D{}-bs{}-k{}-s{}-local{}-sub{}".format(*c)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_portable_matches_naive(case):
    B, Hq, Hkv, Tq, Tk, D, bs, top_k, sinks, local, sub = case
    q, k, v = make_qkv(B, Hq, Hkv, Tq, Tk, D)
    kw = dict(block_size=bs, top_k=top_k, sink_blocks=sinks, local_blocks=local, gate_subblocks=sub)
    ref, ref_r = naive_moba_attention(q, k, v, return_routing=True, **kw)
    out, r = portable_moba_attention(q, k, v, return_routing=True, **kw)
    assert rel_err(out, ref) <= 1e-5
    assert torch.equal(r.blocks.sort(-1).values, ref_r.blocks.sort(-1).values)  # local blocks tie at +inf
    assert torch.equal(moba_routing(q, k, **kw).blocks.sort(-1).values, ref_r.blocks.sort(-1).values)


@pytest.mark.parametrize("fn", [naive_moba_attention, portable_moba_attention, moba_attention])
def test_all_routed_slots_local_is_a_block_window(fn):
    q, k, v = make_qkv(1, 4, 2, 200, 400, 64)
    out, routing = fn(q, k, v, block_size=32, top_k=3, local_blocks=2, return_routing=True)
    group = 2
    kf, vf = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    qp = torch.arange(200, 400)[:, None]
    kp = torch.arange(400)[None, :]
    mask = (kp <= qp) & (kp // 32 >= qp // 32 - 2)  # own block and the two before it
    s = (q @ kf.transpose(-1, -2) * 64**-0.5).masked_fill(~mask, float("-inf"))
    assert rel_err(out, s.softmax(-1) @ vf) <= 1e-5
    assert (routing.scores[..., 1:3] == float("inf")).all()


def test_local_blocks_change_the_result_and_keep_the_budget():
    q, k, v = make_qkv(1, 4, 2, 512, 512, 64)
    plain, r0 = portable_moba_attention(q, k, v, block_size=32, top_k=4, return_routing=True)
    local, r1 = portable_moba_attention(q, k, v, block_size=32, top_k=4, local_blocks=1, return_routing=True)
    assert rel_err(local, plain) > 1e-3
    assert r1.blocks.shape == r0.blocks.shape
    prev = torch.arange(512) // 32 - 1
    has_prev = prev >= 0
    assert (r1.blocks[0, :, has_prev, 1] == prev[has_prev]).all()


def test_one_subblock_is_the_plain_gate_and_more_change_routing():
    q, k, v = make_qkv(1, 4, 2, 256, 512, 64)
    base = naive_moba_attention(q, k, v, block_size=64, top_k=3, return_routing=True)[1]
    one = naive_moba_attention(q, k, v, block_size=64, top_k=3, gate_subblocks=1, return_routing=True)[1]
    four = naive_moba_attention(q, k, v, block_size=64, top_k=3, gate_subblocks=4, return_routing=True)[1]
    assert torch.equal(base.blocks, one.blocks)
    assert not torch.equal(base.blocks, four.blocks)
    parts = block_means(k, 64, 4)
    assert parts.shape == (1, 2, 8, 4, 64)
    assert torch.allclose(parts.mean(3), block_means(k, 64), atol=1e-6)


@pytest.mark.parametrize("local,sub", [(1, 1), (2, 1), (0, 2), (1, 4)])
def test_static_decode_step_agrees(local, sub):
    B, Hq, Hkv, D, bs, cap, n = 1, 4, 2, 64, 32, 512, 301
    q, k, v = make_qkv(B, Hq, Hkv, 1, cap, D)
    sums = k[:, :, : cap // bs * bs].float().reshape(B, Hkv, cap // bs, bs, D).sum(3)
    kw = dict(block_size=bs, top_k=4, sink_blocks=1, local_blocks=local, gate_subblocks=sub)
    out = static_moba_decode(q, k, v, torch.tensor([n]), sums, **kw)
    ref = naive_moba_attention(q, k[:, :, :n], v[:, :, :n], **kw)
    assert rel_err(out, ref) <= 1e-5


def test_gate_options_are_served_by_the_portable_path():
    q = torch.zeros(1, 1, 1, 8)
    assert backend_for(q, local_blocks=1) == "portable"
    assert backend_for(q, gate_subblocks=2) == "portable"


@pytest.mark.parametrize("kw,match", [
    (dict(top_k=3, local_blocks=3), "local_blocks < top_k"),
    (dict(top_k=3, local_blocks=-1), "local_blocks < top_k"),
    (dict(top_k=3, gate_subblocks=3), "divide block_size"),
    (dict(top_k=3, gate_subblocks=0), "divide block_size"),
])
def test_bad_gate_options_raise(kw, match):
    q, k, v = make_qkv(1, 2, 2, 64, 64, 16)
    with pytest.raises(ValueError, match=match):
        moba_attention(q, k, v, block_size=16, **kw)
