"""warmup: compile every CPU kernel that calls of some dtypes run, in several processes at once.

A kernel compiles in one thread (Numba's typing and lowering in Python, then LLVM), so a cold
warmup used one core for minutes. Each (dtype, kernel) is a job; this process runs jobs from
the front of the list and, once something has to be compiled (not merely loaded from the
on-disk cache), helper processes take jobs from the back. They compile into the shared cache
(kernels/jit.py makes concurrent saves safe) and exit; this process then loads what they
compiled, so afterwards no call of those dtypes compiles here. Where no cache can be written,
or with processes=1, everything compiles in this process. Once something compiles, stderr gets a
line then, one per job as it is ready and one at the end (instead of jit.py's per-kernel notices);
a warmup that only loads from the cache says nothing.

The same helpers serve first calls. attnkit's dispatcher (backend="auto") asks whether a call's
kernels are ready (units_ready: run in this process, or marked in the on-disk cache by the process
that compiled them); if not, helpers compile them (compile_in_background) while the call and the
next ones run on the NumPy reference, until the kernels load from the cache. And when a forward
that a backward will follow starts compiling in this process, a helper compiles the backward
kernel meanwhile (compiling_ahead); the backward waits for it (wait_for_background) and loads its
work instead of compiling it again. Helpers finish their job even when this process exits first:
what they compile serves later processes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import warnings
from collections import deque
from pathlib import Path

import numba
import numpy as np
from numba.core import event

from .jit import cache_location, quiet_compile_notices

__all__ = [
    "cached_units", "check_processes", "compile_in_background", "compiling", "compiling_ahead", "describe_units",
    "mark_ready", "units_ready", "wait_for_background", "warmup", "warmup_variants",
]  # fmt: skip

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


# A job's kind: the kernel it runs, and the kernel a backward of the same shapes runs.
_BACKWARD_OF = {"forward": "backward", "decode": "decode_backward"}
_FORWARD_OF = {backward: forward for forward, backward in _BACKWARD_OF.items()}


def run_job(dtype_name, bf16_products, kind, backward):
    """Run one job's calls in this process: kind "forward" or "decode" (and its backward when
    backward), or "backward" / "decode_backward" (that backward kernel alone), for kernel inputs
    of dtype_name ("float32", "float64", "uint16": bf16 bits)."""
    from .microkernels import bf16_bits
    from .numba_attention import flash_backward, flash_forward

    dtype = np.dtype(dtype_name)
    q_shape, kv_shape = _SHAPES[_FORWARD_OF.get(kind, kind)]
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(shape) for shape in (q_shape, kv_shape, kv_shape))
    q, k, v = (bf16_bits(x) if dtype == np.uint16 else x.astype(dtype) for x in (q, k, v))
    options = dict(scale=0.5, causal=None, window=None, softcap=None, bf16_products=bool(bf16_products))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", numba.NumbaWarning)
        if kind in _FORWARD_OF:  # any out and lse compile the backward: the values are not used
            out, lse = np.zeros_like(q), np.zeros(q.shape[:3], np.float64 if dtype == np.float64 else np.float32)
        else:
            out, lse = flash_forward(q, k, v, None, **options)
        if kind == "decode":  # and a cache in flash-attn's (B, N, Hkv, D) layout, which it reads in place
            flash_forward(q, *(np.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3) for x in (k, v)),
                          None, **options)  # fmt: skip
        if backward or kind in _FORWARD_OF:
            flash_backward(q, k, v, None, out, np.ones_like(out), lse, **options)
    mark_ready(_units_of_job(dtype_name, bf16_products, kind, backward))


def warmup(dtypes, *, backward=True, decode=True, float32_bf16=False,
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
    # Kind by kind: this process takes the forward jobs from the front, a helper the decode ones
    # from the back, and the second dtype's job of a kind reuses much of the first one's code
    # (helpers with float32 scores, the schedule) compiled in the same process.
    jobs = [(np.dtype(dtype).name, bool(bf16), kind, bool(backward))
            for kind in kinds for dtype, bf16 in warmup_variants(dtypes, float32_bf16)]  # fmt: skip
    check_processes(processes)
    wait_for_background()  # kernels helpers are compiling already load from the cache after them
    helpers = min(len(jobs), processes or os.cpu_count() or 1) - 1
    if helpers > 0 and not _cache_to_share():
        helpers = 0  # nowhere to share compiled code: every process would compile for itself
    _Jobs(jobs, helpers).run()
    if "float16" in dtypes:  # float16 is widened to float32 at the boundary, by a compiled loop
        from .bf16 import float16_to_float32

        float16_to_float32(np.zeros(1, np.float16))


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
        self.cold = False  # something had to be compiled: progress is reported
        self.finished = set()
        self.started = time.perf_counter()

    def run(self):
        listener = _FirstCompile(self._cold)
        threads = [threading.Thread(target=self._mind_helpers, name=f"attnkit-warmup-{i}", daemon=True)
                   for i in range(self.helpers)]  # fmt: skip
        for thread in threads:
            thread.start()
        ran_here = set()
        with quiet_compile_notices():  # the jobs' progress lines say it instead
            try:
                with event.install_listener("numba:compile", listener):
                    while True:
                        with self.lock:
                            if not self.pending:
                                break
                            job = self.pending.popleft()
                        run_job(*job)
                        ran_here.add(job)
                        self._finished(job)
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
                    self._finished(job)
        if self.cold:
            where = ("later processes load them from the on-disk cache" if _cache_to_share() else
                     "no cache can be written here: other processes compile them again")  # fmt: skip
            _tell(f"attnkit: warmup: done in {time.perf_counter() - self.started:.1f} s; {where}")
        if self.failures:
            warnings.warn("attnkit.warmup: a helper process failed; its kernels compiled in this process "
                          f"instead:\n{self.failures[0]}", RuntimeWarning, stacklevel=3)  # fmt: skip

    def _cold(self):
        """The first compilation here: the cache is cold, so the helpers start (and it says so)."""
        self.cold = True
        helpers = f"{self.helpers} helper process{'es' if self.helpers > 1 else ''} alongside this one"
        jobs = f"{len(self.jobs)} kernel job{'s' if len(self.jobs) > 1 else ''}"
        _tell(f"attnkit: warmup: compiling {jobs} for this CPU, "
              f"{helpers if self.helpers else 'in this process'} (first use: seconds to minutes)")
        self.compiling.set()

    def _finished(self, job):
        """A job's kernels are ready (compiled, or loaded): one line once compiling has begun."""
        with self.lock:
            if job in self.finished:
                return
            self.finished.add(job)
            done = len(self.finished)
        if self.cold:
            _tell(f"attnkit: warmup: {describe_units(_units_of_job(*job))} ready "
                  f"({done} of {len(self.jobs)}, {time.perf_counter() - self.started:.1f} s)")

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
        elif child.returncode == 0:
            self._finished(job)  # in the cache now; this process loads it at the end

    def _kill_children(self):
        with self.lock:
            children = list(self.children)
        for child in children:
            child.kill()


