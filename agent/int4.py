"""4-bit weights for the CPU: groups of 32 input values, each with its own scale and zero, in the layout
torch's ``_weight_int4pack_mm_for_cpu`` kernel reads.

:func:`quantize` fits a weight [out, in] group by group: where a group's values lie on an evenly spaced
grid of at most 16 levels (what a GGUF's Q4_K, Q4_0 and Q4_1 tensors dequantize to) it recovers that grid
exactly, else it spans the group's range in 15 steps. It also returns the relative error of the result
(scales and zeros rounded to the dtype stored), so the caller can choose 4 bits only where they lose
nothing, and stops early where they certainly would. :class:`Int4Linear` runs the kernel for a few rows
(decode) and, for many rows (prefill), dequantizes the layer once per call and runs the dense GEMM;
:class:`Int4Embedding` reads rows. Knows nothing of models, files or which layers are quantized
(agent/quant.py decides).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from agent import residency

GROUP = 32  # input values per scale and zero (a GGUF Q4_K sub-block, a Q4_0/Q4_1 block)
BLOCK_N = 64  # torch packs rows in blocks of 64: byte j of input k holds row j (low nibble) and row j + 32
KERNEL_MAX_ROWS = 32  # at most this many rows use the kernel; more dequantize and run the dense GEMM
_FIT_VALUES = 1 << 20  # values fitted at a time: a slice's temporaries (4 MiB each) stay in the CPU's cache and
# are reused from the heap; a whole matrix's (55 MiB for 1.5B's MLP) would be fresh pages, faulted in every time
_DEQUANT_ROWS = 256  # rows dequantized at a time (a multiple of BLOCK_N)


def supports(out_features: int, in_features: int) -> bool:
    """Whether the kernel and :func:`unpack` take a weight of this shape."""
    return out_features % BLOCK_N == 0 and in_features % GROUP == 0 and layout_is_known()


@functools.cache
def layout_is_known() -> bool:
    """Whether this torch packs 4-bit weights as :func:`unpack` reads them (checked once, on a random
    matrix); where it does not, nothing is stored in 4 bits."""
    q = torch.randint(0, 16, (2 * BLOCK_N, 2 * GROUP), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    except (RuntimeError, AttributeError):
        return False
    return packed.shape == (q.shape[0], q.shape[1] // 2) and torch.equal(unpack(packed, *q.shape), q.to(torch.uint8))


def unpack(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The 4-bit values [out, in] (uint8, 0..15) of a weight packed by torch for its CPU kernel."""
    b = packed.view(out_features // BLOCK_N, in_features, BLOCK_N // 2)
    halves = torch.stack((b & 15, b >> 4), 1)  # [blocks, 2, in, 32]
    return halves.transpose(2, 3).reshape(out_features, in_features)


def _fit(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q`` [N, K] (0..15), ``step`` and ``low`` [N, K / GROUP] with ``w ~ q * step + low``."""
    n, k = w.shape
    g = w.view(n, k // GROUP, GROUP)
    low, span = g.amin(-1), g.amax(-1) - g.amin(-1)
    gaps = g.sort(-1).values.diff(dim=-1)
    gaps = torch.where(gaps > span[..., None] * 1e-3, gaps, torch.inf)  # equal values are no step
    least = gaps.amin(-1)
    step = torch.where(torch.isfinite(least), least, span)
    shifted = g - low[..., None]
    levels = shifted / step.clamp(min=1e-30)[..., None]
    top = levels.amax(-1)
    on_grid = (levels.sub_(levels.round()).abs_().amax(-1) < 1e-2) & (top < 15.5)
    step = torch.where(on_grid, step, span / 15).clamp(min=1e-12)
    q = shifted.div_(step[..., None]).round_().clamp_(0, 15)
    return q.view(n, k).to(torch.int32), step, low


def quantize(weight: torch.Tensor, dtype: torch.dtype, give_up_above: float = math.inf):
    """``(packed, scales_zeros, relative_error)`` for ``weight`` [N, K]: the packed values (uint8 [N, K/2]),
    scales and zeros [K / GROUP, N, 2] in ``dtype`` as the kernel takes them, and the relative (Frobenius)
    error of the dequantized weight against ``weight``; None as soon as that error is certain to exceed
    ``give_up_above`` (its running sum only grows), leaving the rest unfitted. Needs :func:`supports`."""
    w = weight.detach().float()
    slices = w.split(fit_rows(w.shape[1]))
    norm = max(sum(rows.square().sum().item() for rows in slices), 1e-30)
    packed, sz, err = [], [], 0.0
    for rows in slices:
        q, step, low = _fit(rows)
        part = torch.stack((step, low + 8 * step), -1).transpose(0, 1).to(dtype)  # w = (q - 8) * scale + zero
        packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        sz.append(part)
        err += (dequantize(packed[-1], part, torch.float32) - rows).square().sum().item()
        if (err / norm) ** 0.5 > give_up_above:
            return None
    return torch.cat(packed), torch.cat(sz, 1).contiguous(), (err / norm) ** 0.5


def fit_rows(in_features: int) -> int:
    """Rows of a weight fitted at a time: about _FIT_VALUES values, a multiple of BLOCK_N rows (as packed)."""
    return max(1, _FIT_VALUES // (in_features * BLOCK_N)) * BLOCK_N


def dequantize(packed: torch.Tensor, scales_zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, K] in ``dtype``, computed in fp32 and rounded once, _DEQUANT_ROWS rows at a time (so
    the only buffer the size of the weight is the result)."""
    groups, n, _ = scales_zeros.shape
    out = torch.empty(n, groups * GROUP, dtype=dtype)
    for r in range(0, n, _DEQUANT_ROWS):
        rows_ = min(_DEQUANT_ROWS, n - r)
        q = unpack(packed[r : r + rows_], rows_, groups * GROUP).view(rows_, groups, GROUP).float()
        sz = scales_zeros[:, r : r + rows_].float().transpose(0, 1)  # [rows, groups, 2]
        scale, zero = sz[..., :1], sz[..., 1:]
        out[r : r + rows_] = q.mul_(scale).add_(zero - 8 * scale).view(rows_, groups * GROUP)
    return out


def rows(packed: torch.Tensor, scales_zeros: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of the weight, [*ids.shape, K] in the scales' dtype (an embedding lookup)."""
    groups, n, _ = scales_zeros.shape
    k, flat = groups * GROUP, ids.reshape(-1)
    pair = packed.view(n // BLOCK_N, k, BLOCK_N // 2)[flat // BLOCK_N, :, flat % (BLOCK_N // 2)]  # [T, K]
    high = (flat % BLOCK_N >= BLOCK_N // 2)[:, None]
    q = torch.where(high, pair >> 4, pair & 15).view(-1, groups, GROUP).float()
    sz = scales_zeros[:, flat].float().transpose(0, 1)  # [T, groups, 2]
    scale, zero = sz[..., :1], sz[..., 1:]
    return q.mul_(scale).add_(zero - 8 * scale).view(*ids.shape, k).to(scales_zeros.dtype)


class Int4Linear(nn.Module):
    """``y = x @ W.T + bias`` with ``W`` in 4 bits: ``qweight4`` (packed uint8 [out, in/2]) and
    ``scales_zeros`` [in / GROUP, out, 2] in the activation dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight4", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales_zeros", torch.empty(in_features // GROUP, out_features, 2, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] <= KERNEL_MAX_ROWS:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.contiguous(), self.qweight4, GROUP, self.scales_zeros)
        else:
            y = F.linear(flat, dequantize(self.qweight4, self.scales_zeros, x.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {GROUP}"


class Int4Embedding(nn.Module):
    """Rows of a 4-bit table (times ``embed_scale``, as Gemma's scaled embedding does)."""

    def __init__(self, num: int, dim: int, dtype: torch.dtype, embed_scale: float | None = None, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.embed_scale = num, dim, embed_scale
        self.register_buffer("qweight4", torch.empty(num, dim // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales_zeros", torch.empty(dim // GROUP, num, 2, dtype=dtype, device=device))

    release = None  # set by agent.quant for a memory-mapped table: pages it out while looking up

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = residency.looked_up(ids, lambda part: rows(self.qweight4, self.scales_zeros, part), self.release)
        return out * self.embed_scale if self.embed_scale is not None else out
