"""Input factories, an error metric and a Triton-interpreter runner shared by the moba tests."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

_INTERPRETER_PRELUDE = textwrap.dedent(
    """
    import builtins
    import numpy as np
    import triton.runtime.interpreter as ti

    class _IntMeta(type):  # numpy >= 2 refuses int() of the interpreter's 1-element reductions
        def __instancecheck__(cls, x):
            return isinstance(x, builtins.int)
        def __subclasscheck__(cls, c):
            return issubclass(c, builtins.int)

    class _Int(builtins.int, metaclass=_IntMeta):
        def __new__(cls, x=0, *a):
            if isinstance(x, np.ndarray) and x.size == 1 and not a:
                x = x.reshape(())
            return builtins.int(x, *a)

    ti.int = _Int
    """
)


def run_interpreted(script: str, *args: str):
    """Run `script` in a fresh Python with TRITON_INTERPRET=1 (Triton kernels on CPU); return the JSON
    its last stdout line prints. Fails the test with the child's stderr when it exits non-zero."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    cmd = [sys.executable, "-c", _INTERPRETER_PRELUDE + textwrap.dedent(script), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def make_qkv(B, Hq, Hkv, Tq, Tk, D, dtype=torch.float32, device="cpu"):
    q = torch.randn(B, Hq, Tq, D, dtype=dtype, device=device)
    k = torch.randn(B, Hkv, Tk, D, dtype=dtype, device=device)
    v = torch.randn(B, Hkv, Tk, D, dtype=dtype, device=device)
    return q, k, v


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative RMS error of a against the reference b."""
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def block_local_reference(q, k, v, block_size, scale=None):
    """Causal attention restricted to each query's own block, written independently of moba."""
    Tq, Tk = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    kf, vf = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
    qp = torch.arange(Tk - Tq, Tk)[:, None]
    kp = torch.arange(Tk)[None, :]
    mask = (kp <= qp) & (kp // block_size == qp // block_size)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q.float() @ kf.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    return s.softmax(-1) @ vf


def csr_mismatches(got: dict, ref: dict) -> list[str]:
    """What differs between two `build_tiles` CSRs of one blocks table ([] = nothing): counts, offsets,
    tiles and the entries of every key in the same order."""
    bad = [k for k in ("key_cnt", "key_off", "tile_end", "tile_key") if not torch.equal(got[k].long(), ref[k].long())]
    if bad:
        return bad
    n = int(ref["key_cnt"].sum())
    return [] if torch.equal(got["perm"][:n].long(), ref["perm"][:n].long()) else ["perm order"]


def spy(monkeypatch, module, name: str) -> list:
    """Wrap module.name so that every call is appended (args, kwargs) to the returned list."""
    real, calls = getattr(module, name), []

    def wrapped(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def force_sparse(monkeypatch) -> list:
    """Take away the dense shortcuts of moba.ops and moba.portable (covers_all_blocks -> causal SDPA),
    so that every MoBA call runs the sparse code; a dense_attention call there fails the test.
    Returns the calls of portable's sparse chunk attention (`_attend_chunk`), to assert that it ran."""
    import moba.ops
    import moba.portable

    def no_dense(*args, **kwargs):
        raise AssertionError("the dense shortcut ran where the sparse path was forced")

    for mod in (moba.ops, moba.portable):
        monkeypatch.setattr(mod, "covers_all_blocks", lambda *args: False)
        monkeypatch.setattr(mod, "dense_attention", no_dense)
    return spy(monkeypatch, moba.portable, "_attend_chunk")


def attended_blocks(routing, n_blocks: int) -> torch.Tensor:
    """bool [B, Hq, Tq, n_blocks]: the blocks a `moba.Routing` names for each query (-1 slots ignored)."""
    b = routing.blocks.long()
    hit = torch.zeros(*b.shape[:3], n_blocks + 1, dtype=torch.bool)
    hit.scatter_(-1, torch.where(b >= 0, b, n_blocks).cpu(), True)
    return hit[..., :n_blocks]


SHARED, EXCLUSIVE_THREAD, PROHIBITED, EXCLUSIVE_PROCESS = 0, 1, 2, 3  # the driver's CUcomputemode values


class FakeDriver:
    """libcuda.so.1 with one compute mode per device ordinal; `fail` names a call that returns an error.

    Its functions write through the ctypes pointers they get, as the driver's do.
    """

    def __init__(self, modes, fail=None):
        self.modes, self.fail, self.calls = modes, fail, []

    def _result(self, name):
        self.calls.append(name)
        return 100 if name == self.fail else 0  # CUDA_ERROR_NO_DEVICE

    def cuInit(self, flags):
        assert flags == 0
        return self._result("cuInit")

    def cuDeviceGet(self, dev, ordinal):
        dev._obj.value = 1000 + ordinal  # a CUdevice handle is not the ordinal in general
        return self._result("cuDeviceGet")

    def cuDeviceGetAttribute(self, value, attribute, dev):
        assert attribute == 20  # CU_DEVICE_ATTRIBUTE_COMPUTE_MODE
        value._obj.value = self.modes[dev.value - 1000]
        return self._result("cuDeviceGetAttribute")
