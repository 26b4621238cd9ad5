"""warmup: compile every CPU kernel that calls of some dtypes run, in several processes at once.

A kernel compiles in one thread (Numba's typing and lowering in Python, then LLVM), so a cold
warmup used one core for minutes. Each (dtype, kernel) is a job; this process runs jobs from
the front of the list and, once something has to be compiled (not merely loaded from the
on-disk cache), helper processes take jobs from the back. They compile into the shared cache
(kernels/jit.py makes concurrent saves safe) and exit; this process then loads what they
compiled, so afterwards no call of those dtypes compiles here. Where no cache can be written,
or with processes=1, everything compiles in this process.

The same helpers serve a training step's first call (compiling_ahead): when a forward that a
backward will follow starts compiling, a helper compiles the backward kernel meanwhile, and
the backward waits for it (wait_for_ahead) and loads its work instead of compiling it again.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import subprocess
import sys
import threading
import warnings
from collections import deque
from pathlib import Path

import numba
import numpy as np
from numba.core import event

from .jit import cache_location

__all__ = ["check_processes", "compiling_ahead", "wait_for_ahead", "warmup", "warmup_variants"]

# The shapes each job runs: the forward and the backward; the decode kernel (keys split and
# merged when two threads are there).
_SHAPES = {"forward": ((1, 4, 256, 64), (1, 2, 256, 64)), "decode": ((1, 4, 1, 64), (1, 2, 1024, 64))}


def warmup_variants(dtypes, float32_bf16=False):
    """The kernel variants (input dtype for the kernel, bf16_products) that calls of these torch/NumPy
    dtype names run, as flash_forward chooses them ("float32", "bfloat16", "float16", "float64");
    float32_bf16: float32 calls run bf16 products (torch's "medium" float32 matmul precision)."""
    from .microkernels import BF16_DOT, BF16_PRODUCTS

    variants = []
    for name in dtypes:
        if name == "float64":
            chosen = [(np.float64, False)]
        elif name == "bfloat16" and BF16_PRODUCTS != "fp32":
            chosen = [(np.uint16, True)]  # bf16 bits on the bf16 micro-kernel
        elif name in ("float32", "bfloat16", "float16"):
            chosen = [(np.float32, False)]  # bf16 elsewhere, and float16, run in float32
            if name == "float32" and float32_bf16 and BF16_DOT:
                chosen = [(np.float32, True)]
        else:
            raise ValueError(f"warmup dtypes must be among float32, bfloat16, float16, float64; got {name!r}")
        variants += [v for v in chosen if v not in variants]
    return variants


def run_job(dtype_name, bf16_products, kind, backward):
    """Run one job's calls in this process: kind "forward" (and the backward when backward),
    "decode", or "backward" (the backward kernel alone), for kernel inputs of dtype_name
    ("float32", "float64", "uint16": bf16 bits)."""
    from .microkernels import bf16_bits
    from .numba_attention import flash_backward, flash_forward

    dtype = np.dtype(dtype_name)
    q_shape, kv_shape = _SHAPES["forward" if kind == "backward" else kind]
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(shape) for shape in (q_shape, kv_shape, kv_shape))
    q, k, v = (bf16_bits(x) if dtype == np.uint16 else x.astype(dtype) for x in (q, k, v))
    options = dict(scale=0.5, causal=None, window=None, softcap=None, bf16_products=bool(bf16_products))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", numba.NumbaWarning)
        if kind == "backward":  # any out and lse compile it: the values are not used
            out, lse = np.zeros_like(q), np.zeros(q.shape[:3], np.float64 if dtype == np.float64 else np.float32)
        else:
            out, lse = flash_forward(q, k, v, None, **options)
        if backward and kind != "decode":
            flash_backward(q, k, v, None, out, np.ones_like(out), lse, **options)


def warmup(dtypes=("float32", "bfloat16", "float64"), *, backward=True, decode=True, float32_bf16=False,
           processes=None):  # fmt: skip
    """Compile (or load from the cache) every kernel that calls of these dtypes run: the forward,
    the backward and the decode kernel (float dtypes), and their steps (kernels/cpu/launch.py).

    Causal alignment, windows, masks, softcap, ALiBi, dropout, sinks, packed sequences and the
    thread count (one thread for small calls, a busy machine or a forked child) are run-time flags
    and arrays of the same compiled kernels: once these have run, no call of these dtypes
    compiles again in this process (tests/test_numba_backend.py checks the dispatchers' signatures).
    float32_bf16: prepare float32 for bf16 products (what torch's "medium" precision selects).
    processes: how many processes may compile at once (None: one per CPU, at most one per job;
    1: this process alone). Helpers start only once something has to be compiled.
    """
    kinds = ["forward"] + (["decode"] if decode else [])
    jobs = [(np.dtype(dtype).name, bool(bf16), kind, bool(backward))
            for dtype, bf16 in warmup_variants(dtypes, float32_bf16) for kind in kinds]  # fmt: skip
    check_processes(processes)
    helpers = min(len(jobs), processes or os.cpu_count() or 1) - 1
    if helpers > 0 and not _cache_to_share():
        helpers = 0  # nowhere to share compiled code: every process would compile for itself
    _Jobs(jobs, helpers).run()


def check_processes(processes):
    """ValueError unless processes is None or a positive int (warmup's argument)."""
    if processes is not None and (isinstance(processes, bool) or not isinstance(processes, int) or processes < 1):
        raise ValueError(f"warmup: processes must be a positive int or None; got {processes!r}")


