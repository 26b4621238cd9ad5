"""Memory and threads around a call: one allocation per result set, the kept workspace, BLAS pinning.

Kernel-level entry points (documented, used by the tests): arrays_together(dtype, shapes, zero)
allocates several arrays in one 64-byte-aligned block; Workspace(keep_bytes) hands out views of one
kept buffer; WORKSPACE is the one the kernels use.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import threading
from pathlib import Path

import numpy as np

from ..cpu_blas import uses_process_threads


# ---------------------------------------------------------------------------
# Python entry points
# ---------------------------------------------------------------------------

_ASSUMED_CACHE_BYTES = 32 << 20


@functools.lru_cache(maxsize=1)
def last_level_cache_bytes():
    """The size of the CPU's largest cache (the last level), in bytes: read from Linux's sysfs for
    the first CPU; 32 MiB where it cannot be read (other systems, some containers)."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = path.read_text(encoding="ascii").strip()
        except OSError:
            continue
        match = re.fullmatch(r"(\d+)([KMG]?)", text)
        if match:
            sizes.append(int(match.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2)])
    return max(sizes, default=0) or _ASSUMED_CACHE_BYTES

# Concurrent calls are serialised: numba's workqueue layer aborts on concurrent
# parallel calls, and OpenBLAS's thread limit is process-wide state.
_CALL_LOCK = threading.Lock()
_NOTHING_TO_PIN = contextlib.nullcontext()  # reusable: entering it does nothing
_THREADPOOL_CONTROLLER = None


def _single_threaded_blas():
    """Context manager pinning the BLAS to one thread (each worker calls it already in parallel).

    MKL is pinned per worker thread inside the kernels (cpu_blas.set_threads_local);
    OpenBLAS only has a process-wide setting, set here through threadpoolctl.
    """
    global _THREADPOOL_CONTROLLER
    if not uses_process_threads():
        return _NOTHING_TO_PIN
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        return _NOTHING_TO_PIN
    if _THREADPOOL_CONTROLLER is None:
        _THREADPOOL_CONTROLLER = ThreadpoolController()
    return _THREADPOOL_CONTROLLER.limit(limits=1, user_api="blas")

# Arrays handed to a kernel start on a 64-byte boundary (a cache line, one AVX-512 vector).
_ALIGN_BYTES = 64


@functools.lru_cache(maxsize=256)
def _packed_layout(dtype, shapes):
    """(first element of each array, elements in all) for arrays packed one after another.

    Each start is a multiple of 64 bytes from the first; the block needs one
    alignment step more, for _packed_views to find a 64-byte boundary in it.
    """
    align = max(1, _ALIGN_BYTES // dtype.itemsize)
    starts, total = [], 0
    for shape in shapes:
        starts.append(total)
        total += -(-math.prod(shape) // align) * align
    return starts, total + align


def _packed_views(block, shapes, starts):
    address = block.__array_interface__["data"][0]  # (.ctypes.data costs ~3 µs a call)
    skip = (-address % _ALIGN_BYTES) // block.itemsize  # to the first aligned element
    return tuple(
        block[skip + start : skip + start + math.prod(shape)].reshape(shape)
        for start, shape in zip(starts, shapes)
    )


def arrays_together(dtype, shapes, zero):
    """Arrays of the given shapes as views into one allocation (zeroed if zero).

    Why one block: glibc serves a large allocation from the heap once a block
    of that size has been freed, but gives the top of the heap back to the
    system when more than twice that size is free there. Three separate
    gradients freed together always crossed that line, so every backward call
    of a training loop faulted ~8 MiB of fresh pages in at N = 1024 (~1950
    page faults per call, a third of its time on this VM); one block is reused
    in place.
    """
    return BlockLayout(dtype, shapes).arrays(zero)


class BlockLayout:
    """arrays_together's layout for these shapes, worked out once: arrays() is a fresh block's views
    (~2 µs; laying the block out again on every call cost ~5 µs, a planned decode call's tenth)."""

    __slots__ = ("dtype", "shapes", "starts", "total")

    def __init__(self, dtype, shapes):
        self.dtype, self.shapes = np.dtype(dtype), tuple(tuple(shape) for shape in shapes)
        self.starts, self.total = _packed_layout(self.dtype, self.shapes)

    def arrays(self, zero=False):
        return _packed_views((np.zeros if zero else np.empty)(self.total, self.dtype), self.shapes, self.starts)


class Workspace:
    """Temporaries for one call at a time (the caller holds _CALL_LOCK), kept between calls.

    One request per call: every request hands out the same memory.

    Temporaries freed at the end of every call are faulted in again by the next
    one (see arrays_together); kept, their pages stay mapped. A request larger
    than keep_bytes gets fresh memory that is not kept: there the call's O(N^2)
    work dwarfs the O(N) page faults, and holding on to it would surprise.
    """

    def __init__(self, keep_bytes):
        self.keep_bytes = keep_bytes
        self.buffer = np.empty(0, np.uint8)
        self.last = (None, None, None)  # (dtype, shapes, (block, views)) of the last request

    def arrays(self, dtype, shapes, zero):
        """Arrays of the given shapes (zeroed if zero) in the kept memory."""
        dtype = np.dtype(dtype)
        if self.last[0] == dtype and self.last[1] == shapes:  # a loop's next call: the same views
            block, views = self.last[2]
        else:
            starts, total = _packed_layout(dtype, shapes)
            if total * dtype.itemsize > self.keep_bytes:
                return arrays_together(dtype, shapes, zero=zero)
            if self.buffer.nbytes < total * dtype.itemsize:
                self.buffer = np.empty(total * dtype.itemsize, np.uint8)
            block = self.buffer[: total * dtype.itemsize].view(dtype)
            views = _packed_views(block, shapes, starts)
            self.last = (dtype, shapes, (block, views))
        if zero:
            block.fill(0)
        return views

    def zeroed(self, dtype, shapes):
        return self.arrays(dtype, shapes, zero=True)


WORKSPACE = Workspace(keep_bytes=32 << 20)
