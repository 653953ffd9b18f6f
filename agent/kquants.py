"""GGUF Q4_K and Q6_K blocks dequantized with torch, bit for bit as the gguf package's numpy reference.

The same products and differences in the same fp32 order as ``gguf.quants.Q4_K/Q6_K.dequantize_blocks``
(each rounded once, as IEEE rounds them; torch runs each on every core where numpy runs on one), so the
values are the reference's exactly: tests/agent/test_kquants.py checks every bit on random blocks. Other
types are not here (:func:`supports` says which). Knows nothing of files, names or models.
"""

from __future__ import annotations

import numpy as np
import torch

QK_K = 256  # values per block
_Q4_K, _Q6_K = 12, 14  # gguf.GGMLQuantizationType values
_BLOCK_BYTES = {_Q4_K: 144, _Q6_K: 210}


def supports(qtype: int, data: np.ndarray) -> bool:
    """Whether :func:`dequantize` reads ``data`` of GGUF type ``qtype`` (rows of whole Q4_K or Q6_K blocks)."""
    size = _BLOCK_BYTES.get(int(qtype))
    return size is not None and data.ndim == 2 and data.dtype == np.uint8 and data.shape[1] % size == 0


def values_per_row(qtype: int, data: np.ndarray) -> int:
    """The fp32 values in each row of ``data`` (bytes per row, as gguf's reader gives a quantized tensor)."""
    return data.shape[1] // _BLOCK_BYTES[int(qtype)] * QK_K


def dequantize(data: np.ndarray, qtype: int, out: np.ndarray) -> None:
    """Write ``data`` (uint8 [rows, bytes per row]; :func:`supports`) into ``out`` (fp32 [rows,
    :func:`values_per_row`], contiguous)."""
    blocks = torch.from_numpy(np.array(data)).view(-1, _BLOCK_BYTES[int(qtype)])
    (_q4_k if int(qtype) == _Q4_K else _q6_k)(blocks, torch.from_numpy(out).view(blocks.shape[0], QK_K))


def _half(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 at byte ``start`` of each block, in fp32 [blocks, 1]."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _q4_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """Q4_K: per 32 values a 6-bit scale and min, times the block's fp16 d and dmin; values d*sc*q - dmin*m."""
    n = blocks.shape[0]
    d, dmin = _half(blocks, 0), _half(blocks, 2)
    packed = blocks[:, 4:16].reshape(n, 3, 4)
    low, high, both = packed[:, 0], packed[:, 1], packed[:, 2]
    sc = torch.cat((low & 0x3F, (both & 0x0F) | ((low >> 2) & 0x30)), -1)
    m = torch.cat((high & 0x3F, (both >> 4) | ((high >> 2) & 0x30)), -1)
    scale = (d * sc.float()).view(n, 8, 1)
    shift = (dmin * m.float()).view(n, 8, 1)
    nibbles = blocks[:, 16:].reshape(n, 4, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8).view(1, 1, 2, 1)
    q = (nibbles & 0x0F).reshape(n, 8, 32).float()
    torch.sub(scale * q, shift, out=out.view(n, 8, 32))


def _q6_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """Q6_K: per 16 values an int8 scale times the block's fp16 d; 6-bit values centred on 32."""
    n = blocks.shape[0]
    low = blocks[:, :128].reshape(n, 2, 1, 64) >> torch.tensor([0, 4], dtype=torch.uint8).view(1, 1, 2, 1)
    high = blocks[:, 128:192].reshape(n, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    q = ((low & 0x0F).reshape(n, 8, 32) | ((high & 0x03).reshape(n, 8, 32) << 4)).view(torch.int8) - 32
    scale = (_half(blocks, 208) * blocks[:, 192:208].view(torch.int8).float()).view(n, QK_K // 16, 1)
    torch.mul(scale, q.view(n, QK_K // 16, 16).float(), out=out.view(n, QK_K // 16, 16))
