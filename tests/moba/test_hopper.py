"""The Gluon tile kernel for Hopper (moba/triton/hopper.py) against the Triton tile kernel and the portable path.

The kernel runs only on CUDA devices of compute capability 9 (Gluon has no CPU interpreter). Its host side
runs on any machine: `hopper_ok` (on CPU tensors that report CUDA, and a patched device capability), the
launcher's kernel choice, the launch arguments (the kernel replaced by a recorder) and the tile geometry
against Hopper's shared memory and registers. Outputs are NaN-poisoned (conftest.py), so an entry the
kernel fails to write fails the comparison.
"""

import functools
import math

import pytest
import torch

from moba import portable_moba_attention
from moba.routing import block_means, select_blocks
from tests.moba.mobatest import EXCLUSIVE_PROCESS, SHARED, FakeDriver, make_qkv, rel_err

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


class _CudaLike(torch.Tensor):
    """A CPU tensor that reports is_cuda and a CUDA device, so the host-side checks run on any machine."""

    ordinal = 0

    @property
    def is_cuda(self):
        return True

    @property
    def device(self):
        return torch.device("cuda", self.ordinal)


def _on_cuda(t: torch.Tensor, ordinal: int = 0) -> torch.Tensor:
    t = t.as_subclass(_CudaLike)
    t.ordinal = ordinal
    return t


@pytest.fixture
def capability(monkeypatch):
    """The compute capability major that torch.cuda reports (9 unless a test sets cap[0])."""
    cap = [9]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (cap[0], 0))
    return cap


def _misaligned_base(*shape):
    flat = torch.randn(math.prod(shape) + 1, dtype=torch.bfloat16)
    return flat[1:].view(*shape)  # data_ptr 2 bytes past a 16-byte boundary


ALIGNMENT = {
    "aligned": lambda: torch.randn(1, 2, 64, 128, dtype=torch.bfloat16),
    "base-off-16B": lambda: _misaligned_base(1, 2, 64, 128),
    "rows-of-130": lambda: torch.randn(1, 2, 64, 130, dtype=torch.bfloat16)[..., :128],  # 260-byte rows
    "d-not-innermost": lambda: torch.randn(1, 2, 128, 64, dtype=torch.bfloat16).transpose(2, 3),
}


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("layout", list(ALIGNMENT))
def test_hopper_ok_needs_16_byte_aligned_rows(capability, layout, which):
    from moba.triton.hopper import hopper_ok

    qkv = {n: _on_cuda(torch.randn(1, 2, 64, 128, dtype=torch.bfloat16)) for n in "qkv"}
    qkv[which] = _on_cuda(ALIGNMENT[layout]())
    assert hopper_ok(qkv["q"], qkv["k"], qkv["v"], 1) == (layout == "aligned")


@pytest.mark.parametrize(
    "D,dtype,nsplit,major,ok",
    [
        (128, torch.bfloat16, 1, 9, True),
        (64, torch.float16, 1, 9, True),
        (256, torch.bfloat16, 1, 9, False),  # no room for a 256-wide tile: the Triton kernel
        (128, torch.bfloat16, 2, 9, False),  # one key split only
        (128, torch.bfloat16, 1, 8, False),  # Ampere
        (128, torch.bfloat16, 1, 10, False),  # Blackwell: wgmma is sm_90 only
    ],
)
def test_hopper_ok_decides_by_head_dim_splits_and_capability(capability, D, dtype, nsplit, major, ok):
    from moba.triton.hopper import hopper_ok

    capability[0] = major
    q, k, v = (_on_cuda(t) for t in make_qkv(1, 4, 2, 64, 64, D, dtype=dtype))
    assert hopper_ok(q, k, v, nsplit) == ok


