"""NaN-poison every tensor that torch.empty / empty_like hands out during a moba test.

An output element a path forgets to write then stays NaN (or a wild integer) and fails.
"""

import pytest
import torch

_POISON_INT = -(2**40)


def _poisoned(factory):
    def make(*args, **kwargs):
        t = factory(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64):
            t.fill_(_POISON_INT if t.dtype == torch.int64 else -(2**30))
        return t

    return make


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    monkeypatch.setattr(torch, "empty", _poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _poisoned(torch.empty_like))
    torch.manual_seed(42)


@pytest.fixture
def cuda_driver(monkeypatch):
    """cuda_driver(driver): moba/triton/compute_mode.py's query asks `driver`, a stand-in for libcuda.so.1.

    The query's per-device cache is emptied before and after the test.
    """
    from moba.triton import compute_mode

    compute_mode.exclusive_process.cache_clear()

    def install(driver):
        monkeypatch.setattr(compute_mode, "_open_driver", lambda: driver)
        return driver

    yield install
    compute_mode.exclusive_process.cache_clear()
