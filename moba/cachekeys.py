"""What a KV cache hands to MoBA attention on the key tensor, written and read only through here.

transformers gives the attention function the tensors a cache layer returns and nothing else, so a
cache that keeps per-block key statistics attaches them to the key tensor it returns:
- `attach_block_means(keys, means)`: fp32 [B, Hkv, Tk // block_size, D] means of the complete
  blocks of `keys` (the filled part), so routing does not re-pool the cache; read by `block_means_of`.
- `attach_static(keys, length, block_sums)`: static decode (CUDA graphs): `keys` is the whole
  preallocated buffer, `length` an int64 [1] device tensor of valid keys (the query sits at
  length - 1) and `block_sums` fp32 [B, Hkv, n_blocks, D] sums of every block; read by `static_of`.
The attributes live on that one tensor object: a view or copy of it carries nothing.
Knows nothing of caches or models; agent/kvcache.py writes, moba/hf.py reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK_MEANS = "_moba_block_means"
LENGTH = "_moba_length"
BLOCK_SUMS = "_moba_block_sums"


@dataclass(frozen=True)
class StaticKeys:
    """The device-side length and block sums a static-decode key buffer carries."""

    length: torch.Tensor
    block_sums: torch.Tensor


def attach_block_means(keys: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Attach the complete blocks' fp32 means to `keys`; returns `keys`."""
    setattr(keys, BLOCK_MEANS, means)
    return keys


def block_means_of(keys: torch.Tensor) -> torch.Tensor | None:
    """The block means attached to `keys`, or None."""
    return getattr(keys, BLOCK_MEANS, None)


def attach_static(keys: torch.Tensor, length: torch.Tensor, block_sums: torch.Tensor) -> torch.Tensor:
    """Mark `keys` as a whole static buffer with `length` valid keys and its block sums; returns `keys`."""
    setattr(keys, LENGTH, length)
    setattr(keys, BLOCK_SUMS, block_sums)
    return keys


def static_of(keys: torch.Tensor) -> StaticKeys | None:
    """The static-decode length and block sums attached to `keys`, or None when it is not a static buffer."""
    length = getattr(keys, LENGTH, None)
    return None if length is None else StaticKeys(length, getattr(keys, BLOCK_SUMS))
