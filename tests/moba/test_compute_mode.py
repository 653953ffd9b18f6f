"""The CUDA driver's compute-mode query (moba/triton/compute_mode.py): may the Gluon tile kernel run here?

The driver is a fake library object (`FakeDriver`), so the query runs on any machine; a library that cannot be
opened is a real ctypes failure (a name that does not exist).
"""

import ctypes

import pytest

from moba.triton import compute_mode
from tests.moba.mobatest import (
    EXCLUSIVE_PROCESS,
    EXCLUSIVE_THREAD,
    PROHIBITED,
    SHARED,
    FakeDriver,
)


class NoAttributeQuery:
    """A driver library without cuDeviceGetAttribute (ctypes raises AttributeError for a missing symbol)."""

    def cuInit(self, flags):
        return 0

    def cuDeviceGet(self, dev, ordinal):
        return 0


@pytest.mark.parametrize("mode,exclusive", [(SHARED, False), (EXCLUSIVE_THREAD, False), (PROHIBITED, False),
                                            (EXCLUSIVE_PROCESS, True)])  # fmt: skip
def test_only_exclusive_process_counts_as_exclusive(cuda_driver, mode, exclusive):
    cuda_driver(FakeDriver([mode]))
    assert compute_mode.exclusive_process(0) is exclusive


@pytest.mark.parametrize("fail", ["cuInit", "cuDeviceGet", "cuDeviceGetAttribute"])
def test_a_driver_error_counts_as_shared(cuda_driver, fail):
    fake = cuda_driver(FakeDriver([EXCLUSIVE_PROCESS], fail=fail))
    assert compute_mode.exclusive_process(0) is False
    assert fake.calls[-1] == fail  # it stops at the failing call


def test_a_missing_symbol_counts_as_shared(cuda_driver):
    cuda_driver(NoAttributeQuery())
    assert compute_mode.exclusive_process(0) is False


def test_a_missing_library_counts_as_shared(monkeypatch, cuda_driver):
    monkeypatch.setattr(compute_mode, "LIBCUDA", "libcuda-absent-for-this-test.so.1")
    with pytest.raises(OSError):
        ctypes.CDLL(compute_mode.LIBCUDA)  # the real loader fails on it
    assert compute_mode.exclusive_process(0) is False


def test_the_mode_is_read_per_device_and_cached(cuda_driver):
    fake = cuda_driver(FakeDriver([SHARED, EXCLUSIVE_PROCESS]))
    assert [compute_mode.exclusive_process(i) for i in (0, 1, 0, 1)] == [False, True, False, True]
    assert fake.calls.count("cuDeviceGetAttribute") == 2  # once per device
