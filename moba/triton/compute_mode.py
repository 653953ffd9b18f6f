"""Whether a CUDA device is in EXCLUSIVE_PROCESS compute mode, read once per device from the CUDA driver.

The launcher takes the Gluon tile kernel (moba/triton/hopper.py) only on such a device. With three processes
time-slicing one H200 in the default (shared) mode, the Gluon kernel hung all three within seconds while the
Triton tile kernel ran on; a process alone on a GPU never hung (bench/hang_probe.py, bench/RESULTS.md). On an
exclusive-process device no other process can create a context, so nothing time-slices with it. The query goes
through libcuda.so.1 with ctypes (torch has no call for it); the device ordinal is torch's index, and both
honour CUDA_VISIBLE_DEVICES. Under CUDA MPS (which NVIDIA sets up on exclusive-process GPUs) the clients of one
MPS server share the GPU even so; whether the Gluon kernel hangs there is not known. It knows nothing of kernels
or tensors.
"""

from __future__ import annotations

import ctypes
import functools

LIBCUDA = "libcuda.so.1"
CU_DEVICE_ATTRIBUTE_COMPUTE_MODE = 20
CU_COMPUTEMODE_EXCLUSIVE_PROCESS = 3


@functools.cache
def exclusive_process(ordinal: int) -> bool:
    """True when device `ordinal` is in EXCLUSIVE_PROCESS mode; any failure of the query counts as shared."""
    dev, mode = ctypes.c_int(), ctypes.c_int()
    try:
        cuda = _open_driver()
        ok = (
            cuda.cuInit(0) == 0
            and cuda.cuDeviceGet(ctypes.byref(dev), ordinal) == 0
            and cuda.cuDeviceGetAttribute(ctypes.byref(mode), CU_DEVICE_ATTRIBUTE_COMPUTE_MODE, dev) == 0
        )
    except (OSError, AttributeError):  # no driver library, or one without these symbols
        return False
    return ok and mode.value == CU_COMPUTEMODE_EXCLUSIVE_PROCESS


def _open_driver():
    return ctypes.CDLL(LIBCUDA)