class _Jobs:
    """This process takes jobs from the front; `helpers` threads, each minding one helper process
    at a time, take them from the back once this process has had to compile something."""

    def __init__(self, jobs, helpers):
        self.pending = deque(jobs)
        self.jobs = list(jobs)
        self.helpers = helpers
        self.lock = threading.Lock()
        self.compiling = threading.Event()  # something compiled here: the cache is cold
        self.cancelled = False
        self.children = set()
        self.failures = []

    def run(self):
        listener = _FirstCompile(self._cold)
        threads = [threading.Thread(target=self._mind_helpers, name=f"attnkit-warmup-{i}", daemon=True)
                   for i in range(self.helpers)]  # fmt: skip
        for thread in threads:
            thread.start()
        ran_here = set()
        try:
            with event.install_listener("numba:compile", listener):
                while True:
                    with self.lock:
                        if not self.pending:
                            break
                        job = self.pending.popleft()
                    run_job(*job)
                    ran_here.add(job)
            self.compiling.set()  # helpers still waiting find nothing left, and return
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.1)  # short joins: Ctrl-C still reaches this thread
        except BaseException:
            self.cancelled = True
            self.compiling.set()
            self._kill_children()
            raise
        for job in self.jobs:  # load what the helpers compiled (or compile what one failed to)
            if job not in ran_here:
                run_job(*job)
        if self.failures:
            warnings.warn("attnkit.warmup: a helper process failed; its kernels compiled in this process "
                          f"instead:\n{self.failures[0]}", RuntimeWarning, stacklevel=3)  # fmt: skip

    def _cold(self):
        """The first compilation here: the cache is cold, so the helpers start (and say so)."""
        if self.helpers and os.environ.get("ATTNKIT_COMPILE_NOTICE", "1") != "0":
            helpers = f"{self.helpers} helper process{'es' if self.helpers > 1 else ''}"
            sys.stderr.write(f"attnkit: warmup: {len(self.jobs)} kernel jobs, {helpers} alongside this one\n")
            sys.stderr.flush()
        self.compiling.set()

    def _mind_helpers(self):
        self.compiling.wait()
        while not self.cancelled:
            with self.lock:
                if not self.pending:
                    return
                job = self.pending.pop()
            self._run_helper(job)

    def _run_helper(self, job):
        try:
            child = _start_helper(job)
        except OSError as error:  # no interpreter to start (an embedded Python): this process compiles
            self.failures.append(f"{sys.executable!r} could not start: {error}")
            return
        with self.lock:
            self.children.add(child)
        _, errors = child.communicate()
        with self.lock:
            self.children.discard(child)
        if child.returncode != 0 and not self.cancelled:
            self.failures.append(f"job {job}: exit status {child.returncode}\n{errors[-2000:]}")

    def _kill_children(self):
        with self.lock:
            children = list(self.children)
        for child in children:
            child.kill()


def _start_helper(job, errors=subprocess.PIPE):
    """A helper process running job (run_job's arguments), its stderr to `errors` (a pipe: read it,
    or a full one stops the helper); raises OSError if none can start."""
    command = [sys.executable, "-m", __name__, json.dumps(job)]
    environment = dict(os.environ, ATTNKIT_COMPILE_NOTICE="0")
    return subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=errors, text=True)


def _cache_to_share():
    """Whether the kernels have an on-disk cache, through which a helper's work reaches this process."""
    return cache_location(Path(__file__).parent)[0] is not None


def _helpers_can_share():
    """Whether a helper process can compile beside this one to any use: a cache, a second CPU."""
    return (os.cpu_count() or 1) > 1 and _cache_to_share()


class _FirstCompile(event.Listener):
    """Calls on_first() once, when Numba starts compiling anything (a cache load compiles nothing)."""

    def __init__(self, on_first):
        self.on_first = on_first
        self.called = False

    def on_start(self, event):
        if not self.called:
            self.called = True
            self.on_first()

    def on_end(self, event):
        pass


_AHEAD = {}  # job -> the helper process compiling it ahead, or None (considered: no helper)


_NOTHING_AHEAD = contextlib.nullcontext()


def compiling_ahead(job):
    """A context manager: within it, should anything start compiling (a cold cache), a helper process
    starts compiling job (run_job's arguments: say, the backward kernel of a forward that needs a
    gradient) while this process goes on. Each job is considered once per process: later calls
    cost a dict lookup and return a shared no-op. wait_for_ahead(job) waits for the helper."""
    if job in _AHEAD:
        return _NOTHING_AHEAD
    _AHEAD[job] = None
    if not _helpers_can_share():
        return _NOTHING_AHEAD

    def start():
        try:
            _AHEAD[job] = _start_helper(job, subprocess.DEVNULL)  # its failure shows as this process compiling
        except OSError:
            pass  # the job compiles in this process when it runs

    return event.install_listener("numba:compile", _FirstCompile(start))


def wait_for_ahead(job):
    """Wait for the helper compiling job ahead, if one was started (then its work loads from the
    cache; if it failed, the job compiles here as it would have)."""
    child = _AHEAD.get(job)
    if child is not None:
        child.wait()
        _AHEAD[job] = None


@atexit.register
def _stop_helpers():
    """A helper still compiling ahead when this process ends is not needed any more."""
    for child in list(_AHEAD.values()):
        if child is not None and child.poll() is None:
            child.kill()


def _main(argv):
    """A helper process: run one job, given as JSON (see _Jobs._run_helper)."""
    run_job(*json.loads(argv[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
