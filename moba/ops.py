"""The public MoBA op: validation, the dense fast path and the one place a backend is chosen.

Every backend implements `moba.types.MobaKernel` (layout and arguments there). `_LOADERS` maps
each name to its implementation: "portable" (plain PyTorch, any device), "triton" (CUDA,
imported lazily), "naive" (the spec, small sizes only). The default is "triton" for CUDA tensors
when Triton imports, else "portable"; `set_backend` overrides it (tests, benchmarks).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from moba.dense import covers_all_blocks, dense_attention
from moba.naive import naive_moba_attention
from moba.portable import portable_moba_attention
from moba.routing import block_means, select_blocks
from moba.types import MobaKernel, Routing, settled_blocks


def _triton() -> MobaKernel:
    return importlib.import_module("moba.triton").triton_moba_attention


_LOADERS: dict[str, Callable[[], MobaKernel]] = {
    "portable": lambda: portable_moba_attention,
    "triton": _triton,
    "naive": lambda: naive_moba_attention,
}
BACKENDS = ("auto", *_LOADERS)
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
    local_blocks: int = 0,
    gate_subblocks: int = 1,
):
    """Mixture of Block Attention: the public `moba.types.MobaKernel` (arguments and semantics there).

    Checks the inputs, computes exact causal SDPA when every query would attend every past block,
    and otherwise calls the backend `backend_for(q)` names.

    >>> q = k = v = torch.randn(1, 2, 300, 64)
    >>> moba_attention(q, k, v, block_size=64, top_k=2).shape
    torch.Size([1, 2, 300, 64])
    """
    top_k, sink_blocks, local_blocks = settled_blocks(q, k, v, block_size, top_k, sink_blocks, local_blocks, gate_subblocks)
    if not return_routing and covers_all_blocks(k.shape[2], block_size, top_k, sink_blocks):
        return dense_attention(q, k, v, scale=scale)
    levers = dict(local_blocks=local_blocks, gate_subblocks=gate_subblocks)
    return _resolve(q, **levers)(q, k, v, block_size=block_size, top_k=top_k, sink_blocks=sink_blocks, scale=scale,
                                 return_routing=return_routing, key_means=key_means, **levers)


def moba_routing(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int,
    top_k: int,
    sink_blocks: int = 0,
    key_means: torch.Tensor | None = None,
    local_blocks: int = 0,
    gate_subblocks: int = 1,
) -> Routing:
    """The gate's choice alone, without attention: what MoBA would attend (see `moba_attention`).

    Used to show routing for layers that compute dense attention. Shapes as in `moba_attention`.
    """
    top_k, sink_blocks, local_blocks = settled_blocks(q, k, k, block_size, top_k, sink_blocks, local_blocks, gate_subblocks)
    Tq, Tk = q.shape[2], k.shape[2]
    cached = key_means is not None and gate_subblocks == 1
    means = key_means if cached else block_means(k, block_size, gate_subblocks)
    sel, sc = select_blocks(q, means, Tk - Tq, block_size=block_size, top_k=top_k, sink_blocks=sink_blocks,
                            local_blocks=local_blocks)
    own = (torch.arange(Tk - Tq, Tk, device=q.device) // block_size).expand(*sel.shape[:3])
    inf = torch.full(own.shape, float("inf"), device=q.device)
    return Routing(blocks=torch.cat([own[..., None], sel], -1), scores=torch.cat([inf[..., None], sc], -1))


def backend_for(q: torch.Tensor, local_blocks: int = 0, gate_subblocks: int = 1) -> str:
    """The backend a call with query q uses: the forced one, else "triton" on CUDA when Triton
    imports and the gate is the plain one (the Triton kernels implement neither local blocks nor
    sub-block gates), else "portable"."""
    if _backend != "auto":
        return _backend
    plain_gate = local_blocks == 0 and gate_subblocks == 1
    return "triton" if q.is_cuda and plain_gate and _triton_available() else "portable"


def _resolve(q: torch.Tensor, **levers) -> MobaKernel:
    return _LOADERS[backend_for(q, **levers)]()


def _triton_available() -> bool:
    try:
        _triton()
    except ImportError:
        return False
    return True