def _tell(line):
    """A progress line on stderr, unless ATTNKIT_COMPILE_NOTICE=0."""
    if os.environ.get("ATTNKIT_COMPILE_NOTICE", "1") != "0":
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


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


# ---------------------------------------------------------------------------
# Kernels ready or compiling: what a call may run without compiling in the calling process
# ---------------------------------------------------------------------------
# A unit is one compiled kernel with its steps: (kernel input dtype name, bf16 products, kernel),
# kernel "forward", "decode", "backward" or "decode_backward". A unit is ready when this process
# has run it, or when its marker file says an earlier process compiled it into the on-disk cache
# (then a call loads it in well under a second). The markers sit beside the compiled code and are
# deleted with it when the kernel sources change (jit.discard_stale_cache).

READY_MARKER_PREFIX = "attnkit-ready-"

_READY = set()  # units this process ran, or found marked in the cache
_HELPERS = {}  # unit -> the helper process compiling it (running or finished)
_FAILED = set()  # units a helper could not compile: they compile in the calling process
_CONSIDERED_AHEAD = set()  # units compiling_ahead has looked at (each once per process)
_TOLD = [False]  # the background-compilation notice was written


def unit_job(unit):
    """run_job's arguments compiling one unit."""
    dtype_name, bf16_products, kernel = unit
    return (dtype_name, bool(bf16_products), kernel, kernel in _FORWARD_OF)


def _units_of_job(dtype_name, bf16_products, kind, backward):
    kernels = [kind] + ([_BACKWARD_OF[kind]] if backward and kind in _BACKWARD_OF else [])
    return [(dtype_name, bool(bf16_products), kernel) for kernel in kernels]


def _marker(unit):
    """The marker file of a unit in the on-disk cache (None without one): named after everything
    Numba's cache keys tell compiled code apart by, so a marker never vouches for code another
    CPU target, product path, Numba or Python would need."""
    from .jit import code_variant
    from .target import TARGET

    folder = _marker_folder()
    if folder is None:
        return None
    key = (unit, code_variant(), TARGET.triple, TARGET.cpu, TARGET.features, numba.__version__, sys.version_info[:2])
    digest = hashlib.sha256(repr(key).encode()).hexdigest()[:24]
    return folder / f"{READY_MARKER_PREFIX}{digest}"


@functools.cache
def _marker_folder():
    """The cache folder of this module's own folder (cache_location: checking it touches the disk)."""
    return cache_location(Path(__file__).parent)[0]


def mark_ready(units):
    """These units ran in this process: remember it, and mark them in the on-disk cache for later
    processes (their code was saved there when they compiled)."""
    for unit in units:
        if unit in _READY:
            continue
        _READY.add(unit)
        marker = _marker(unit)
        if marker is not None and not marker.exists():
            try:
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(repr(unit) + "\n", encoding="ascii")
            except OSError:
                pass  # a read-only cache: later processes compile as this one did


