"""Keep the resident memory of a CPU process small: a glibc allocator that hands big freed blocks back
at once, and memory-mapped tensors read sparsely (an embedding table) handed back to the page cache
after each read.

Both are Linux/glibc specifics and do nothing elsewhere. Knows nothing of models or files beyond the
mapping a tensor lives in.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
from collections.abc import Callable
from pathlib import Path

import torch

# glibc mallopt parameters (malloc.h) and the values set
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_MMAP_THRESHOLD = 1 << 20  # while a forward carries many rows (a prefill chunk) blocks of 1 MiB or more are
#                            mmapped and unmapped when freed, so the heap never keeps a chunk's buffers around
#                            long-lived blocks (16K peak 2,219-2,385 MiB; with 8 or 32 MiB 2,419-2,460)
_STEP_MMAP_THRESHOLD = 32 << 20  # a one-row step's few-MiB buffers stay in the heap: with 1 MiB they were faulted
#                                  in afresh every step (16K decode 2.6-2.7 tok/s against 4.6-4.8; bench/RESULTS.md)
FEW_ROWS = 32  # a forward over at most this many rows is a decode step
_TRIM_THRESHOLD = 4 << 20  # free heap at the top above this is returned to the system (many-row forwards)
_STEP_TRIM_THRESHOLD = 16 << 20  # a decode step's freed buffers (a few MiB) stay for the next step
_ARENA_MAX = 2  # torch's threads each get an arena otherwise, each keeping its own freed memory
_MADV_DONTNEED = 4
RELEASE_IDS = 64  # ids looked up between two releases of a paged-out table (a few MiB of it resident at once)


@functools.cache
def _libc():
    """glibc, looked up once (find_library runs ldconfig; page_out calls this every 64 ids), or None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    return libc if all(hasattr(libc, f) for f in ("mallopt", "malloc_trim", "madvise")) else None


_lean = {"on": False, "rows": ""}


def lean_allocator() -> bool:
    """Set glibc's allocator to return big freed blocks and free heap to the system (2 arenas, not one per
    thread), and return what was left free so far (a tokenizer's parse: ~25 MiB); returns whether it could
    (False off glibc). Call it before a model is built: the weights transformers creates on the CPU and frees
    while building (2.2 GB for a 1.5B model) then come from mmap, not the heap, where they left a hole that
    later big buffers were carved from and that stayed resident (16K peaks 2,434-2,450 MiB, not 2,215)."""
    libc = _libc()
    if libc is None:
        return False
    done = [libc.mallopt(p, v) for p, v in ((_M_MMAP_THRESHOLD, _MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD),
                                            (_M_ARENA_MAX, _ARENA_MAX))]
    libc.malloc_trim(0)
    _lean.update(on=all(done), rows="many")
    return all(done)


def rows_ahead(n: int) -> None:
    """Before a forward over n rows, with the lean allocator set: the mmap and trim thresholds for its kind of
    forward, 1 MiB / 4 MiB for many rows (a prefill chunk: its buffers go back at once), 32 MiB / 16 MiB for a
    few (a decode step: its buffers stay for the next step rather than being faulted in again)."""
    rows = "many" if n > FEW_ROWS else "few"
    libc = _libc() if _lean["on"] and rows != _lean["rows"] else None
    if libc is None:
        return
    mmap_at, trim_at = (_MMAP_THRESHOLD, _TRIM_THRESHOLD) if rows == "many" else (_STEP_MMAP_THRESHOLD,
                                                                                  _STEP_TRIM_THRESHOLD)
    if libc.mallopt(_M_MMAP_THRESHOLD, mmap_at) and libc.mallopt(_M_TRIM_THRESHOLD, trim_at):
        _lean["rows"] = rows


def mapped_from(tensor: torch.Tensor, path: Path) -> bool:
    """Whether ``tensor``'s bytes lie in one mapping of the file ``path`` (not an anonymous copy)."""
    start = tensor.data_ptr()
    end, target = start + tensor.numel() * tensor.element_size(), str(Path(path).resolve())
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= start and end <= hi:
            return len(fields) == 6 and fields[5].strip() == target
    return False


def page_out(tensors: list[torch.Tensor]) -> None:
    """Drop the whole pages of memory-mapped ``tensors`` from this process (they stay in the page cache
    and fault back in on the next read). Only for tensors :func:`mapped_from` their file, never written:
    on anonymous memory this would zero them."""
    libc = _libc()
    if libc is None:
        return
    page = mmap.PAGESIZE
    for t in tensors:
        start = -(-t.data_ptr() // page) * page
        end = (t.data_ptr() + t.numel() * t.element_size()) // page * page
        if end > start:
            libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


def looked_up(ids: torch.Tensor, rows: Callable[[torch.Tensor], torch.Tensor],
              release: Callable[[], None] | None) -> torch.Tensor:
    """``rows(ids)`` [*ids.shape, dim]; with ``release``, RELEASE_IDS ids at a time, calling it after each.
    An embedding lookup starts every forward, so it also sets the allocator for the rows to come (`rows_ahead`)."""
    rows_ahead(ids.numel())
    if release is None:
        return rows(ids)
    parts = []
    for part in ids.reshape(-1).split(RELEASE_IDS):
        parts.append(rows(part))
        release()
    return torch.cat(parts).view(*ids.shape, -1)
