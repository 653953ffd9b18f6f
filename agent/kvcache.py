"""A preallocated KV cache for transformers models that keeps MoBA block means up to date.

Each layer owns K and V buffers of [B, Hkv, capacity, D], allocated once on first use. `update`
writes the new positions in place (no O(N) concatenation) and returns views of the filled part
only, so attention sees "queries are the last Tq of Tk keys". It also adds the new keys into
fp32 per-block sums; the key view carries the complete blocks' means as `_moba_block_means`,
so a decode step never re-pools the cache. `truncate(n)` crops back to a prefix in O(block).
Knows nothing of prompts, files or MoBA's routing rules.
"""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class CacheFullError(ValueError):
    """Raised when more tokens are written than the cache was sized for."""


class MobaLayer(CacheLayerMixin):
    """One layer's preallocated K/V buffers plus fp32 block sums of the keys."""

    is_compileable = False
    is_sliding = False

    def __init__(self, capacity: int, block_size: int):
        super().__init__()
        self.capacity, self.block_size, self.filled = capacity, block_size, 0
        self.sums: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, D = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_zeros(B, H, self.capacity, D)
        self.values = value_states.new_zeros(B, H, self.capacity, value_states.shape[-1])
        n_blocks = math.ceil(self.capacity / self.block_size)
        self.sums = torch.zeros(B, H, n_blocks, D, dtype=torch.float32, device=key_states.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.filled, self.filled + key_states.shape[2]
        if end > self.capacity:
            raise CacheFullError(f"KV cache holds {self.capacity} tokens; {end} were asked for")
        self.keys[:, :, start:end] = key_states
        self.values[:, :, start:end] = value_states
        blocks = torch.arange(start, end, device=self.device) // self.block_size
        self.sums.index_add_(2, blocks, self.keys[:, :, start:end].float())
        self.filled = end
        keys = self.keys[:, :, :end]
        keys._moba_block_means = self.block_means()
        return keys, self.values[:, :, :end]

    def block_means(self) -> torch.Tensor:
        """fp32 [B, Hkv, filled // block_size, D] means of the complete blocks."""
        return self.sums[:, :, : self.filled // self.block_size] / self.block_size

    def truncate(self, n: int) -> None:
        """Keep the first n positions; only the block holding position n is re-pooled."""
        if not self.is_initialized or n >= self.filled:
            return
        b = n // self.block_size
        self.sums[:, :, b:].zero_()
        start = b * self.block_size
        self.sums[:, :, b] = self.keys[:, :, start:n].float().sum(2)
        self.filled = n

    def restore(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the content with keys/values [B, Hkv, n, D] (a saved prefix) and re-pool them."""
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        self.filled = 0
        self.sums.zero_()
        self.update(keys.to(self.device, self.dtype), values.to(self.device, self.dtype))

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        return self.filled + query_length, 0

    def get_seq_length(self) -> int:
        return self.filled

    def get_max_length(self) -> int:
        return self.capacity

    def reset(self) -> None:
        self.truncate(0)


class MobaCache(Cache):
    """A `transformers.Cache` of `MobaLayer`s, one per decoder layer.

    Args:
        num_layers: decoder layers of the model.
        capacity: the most tokens it will hold (context + question + answer).
        block_size: the MoBA block size whose means it keeps.
    """

    def __init__(self, num_layers: int, capacity: int, block_size: int):
        super().__init__(layers=[MobaLayer(capacity, block_size) for _ in range(num_layers)])
        self.capacity = capacity

    def truncate(self, n: int) -> None:
        """Crop every layer back to its first n positions. Copies nothing but one partial block."""
        for layer in self.layers:
            layer.truncate(n)

    def export(self, n: int) -> dict[str, torch.Tensor]:
        """The first n positions of every layer as {"k.<i>", "v.<i>": [B, Hkv, n, D]} (views)."""
        out = {}
        for i, layer in enumerate(self.layers):
            out[f"k.{i}"], out[f"v.{i}"] = layer.keys[:, :, :n], layer.values[:, :, :n]
        return out

    def restore(self, tensors: dict[str, torch.Tensor]) -> int:
        """Load what `export` produced; returns the restored length. Raises KeyError on a mismatch."""
        for i, layer in enumerate(self.layers):
            layer.restore(tensors[f"k.{i}"], tensors[f"v.{i}"])
        return self.get_seq_length()


def kv_bytes(num_layers: int, num_kv_heads: int, head_dim: int, tokens: int, dtype: torch.dtype) -> int:
    """KV memory: 2 x layers x kv_heads x head_dim x tokens x bytes per element."""
    return 2 * num_layers * num_kv_heads * head_dim * tokens * torch.empty(0, dtype=dtype).element_size()
