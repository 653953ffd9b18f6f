"""Exact attention of MoBA's degenerate cases (moba/dense.py) against SDPA over expanded K/V."""

import pytest
import torch
import torch.nn.functional as F

from moba.dense import dense_attention, one_query_attention


@pytest.mark.parametrize("hq,hkv", [(8, 2), (4, 4), (12, 1)])
def test_one_query_reads_the_kv_heads_in_place(hq, hkv, monkeypatch):
    g = torch.Generator().manual_seed(hq * 10 + hkv)
    q, k, v = (torch.randn(2, h, t, 16, generator=g) for h, t in ((hq, 1), (hkv, 300), (hkv, 300)))
    mask = torch.arange(300) < 217
    group = hq // hkv
    ref_k, ref_v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    want_all = F.scaled_dot_product_attention(q, ref_k, ref_v, scale=0.3)
    want_masked = F.scaled_dot_product_attention(q, ref_k, ref_v, attn_mask=mask[None, None, None, :], scale=0.3)
    monkeypatch.setattr(torch.Tensor, "repeat_interleave", _no_copy)  # no expanded K/V on the way
    torch.testing.assert_close(one_query_attention(q, k, v, scale=0.3), want_all)
    torch.testing.assert_close(one_query_attention(q, k, v, mask, scale=0.3), want_masked)
    torch.testing.assert_close(dense_attention(q, k, v, scale=0.3), want_all)  # a decode step of a dense layer


def _no_copy(*_a, **_k):
    raise AssertionError("K/V expanded over the query heads")