@pytest.mark.parametrize(
    "D,major,use,mode,gluon",
    [
        (128, 9, True, EXCLUSIVE_PROCESS, True),
        (64, 9, True, EXCLUSIVE_PROCESS, True),
        (128, 9, True, SHARED, False),  # the default mode: other processes may time-slice the GPU
        (128, 9, False, EXCLUSIVE_PROCESS, False),  # Triton without Gluon
        (128, 8, True, EXCLUSIVE_PROCESS, False),
        (256, 9, True, EXCLUSIVE_PROCESS, False),
    ],
)
def test_launcher_takes_the_gluon_kernel_only_where_hopper_ok_on_an_exclusive_gpu(
    monkeypatch, capability, cuda_driver, D, major, use, mode, gluon
):
    import moba.triton.launcher as launcher

    capability[0] = major
    cuda_driver(FakeDriver([mode]))
    if not use:
        monkeypatch.setattr(launcher, "_hopper_module", lambda: None)  # as where Triton has no Gluon
    q, k, v = (_on_cuda(t) for t in make_qkv(1, 4, 2, 64, 64, D, dtype=torch.bfloat16))
    _assert_tile_kernel(launcher.tile_kernel(q, k, v, 1), D, gluon)


def test_launcher_reads_the_mode_of_the_tensors_device_once(capability, cuda_driver):
    import moba.triton.launcher as launcher

    fake = cuda_driver(FakeDriver([SHARED, EXCLUSIVE_PROCESS]))
    for ordinal, gluon in [(0, False), (1, True), (0, False), (1, True)]:
        q, k, v = (_on_cuda(t, ordinal) for t in make_qkv(1, 4, 2, 64, 64, 128, dtype=torch.bfloat16))
        _assert_tile_kernel(launcher.tile_kernel(q, k, v, 1), 128, gluon)
    assert fake.calls.count("cuDeviceGetAttribute") == 2  # once per device


def _assert_tile_kernel(chosen, D, gluon):
    import moba.triton.launcher as launcher
    from moba.triton import hopper
    from moba.triton.attention import attend_tiles

    bm, attend = chosen
    if gluon:
        assert (bm, attend) == (hopper.BM, hopper.attend_tiles_hopper)  # the CSR is cut to the Gluon tile
    else:
        cfg = launcher.TILE_CONFIGS[D]
        assert bm == cfg["BM"] and isinstance(attend, functools.partial) and attend.func is attend_tiles
        assert attend.keywords == dict(nsplit=1, cfg=cfg)


