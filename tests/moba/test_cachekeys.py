"""The cache-to-attention contract (moba/cachekeys.py): what a cache attaches, attention reads back."""

import torch

from moba.cachekeys import attach_block_means, attach_static, block_means_of, static_of


def test_block_means_round_trip_and_absence():
    keys, means = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 2, 4)
    assert block_means_of(keys) is None and static_of(keys) is None
    assert attach_block_means(keys, means) is keys
    assert block_means_of(keys) is means
    assert static_of(keys) is None  # means alone do not make a static buffer
    assert block_means_of(keys[:, :, :4]) is None  # a view is another tensor object: it carries nothing


def test_static_round_trip():
    keys, length, sums = torch.zeros(1, 2, 16, 4), torch.tensor([5]), torch.randn(1, 2, 4, 4)
    assert attach_static(keys, length, sums) is keys
    static = static_of(keys)
    assert static.length is length and static.block_sums is sums
    assert block_means_of(keys) is None
