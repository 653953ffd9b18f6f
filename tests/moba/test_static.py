"""Static-shape decode (moba/static.py) against the dynamic op on the filled part of the buffers.

The buffers past `length` hold large garbage and the block sums cover every block, garbage
included, as a cache in static mode hands them over: a path that reads past the length fails.
On CPU (fp32) the plain-PyTorch path runs; on CUDA also the Triton kernel (bf16, D 64 and 128);
without CUDA but with Triton, the kernel runs under TRITON_INTERPRET=1 in a subprocess (fp16).
"""

import importlib.util

import pytest
import torch

from moba import moba_attention, moba_routing
from moba.static import static_dense_decode, static_moba_decode, static_route, static_sliding_decode
from tests.moba.mobatest import rel_err, run_interpreted

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])

# B, Hq, Hkv, D, block, top_k, sinks, capacity, lengths
CASES = [
    (1, 4, 2, 16, 8, 3, 1, 100, [1, 8, 9, 16, 17, 63, 64, 65, 100]),
    (2, 8, 2, 32, 16, 4, 0, 130, [5, 33, 48, 49, 129]),
    (1, 7, 7, 64, 32, 2, 2, 300, [31, 32, 97, 300]),
    (1, 6, 2, 16, 10, 1, 0, 55, [3, 10, 11, 54]),  # top_k 1: own block only
]


