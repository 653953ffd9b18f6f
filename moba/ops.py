"""The public MoBA op: validation, the dense fast path and backend choice.

Layout: q [B, Hq, Tq, D], k and v [B, Hkv, Tk, D], the queries being the last Tq keys.
Backends: "portable" (plain PyTorch, any device), "triton" (CUDA, imported lazily),
"naive" (the spec, small sizes only). The default is "triton" for CUDA tensors when Triton
imports, else "portable"; `set_backend` overrides it (tests, benchmarks).
"""

from __future__ import annotations

import importlib

import torch

from moba.dense import covers_all_blocks, dense_attention
from moba.naive import naive_moba_attention
from moba.portable import portable_moba_attention
from moba.routing import block_means, select_blocks
from moba.types import Routing, check_inputs, clamp_blocks

BACKENDS = ("auto", "portable", "triton", "naive")
_backend = "auto"


def set_backend(name: str) -> None:
    """Force one backend for every later call; "auto" restores the default choice."""
    if name not in BACKENDS:
        raise ValueError(f"unknown MoBA backend {name!r}; choose one of {', '.join(BACKENDS)}")
    global _backend
    _backend = name


def moba_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int,
    top_k: int,
    sink_blocks: int = 0,
    scale: float | None = None,
    return_routing: bool = False,
    key_means: torch.Tensor | None = None,
):
    """Mixture of Block Attention (semantics in moba/README.md).

    Args:
        q: [B, Hq, Tq, D] queries; absolute positions Tk - Tq .. Tk - 1.
        k, v: [B, Hkv, Tk, D]; Hq % Hkv == 0 (GQA without repeating K/V).
        block_size: keys per block; block i holds positions [i*bs, (i+1)*bs).
        top_k: blocks per query counting its own block; top_k - 1 are routed. Capped at the number
            of key blocks, as is sink_blocks (`moba.types.clamp_blocks`): same result, buffers that size.
        sink_blocks: the first blocks, always attended when before the own block. Default 0.
        scale: softmax scale. Default D ** -0.5.
        return_routing: also return a `moba.Routing` (blocks and gate scores per query).
        key_means: optional cached [B, Hkv, Tk // block_size, D] fp32 block means.
    Returns:
        out [B, Hq, Tq, D] in q's dtype, or (out, routing) when return_routing.
    Raises:
        ValueError: on shapes or parameters outside the contract.

    >>> q = k = v = torch.randn(1, 2, 300, 64)
    >>> moba_attention(q, k, v, block_size=64, top_k=2).shape
    torch.Size([1, 2, 300, 64])
    """
    check_inputs(q, k, v, block_size, top_k, sink_blocks)
    top_k, sink_blocks = clamp_blocks(k.shape[2], block_size, top_k, sink_blocks)
    kwargs = dict(block_size=block_size, top_k=top_k, sink_blocks=sink_blocks, scale=scale)
    if not return_routing and covers_all_blocks(k.shape[2], block_size, top_k, sink_blocks):
        return dense_attention(q, k, v, scale=scale)
    fn = _resolve(q)
    return fn(q, k, v, return_routing=return_routing, key_means=key_means, **kwargs)


def moba_routing(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int,
    top_k: int,
    sink_blocks: int = 0,
    key_means: torch.Tensor | None = None,
) -> Routing:
    """The gate's choice alone, without attention: what MoBA would attend (see `moba_attention`).

    Used to show routing for layers that compute dense attention. Shapes as in `moba_attention`.
    """
    check_inputs(q, k, k, block_size, top_k, sink_blocks)
    Tq, Tk = q.shape[2], k.shape[2]
    top_k, sink_blocks = clamp_blocks(Tk, block_size, top_k, sink_blocks)
    means = block_means(k, block_size) if key_means is None else key_means
    sel, sc = select_blocks(q, means, Tk - Tq, block_size=block_size, top_k=top_k, sink_blocks=sink_blocks)
    own = (torch.arange(Tk - Tq, Tk, device=q.device) // block_size).expand(*sel.shape[:3])
    inf = torch.full(own.shape, float("inf"), device=q.device)
    return Routing(blocks=torch.cat([own[..., None], sel], -1), scores=torch.cat([inf[..., None], sc], -1))


def backend_for(q: torch.Tensor) -> str:
    """The backend a call with query q uses: the forced one, else "triton" on CUDA when Triton
    imports, else "portable"."""
    if _backend != "auto":
        return _backend
    return "triton" if q.is_cuda and _triton_available() else "portable"


def _resolve(q: torch.Tensor):
    name = backend_for(q)
    if name == "naive":
        return naive_moba_attention
    if name == "triton":
        return importlib.import_module("moba.triton").triton_moba_attention
    return portable_moba_attention


def _triton_available() -> bool:
    try:
        importlib.import_module("moba.triton")
    except ImportError:
        return False
    return True
