"""The Gluon tile kernel for Hopper (moba/triton/hopper.py) against the Triton tile kernel and the portable path.

It runs only on CUDA devices of compute capability 9 (Gluon has no CPU interpreter); elsewhere the
launcher never picks it, which `test_hopper_ok_refuses_other_inputs` checks on any machine. Outputs
are NaN-poisoned (conftest.py), so an entry the kernel fails to write fails the comparison.
"""

import pytest
import torch

from moba import portable_moba_attention
from tests.moba.mobatest import make_qkv, rel_err

pytest.importorskip("triton.experimental.gluon", reason="needs Triton with Gluon")
SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
sm90 = pytest.mark.skipif(not SM90, reason="needs a CUDA device of compute capability 9 (Hopper)")

# B, Hq, Hkv, Tq, Tk, D, block, top_k
CASES = [
    (1, 4, 4, 1000, 1000, 64, 64, 3),  # GQA 1, ragged tail, blocks smaller than a key tile
    (2, 8, 2, 777, 777, 128, 128, 4),  # GQA 4, batch 2
    (1, 28, 4, 600, 2000, 128, 128, 5),  # GQA 7, chunked prefill
    (1, 16, 2, 40, 3000, 128, 256, 4),  # GQA 8, few queries
    (1, 7, 1, 300, 1500, 64, 100, 3),  # GQA 7, block not a multiple of the key tile
    (1, 2, 2, 4096, 4096, 128, 1024, 3),  # many tiles per block, several key tiles per block
    (1, 4, 1, 513, 513, 64, 50, 1),  # top_k 1: block-local
]
IDS = ["B{}-H{}x{}-T{}of{}-D{}-bs{}-k{}".format(*c) for c in CASES]


def test_hopper_ok_refuses_other_inputs():
    from moba.triton.hopper import hopper_ok

    q, k, v = make_qkv(1, 4, 2, 8, 8, 128, dtype=torch.bfloat16, device="cpu")
    assert not hopper_ok(q, k, v, 1)  # not CUDA


def _partials(case, dtype):
    """Partials of every query from the Gluon kernel and from the Triton kernel, and which entries are live."""
    from moba.triton import hopper
    from moba.triton.attention import attend_tiles
    from moba.triton.csr import build_tiles
    from moba.triton.decode import partials
    from moba.triton.launcher import TILE_CONFIGS
    from moba.triton.routing import pool_means, route_chunk

    B, Hq, Hkv, Tq, Tk, D, bs, top_k = case
    q, k, v = make_qkv(B, Hq, Hkv, Tq, Tk, D, dtype=dtype, device="cuda")
    pos0, nb = Tk - Tq, -(-Tk // bs)
    blk, _ = route_chunk(q, pool_means(k, bs), 0, Tq, pos0, block_size=bs, top_k=top_k, sink_blocks=0)
    assert hopper.hopper_ok(q, k, v, 1)
    res = []
    for bm, run in ((hopper.BM, hopper.attend_tiles_hopper), (TILE_CONFIGS[D]["BM"], attend_tiles)):
        tiles = build_tiles(blk, Hkv, nb, bm)
        op, lsep = partials(blk, 1, D, dtype)
        kw = {} if run is hopper.attend_tiles_hopper else dict(nsplit=1, cfg=TILE_CONFIGS[D])
        run(q, k, v, blk, tiles, op, lsep, q_off=0, pos0=pos0, block_size=bs, scale=D**-0.5, **kw)
        res.append((op, lsep))
    return res, blk.reshape(-1) >= 0


@sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_kernel_matches_triton_tile_kernel(case, dtype):
    ((op, lse), (op_ref, lse_ref)), live = _partials(case, dtype)
    assert not op[live].isnan().any() and not lse[live].isnan().any()
    assert rel_err(op[live], op_ref[live]) <= 1e-2
    assert torch.allclose(lse[live], lse_ref[live], atol=1e-3, rtol=0)


@sm90
@pytest.mark.parametrize("use", [True, False], ids=["hopper", "triton"])
def test_launcher_picks_the_hopper_kernel(monkeypatch, use):
    import moba.triton.launcher as launcher
    from moba.triton import hopper

    calls = []
    real = hopper.attend_tiles_hopper
    monkeypatch.setattr(hopper, "attend_tiles_hopper", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    if not use:
        monkeypatch.setattr(launcher, "_hopper_module", lambda: None)  # as where Triton has no Gluon
    q, k, v = make_qkv(1, 8, 2, 2000, 2000, 128, dtype=torch.bfloat16, device="cuda")
    args = dict(block_size=128, top_k=4)
    out = launcher.triton_moba_attention(q, k, v, **args)
    assert bool(calls) == use
    assert not out.isnan().any() and rel_err(out, portable_moba_attention(q, k, v, **args)) <= 1e-2
