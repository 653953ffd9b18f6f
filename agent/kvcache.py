"""A preallocated KV cache for transformers models that keeps MoBA block means up to date.

Each layer owns K and V buffers of [B, Hkv, capacity, D], allocated once on first use. `update`
writes the new positions in place (no O(N) concatenation) and returns views of the filled part
only, so attention sees "queries are the last Tq of Tk keys". It also adds the new keys into
fp32 per-block sums; the key view carries the complete blocks' means (`moba.cachekeys`),
so a decode step never re-pools the cache. `truncate(n)` crops back to a prefix in O(block).

Static mode (`MobaCache.static_positions`, for CUDA-graph decode): one new token is written at a
position read from a device tensor (index_copy_), its key added into the block sums on the device,
and attention gets the whole buffers: the key tensor carries the length (int64 [1], valid keys)
and the fp32 sums of every block (`moba.cachekeys.attach_static`), so no step depends on a host value. The caller
then moves the host-side length on with `advance`. Knows nothing of prompts, files or MoBA's routing rules.
"""

from __future__ import annotations

import contextlib
import math

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from moba.cachekeys import attach_block_means, attach_static


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
        self.position: torch.Tensor | None = None  # set in static mode: int64 [1], where the token goes

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, D = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_zeros(B, H, self.capacity, D)
        self.values = value_states.new_zeros(B, H, self.capacity, value_states.shape[-1])
        n_blocks = math.ceil(self.capacity / self.block_size)
        self.sums = torch.zeros(B, H, n_blocks, D, dtype=torch.float32, device=key_states.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if self.position is not None:
            return self._update_static(key_states, value_states)
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
        return attach_block_means(self.keys[:, :, :end], self.block_means()), self.values[:, :, :end]

    def _update_static(self, key_states, value_states):
        """Write one token at `self.position` on the device; return the whole buffers (see module doc)."""
        if not self.is_initialized or key_states.shape[2] != 1:
            raise ValueError("static mode writes one token into an initialized cache layer")
        self.keys.index_copy_(2, self.position, key_states)
        self.values.index_copy_(2, self.position, value_states)
        block = torch.div(self.position, self.block_size, rounding_mode="floor")
        self.sums.index_add_(2, block, key_states.float())
        keys = self.keys.view_as(self.keys)  # a fresh tensor object to carry the attributes
        return attach_static(keys, self.position + 1, self.sums), self.values

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
        self.capacity, self.block_size = capacity, block_size

    def truncate(self, n: int) -> None:
        """Crop every layer back to its first n positions. Copies nothing but one partial block."""
        for layer in self.layers:
            layer.truncate(n)

    @property
    def is_allocated(self) -> bool:
        """True once every layer holds its buffers (after the first update or restore)."""
        return all(layer.is_initialized for layer in self.layers)

    @contextlib.contextmanager
    def static_positions(self, position: torch.Tensor):
        """Inside the block every layer is in static mode: `update` writes its one new token at
        `position` (int64 [1] on the cache's device) and returns the whole buffers."""
        for layer in self.layers:
            layer.position = position
        try:
            yield
        finally:
            for layer in self.layers:
                layer.position = None

    def check_room(self, n: int = 1) -> int:
        """The length after n more tokens. Raises CacheFullError when that passes the capacity."""
        end = self.get_seq_length() + n
        if end > self.capacity:
            raise CacheFullError(f"KV cache holds {self.capacity} tokens; {end} were asked for")
        return end

    def advance(self, n: int = 1) -> None:
        """Count n tokens written in static mode as filled. Raises CacheFullError past capacity."""
        end = self.check_room(n)
        for layer in self.layers:
            layer.filled = end

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
