"""How many threads a parallel call gets: one when other programs fill the cores, or in a forked child.

Why: the parallel kernels run in Numba's OpenMP regions, whose threads wait for
the slowest one at the end of a region by spinning. When another program holds
a core, a thread of ours that lost its core holds the region open while the
others spin on the cores it needs: a 0.7 ms call took 24 ms beside another
program running torch (#24). Then the call runs on the calling thread alone
(the kernels on one thread, no OpenMP region), which costs at most the lost core.

And GNU OpenMP cannot run in a process forked from one that used it (Numba
terminates such a child with SIGTERM): a DataLoader worker, say. A forked
child runs every call on its calling thread.

The load is the number of runnable threads (/proc/loadavg's fourth field),
averaged over the last calls (sampled at most every SAMPLE_INTERVAL_S), less
our own: the calling thread and Numba's other threads, which spin for a while
after a region and so count as runnable. When other programs keep all the
cores busy, the call runs on one thread; with cores left over, on all of
Numba's (a single busy core costs the parallel kernels little: their
workers take tasks from a shared queue). ATTNKIT_LOAD_AWARE=0 turns this off.
Where /proc/loadavg does not exist the machine counts as quiet.
"""

from __future__ import annotations

import os
import time

import numba

__all__ = ["worker_count"]

SAMPLE_INTERVAL_S = 0.005
SMOOTHING = 0.3  # the weight of a new sample in the running average

_PARENT_PID = os.getpid()  # where the OpenMP threads may live


def _runnable_threads():
    """Threads runnable on the machine now (/proc/loadavg: "0.42 0.31 0.22 3/412 9876"), or None."""
    try:
        with open("/proc/loadavg", "rb") as loadavg:
            return int(loadavg.read().split()[3].split(b"/")[0])
    except (OSError, IndexError, ValueError):
        return None


class _LoadGauge:
    """other_runnable(own): a running average of the runnable threads on the machine, less `own`."""

    def __init__(self, read_runnable=_runnable_threads, clock=time.monotonic):
        self.read_runnable, self.clock = read_runnable, clock
        self.last_sample = -1.0
        self.average = None

    def other_runnable(self, own):
        now = self.clock()
        if now - self.last_sample >= SAMPLE_INTERVAL_S:
            self.last_sample = now
            runnable = self.read_runnable()
            if runnable is not None:
                self.average = runnable if self.average is None else (
                    SMOOTHING * runnable + (1 - SMOOTHING) * self.average)
        return 0.0 if self.average is None else max(0.0, self.average - own)


_GAUGE = _LoadGauge()


_THREAD_COUNT = []  # Numba's getter of the calling thread's thread count, once its threads are launched


def _numba_threads():
    """numba.get_num_threads() (the calling thread's setting, numba.set_num_threads): the public
    function checks that the threads are launched on every call, 0.5 of its 0.65 µs."""
    if not _THREAD_COUNT:
        wanted = numba.get_num_threads()  # launches them
        getter = getattr(numba.np.ufunc.parallel, "_get_num_threads", None)
        if getter is None:
            return wanted
        _THREAD_COUNT.append(getter)
    wanted = _THREAD_COUNT[0]()
    return wanted if wanted > 0 else numba.get_num_threads()  # which raises Numba's error


def _usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def worker_count():
    """Threads for the next parallel call: Numba's thread count, or 1 in a forked child (no OpenMP
    there) or when other programs' runnable threads fill every core."""
    if os.getpid() != _PARENT_PID:
        return 1
    wanted = _numba_threads()
    if wanted == 1:
        return wanted
    others = round(_GAUGE.other_runnable(wanted))
    # A quiet machine, the common case, reads neither the affinity mask nor the environment:
    # ~2.5 of this function's ~5 µs on a 2-vCPU VM, on every parallel call.
    if others == 0 or others < _usable_cores() or os.environ.get("ATTNKIT_LOAD_AWARE", "1") == "0":
        return wanted
    return 1