class _Recorder:
    """Stands in for the Gluon kernel: kernel[grid](*args, **kwargs) records its launch."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


def test_gluon_launch_arguments(monkeypatch):
    from moba.triton import hopper
    from moba.triton.csr import build_tiles

    rec = _Recorder()
    monkeypatch.setattr(hopper, "_ws_tile_kernel", rec)
    B, Hq, Hkv, Tq, Tk, D, bs, top_k = 2, 4, 2, 90, 300, 128, 64, 3
    q = torch.randn(B, 2 * Hq, Tq, D, dtype=torch.bfloat16)[:, :Hq]  # a head slice: strides not of a dense q
    k, v = (torch.randn(B, Hkv, Tk, D, dtype=torch.bfloat16) for _ in range(2))
    pos0, c0, C = Tk - Tq, 30, 60  # the second chunk of the queries
    sel, _ = select_blocks(q[:, :, c0:], block_means(k, bs), pos0 + c0, block_size=bs, top_k=top_k, sink_blocks=0)
    own = (torch.arange(pos0 + c0, Tk) // bs).expand(B, Hq, C)[..., None]
    blk = torch.cat([own, sel], -1).to(torch.int32)
    nb = -(-Tk // bs)
    tiles = build_tiles(blk, Hkv, nb, hopper.BM, method="sort")
    op, lsep = torch.empty(blk.numel(), D, dtype=q.dtype), torch.empty(blk.numel())
    hopper.attend_tiles_hopper(q, k, v, blk, tiles, op, lsep, q_off=c0, pos0=pos0 + c0, block_size=bs, scale=0.1)
    ((grid, args, kw),) = rec.launches
    assert grid == (tiles["n_tiles"],)
    assert args[0] is q and args[3] is op and args[4] is lsep
    assert all(a is tiles[n] for a, n in zip(args[5:9], ("perm", "tile_key", "tile_row", "tile_rows")))
    assert tuple(args[9:12]) == q.stride()[:3]
    assert tuple(args[12:22]) == (C, Hq, top_k, Hkv, nb, tiles["n_keys"], c0, pos0 + c0, Tk, bs)
    assert args[22] == pytest.approx(0.1 / math.log(2), rel=1e-12)  # the kernel works in base 2
    for desc, t in zip(args[1:3], (k, v)):
        assert desc.base is t and list(desc.shape) == list(t.shape) and list(desc.strides) == list(t.stride())
        assert list(desc.block_shape) == [1, 1, hopper.BN, D]
    assert kw == dict(D=D, NS=hopper.STAGES, CONSUMER_REGS=hopper.REGS[0],
                      PRODUCER_REGS=hopper.REGS[1], num_warps=4, maxnreg=hopper.MAXNREG)  # fmt: skip


SMEM_PER_BLOCK = 227 * 1024  # sm_90 opt-in shared memory per thread block
REGS_PER_SM = 65536


@pytest.mark.parametrize("D", [64, 128])
def test_tile_geometry_fits_hopper(D):
    from moba.triton import hopper

    assert hopper.BM == 2 * hopper.HALF.value  # a tile is the two consumer warpgroups' halves
    ring = hopper.STAGES * 2 * hopper.BN * D * 2  # K and V slots, 2-byte elements
    barriers = (2 * hopper.STAGES + 1) * 8
    assert ring + hopper.BM * D * 2 + barriers <= SMEM_PER_BLOCK
    warps = 4 + 4 + 4  # default partition, consumer 1, producer warp rounded up to a warpgroup
    assert hopper.MAXNREG % 8 == 0 and hopper.MAXNREG * warps * 32 <= REGS_PER_SM
    consumer, producer = hopper.REGS
    assert consumer % 8 == 0 and producer % 8 == 0 and 24 <= producer <= consumer <= 256
    assert (2 * consumer + producer) * 128 <= REGS_PER_SM  # setmaxnreg is per warpgroup of 128 threads


@pytest.mark.parametrize("D", [64, 128])
def test_kernel_compiles_for_sm90_without_a_gpu(D):
    """The Gluon kernel compiles for sm_90 on any machine (Triton's own ptxas), launches 12 warps at MAXNREG
    registers and fits Hopper's shared memory, so a change to it fails here before it reaches a GPU."""
    from triton import compile as compile_kernel
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    from moba.triton import hopper

    fn = hopper._ws_tile_kernel
    desc = mangle_type(hopper._desc(torch.empty(1, 2, 512, D, dtype=torch.bfloat16)))
    types = dict(Q="*bf16", OP="*bf16", LSEP="*fp32", PERM="*i32", TILE_KEY="*i64", TILE_ROW="*i32",
                 TILE_ROWS="*i32", k_desc=desc, v_desc=desc, qk_scale="fp32")  # fmt: skip
    consts = dict(D=D, NS=hopper.STAGES, PRODUCER_REGS=hopper.REGS[1], CONSUMER_REGS=hopper.REGS[0], num_warps=4)
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    aligned = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in types.items() if t[0] == "*"}
    src = GluonASTSource(fn, sig, consts, aligned)  # 16-byte aligned pointers, as the launcher's tensors
    done = compile_kernel(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=hopper.MAXNREG))
    assert done.metadata.num_warps == 12 and f".maxnreg {hopper.MAXNREG}" in done.asm["ptx"]
    assert done.metadata.shared <= SMEM_PER_BLOCK

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
def test_launcher_picks_the_hopper_kernel(monkeypatch, cuda_driver, use):
    import moba.triton.launcher as launcher
    from moba.triton import hopper

    calls = []
    real = hopper.attend_tiles_hopper
    monkeypatch.setattr(hopper, "attend_tiles_hopper", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    cuda_driver(FakeDriver([EXCLUSIVE_PROCESS] * torch.cuda.device_count()))  # whatever the real mode
    if not use:
        monkeypatch.setattr(launcher, "_hopper_module", lambda: None)  # as where Triton has no Gluon
    q, k, v = make_qkv(1, 8, 2, 2000, 2000, 128, dtype=torch.bfloat16, device="cuda")
    args = dict(block_size=128, top_k=4)
    out = launcher.triton_moba_attention(q, k, v, **args)
    assert bool(calls) == use
    assert not out.isnan().any() and rel_err(out, portable_moba_attention(q, k, v, **args)) <= 1e-2
