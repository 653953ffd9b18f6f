"""A top_k or sink_blocks beyond the number of key blocks ("every block"), or a block size beyond the
sequence, sizes no buffer by itself: every path caps them at the block count (moba.types.clamp_blocks)
and gives the result of the capped call, which is exact causal attention when top_k covers every block.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moba import moba_attention, moba_routing, naive_moba_attention, portable_moba_attention
from moba.capture import attention_mass
from moba.dense import dense_attention
from moba.types import clamp_blocks
from tests.moba.mobatest import make_qkv, rel_err, run_interpreted

HUGE = 10**6
BS, TK = 16, 100  # 7 key blocks, the last one ragged
N_BLOCKS = 7


def test_clamp_blocks_caps_at_the_block_count():
    assert clamp_blocks(TK, BS, HUGE, HUGE) == (N_BLOCKS, N_BLOCKS)
    assert clamp_blocks(TK, BS, 3, 1) == (3, 1)
    assert clamp_blocks(TK, 10**9, HUGE, 2) == (1, 1)


@pytest.mark.parametrize("fn", [naive_moba_attention, portable_moba_attention, moba_attention])
@pytest.mark.parametrize("sinks", [0, 2, HUGE])
def test_huge_top_k_routing_has_the_capped_slots_and_the_dense_result(fn, sinks):
    q, k, v = make_qkv(1, 4, 2, 8, TK, 16)
    out, r = fn(q, k, v, block_size=BS, top_k=HUGE, sink_blocks=sinks, return_routing=True)
    top_k, n_sinks = clamp_blocks(TK, BS, HUGE, sinks)
    assert r.blocks.shape == r.scores.shape == (1, 4, 8, top_k + n_sinks)
    ref, r_ref = fn(q, k, v, block_size=BS, top_k=top_k, sink_blocks=n_sinks, return_routing=True)
    assert torch.equal(out, ref) and torch.equal(r.blocks, r_ref.blocks) and torch.equal(r.scores, r_ref.scores)
    assert rel_err(out, dense_attention(q, k, v)) < 1e-5  # every past block is attended


def test_moba_routing_alone_is_capped():
    q, k, _ = make_qkv(1, 4, 2, 8, TK, 16)
    r = moba_routing(q, k, block_size=BS, top_k=HUGE, sink_blocks=HUGE)
    assert r.blocks.shape[-1] == 2 * N_BLOCKS


def test_block_size_beyond_the_sequence_is_one_block_of_dense_attention():
    q, k, v = make_qkv(1, 4, 2, 8, TK, 16)
    out, r = portable_moba_attention(q, k, v, block_size=10**9, top_k=HUGE, sink_blocks=HUGE, return_routing=True)
    assert r.blocks.shape[-1] == 2 and (r.blocks[..., 0] == 0).all() and (r.blocks[..., 1] == -1).all()
    assert rel_err(out, dense_attention(q, k, v)) < 1e-5


def test_attention_mass_ignores_unused_slots_and_caps_the_block_width():
    q, k, _ = make_qkv(1, 4, 2, 8, TK, 16)
    positions = torch.arange(TK - 8, TK)
    one_block = torch.zeros(4, 8, 1, dtype=torch.long)
    ref = attention_mass(q[0], positions, k[0], one_block, TK, 0.25)
    padded = torch.cat([one_block, torch.full((4, 8, 5000), -1)], -1)
    assert torch.allclose(attention_mass(q[0], positions, k[0], padded, 10**9, 0.25), ref)
    assert torch.allclose(ref.sum(), torch.tensor(4 * 8.0))  # each query's probabilities sum to 1


def test_attention_mass_with_a_huge_block_size_allocates_little():
    """Peak RSS of a fresh process: before the cap, arange(block_size) and the [Hq, c, S, bs] gather
    of a 2**22 block took about 600 MB for 100 keys."""
    script = textwrap.dedent(
        """
        import resource, torch
        from moba.capture import attention_mass
        q, k = torch.randn(4, 8, 16), torch.randn(2, 100, 16)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        attention_mass(q, torch.arange(92, 100), k, torch.zeros(4, 8, 1, dtype=torch.long), 2**22, 0.25)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
        """
    )
    root = str(Path(__file__).resolve().parents[2])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": root, "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) < 64  # MiB


def test_triton_launcher_caps_top_k_and_sinks():
    pytest.importorskip("triton", reason="needs Triton")
    got = run_interpreted(
        """
        import json, torch
        from moba.triton import triton_moba_attention
        from moba import portable_moba_attention
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 2, 40, 64, dtype=torch.float16) for _ in range(3))
        kw = dict(block_size=16, top_k=1000, sink_blocks=50, return_routing=True)
        out, r = triton_moba_attention(q, k, v, **kw)
        ref, rr = portable_moba_attention(q.float(), k.float(), v.float(), **kw)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        print(json.dumps(dict(shape=list(r.blocks.shape), same=bool((r.blocks == rr.blocks).all()), err=err)))
        """
    )
    assert got["shape"] == [1, 2, 40, 3 + 3] and got["same"] and got["err"] < 1e-2


def test_static_decode_with_a_huge_block_size_allocates_little():
    """moba/static.py's plain gather (the CPU side of CUDA-graph decode) offsets each block by
    arange(block_size): before the cap, a 2**20 block over a 100-slot buffer took about 600 MB."""
    script = textwrap.dedent(
        """
        import resource, torch
        from moba.dense import dense_attention
        from moba.static import static_moba_decode
        q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 100, 16), torch.randn(1, 2, 100, 16)
        length = torch.tensor([60])
        sums = k[:, :, :60].sum(2, keepdim=True)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = static_moba_decode(q, k, v, length, sums, block_size=2**20, top_k=10**6, sink_blocks=10**6)
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
        err = ((out - dense_attention(q, k[:, :, :60], v[:, :, :60])).norm() / out.norm()).item()
        print(grown, err)
        """
    )
    root = str(Path(__file__).resolve().parents[2])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": root, "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    grown, err = done.stdout.split()[-2:]
    assert int(grown) < 64 and float(err) < 1e-5  # MiB; one block: dense attention over the filled part