def buffers(B, Hq, Hkv, D, block, capacity, length, dtype, device):
    g = torch.Generator().manual_seed(length)
    q = torch.randn(B, Hq, 1, D, generator=g).to(device, dtype)
    k, v = (torch.randn(B, Hkv, capacity, D, generator=g) for _ in range(2))
    k[:, :, length:] *= 100  # garbage past the length
    v[:, :, length:] += 50
    n_blocks = -(-capacity // block)
    padded = torch.zeros(B, Hkv, n_blocks * block, D)
    padded[:, :, :capacity] = k.to(dtype).float()
    sums = padded.reshape(B, Hkv, n_blocks, block, D).sum(3).to(device)
    k, v = k.to(device, dtype), v.to(device, dtype)
    return q, k, v, sums, torch.tensor([length], device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_static_moba_decode_equals_the_op_on_the_filled_part(case, device):
    B, Hq, Hkv, D, bs, top_k, sinks, cap, lengths = case
    for L in lengths:
        q, k, v, sums, length = buffers(B, Hq, Hkv, D, bs, cap, L, torch.float32, device)
        kw = dict(block_size=bs, top_k=top_k, sink_blocks=sinks)
        out = static_moba_decode(q, k, v, length, sums, **kw)
        ref = moba_attention(q, k[:, :, :L], v[:, :, :L], **kw)
        assert out.shape == q.shape and torch.allclose(out, ref, atol=1e-5), (L, (out - ref).abs().max())
        blk = static_route(q, sums, length, **kw)
        want = moba_routing(q, k[:, :, :L], **kw).blocks
        assert _sets(blk) == _sets(want), L


def _sets(blocks):
    return [sorted(b for b in row.tolist() if b >= 0) for row in blocks.reshape(-1, blocks.shape[-1])]


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("D", [64, 128])
def test_triton_static_decode_equals_triton_op(D):
    B, Hq, Hkv, bs, top_k, sinks, cap = 1, 28, 4, 256, 5, 1, 5000
    for L in [1, 255, 256, 257, 3000, 5000]:
        q, k, v, sums, length = buffers(B, Hq, Hkv, D, bs, cap, L, torch.bfloat16, "cuda")
        kw = dict(block_size=bs, top_k=top_k, sink_blocks=sinks)
        out = static_moba_decode(q, k, v, length, sums, **kw)
        ref = moba_attention(q, k[:, :, :L], v[:, :, :L], **kw)
        assert rel_err(out, ref) < 1e-2, L


@pytest.mark.parametrize("device", DEVICES)
def test_static_dense_and_sliding_decode(device):
    q, k, v, _, length = buffers(1, 4, 2, 16, 8, 90, 61, torch.float32, device)
    kf, vf = (t[:, :, :61].repeat_interleave(2, 1) for t in (k, v))
    ref = torch.softmax(q @ kf.transpose(-1, -2) / 4, -1) @ vf
    assert torch.allclose(static_dense_decode(q, k, v, length), ref, atol=1e-5)
    win = torch.softmax(q @ kf[:, :, -20:].transpose(-1, -2) / 4, -1) @ vf[:, :, -20:]
    assert torch.allclose(static_sliding_decode(q, k, v, length, 20), win, atol=1e-5)
    short = torch.tensor([5], device=device)  # a window reaching before position 0
    ref5 = torch.softmax(q @ kf[:, :, :5].transpose(-1, -2) / 4, -1) @ vf[:, :, :5]
    assert torch.allclose(static_sliding_decode(q, k, v, short, 20), ref5, atol=1e-5)


_INTERP_SCRIPT = """
    import json
    import torch
    from moba.static import _gathered, static_route
    from moba.triton.decode import static_decode
    from tests.moba.test_static import buffers
    errs = []
    for L in [1, 63, 64, 65, 200, 300]:
        q, k, v, sums, length = buffers(1, 8, 2, 64, 64, 300, L, torch.float16, "cpu")
        blk = static_route(q, sums, length, block_size=64, top_k=3, sink_blocks=1)
        out = static_decode(q, k, v, blk, length, block_size=64, scale=0.125)
        ref = _gathered(q.float(), k.float(), v.float(), blk, length, 64, 0.125)
        errs.append((out.float() - ref).abs().max().item())
    print(json.dumps(errs))
"""


@pytest.mark.skipif(CUDA or importlib.util.find_spec("triton") is None, reason="CUDA runs the kernel for real; needs Triton")
def test_static_kernel_under_interpreter():
    assert max(run_interpreted(_INTERP_SCRIPT)) < 2e-3


_DENSE_INTERP_SCRIPT = """
    import json
    import torch
    from moba.triton.dense_decode import dense_decode
    from tests.moba.test_static import buffers
    errs = []
    for Hq, Hkv, D in [(8, 2, 64), (28, 4, 64), (4, 4, 128)]:  # GQA 4, 7 (not a power of 2), none
        for L in [1, 63, 64, 65, 200, 300]:
            q, k, v, _, length = buffers(1, Hq, Hkv, D, 64, 300, L, torch.float16, "cpu")
            out = dense_decode(q, k, v, length, scale=D ** -0.5)  # slices of 64 keys: five programs per KV head
            kf, vf = (t[:, :, :L].float().repeat_interleave(Hq // Hkv, 1) for t in (k, v))
            ref = torch.softmax(q.float() @ kf.transpose(-1, -2) * D ** -0.5, -1) @ vf
            errs.append((out.float() - ref).abs().max().item())
    print(json.dumps(errs))
"""


@pytest.mark.skipif(CUDA or importlib.util.find_spec("triton") is None, reason="CUDA runs the kernel for real; needs Triton")
def test_static_dense_decode_kernel_under_interpreter():
    """The GQA-grouped kernel (all query heads of a KV head in one program) against exact attention, the
    garbage past the length left out, at lengths on and across slice edges."""
    assert max(run_interpreted(_DENSE_INTERP_SCRIPT)) < 2e-3


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_triton_static_dense_decode_equals_sdpa():
    for L in [1, 2047, 2048, 2049, 9000]:
        q, k, v, _, length = buffers(1, 28, 4, 128, 64, 9000, L, torch.bfloat16, "cuda")
        out = static_dense_decode(q, k, v, length)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k[:, :, :L], v[:, :, :L], enable_gqa=True)
        assert rel_err(out, ref) < 1e-2, L