def units_ready(units):
    """Whether a call needing these units runs without compiling anything in this process."""
    for unit in units:
        if unit in _READY:
            continue
        helper = _HELPERS.get(unit)
        if helper is not None and helper.poll() is None:
            return False  # still compiling
        marker = _marker(unit)
        if marker is not None and marker.exists():
            _READY.add(unit)  # compiled by a helper or an earlier process: it loads from the cache
            continue
        if helper is not None:  # finished without marking it: it failed
            _FAILED.add(unit)
        return False
    return True


def compile_in_background(units, *, start=True):
    """Have helper processes compile the units not ready (units_ready) into the on-disk cache, so
    that this process can go on without them meanwhile; True when every such unit has a helper
    (started now, or before). False when one cannot: no cache to share, no interpreter to start,
    or a helper that failed on it before; the unit then compiles where it is called.
    start=False: only say whether it could (attnkit.explain)."""
    waiting = [unit for unit in units if not units_ready((unit,))]
    if any(unit in _FAILED for unit in waiting) or (waiting and not _cache_to_share()):
        return False
    if not start:
        return True
    started = []
    for unit in waiting:
        if unit in _HELPERS and _HELPERS[unit].poll() is None:
            continue
        try:
            _HELPERS[unit] = _start_helper(unit_job(unit), subprocess.DEVNULL)
        except OSError:
            _FAILED.add(unit)
            return False
        started.append(unit)
    if started and not _TOLD[0]:
        _TOLD[0] = True
        _tell(f"attnkit: compiling the CPU kernels ({describe_units(started)}) in helper processes (first use on "
              "this machine: seconds; cached on disk for later processes); until they are ready, calls run on the "
              "NumPy reference (exact, slower). attnkit.warmup() compiles ahead; ATTNKIT_WHILE_COMPILING=wait "
              "compiles in the call instead")
    return True


def _dtype_label(unit):
    dtype_name, bf16_products, _ = unit
    if dtype_name == "uint16":
        return "bfloat16"
    return f"{dtype_name} (bf16 products)" if bf16_products else dtype_name


def cached_units():
    """The units marked compiled in the on-disk cache for this target and product path (`attnkit info`)."""
    variants = warmup_variants(("float32", "bfloat16", "float64")) + warmup_variants(("float32",), float32_bf16=True)
    units = [(np.dtype(dtype).name, bool(bf16), kernel)
             for dtype, bf16 in dict.fromkeys(variants)
             for kernel in ("forward", "decode", "backward", "decode_backward")]  # fmt: skip
    markers = {unit: _marker(unit) for unit in units}
    return [unit for unit, marker in markers.items() if marker is not None and marker.exists()]


def describe_units(units):
    """Units as text: "float32: forward, backward; float64: decode"."""
    kernels = {}
    for unit in units:
        kernels.setdefault(_dtype_label(unit), []).append(unit[2])
    return "; ".join(f"{label}: {', '.join(names)}" for label, names in kernels.items()) or "none"


def compiling(units=None):
    """The units helper processes are compiling now (of `units`, or all)."""
    return [unit for unit, helper in list(_HELPERS.items())
            if helper.poll() is None and (units is None or unit in units)]  # fmt: skip


def wait_for_background(units=None):
    """Wait for the helpers compiling these units (all when None): their work then loads from the
    cache; a unit a helper failed to compile compiles here when it runs."""
    for unit in list(_HELPERS) if units is None else units:
        helper = _HELPERS.get(unit)
        if helper is not None:
            helper.wait()


_NOTHING_AHEAD = contextlib.nullcontext()


def compiling_ahead(unit):
    """A context manager: within it, should anything start compiling (a cold cache), a helper process
    starts compiling the unit (say, the backward kernel of a forward that needs a gradient) while
    this process goes on. Each unit is considered once per process: later calls cost a set lookup
    and return a shared no-op. wait_for_background((unit,)) waits for the helper."""
    if unit in _CONSIDERED_AHEAD:
        return _NOTHING_AHEAD
    _CONSIDERED_AHEAD.add(unit)
    if unit in _HELPERS or unit in _READY or not _helpers_can_share():
        return _NOTHING_AHEAD

    def start():
        try:
            _HELPERS[unit] = _start_helper(unit_job(unit), subprocess.DEVNULL)  # failing, it compiles here
        except OSError:
            pass  # the unit compiles in this process when it runs

    return event.install_listener("numba:compile", _FirstCompile(start))


def _main(argv):
    """A helper process: run one job, given as JSON (see _Jobs._run_helper). Helpers compiling the
    same job (two processes of one program, say) take turns: the second loads the first's work."""
    from filelock import FileLock  # here, not at import: a process that loads its kernels takes no lock

    job = json.loads(argv[0])
    marker = _marker(_units_of_job(*job)[0])
    lock = contextlib.nullcontext() if marker is None else FileLock(f"{marker}.lock")
    with lock:
        run_job(*job)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
