"""Processes share the kernels' on-disk cache (kernels/jit.py): saves made at the same moment by
several processes never let one signature's index entry name another signature's machine code,
and lose no entry."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

from attnkit.kernels.jit import LockedFunctionCache, _LockedIndexDataFile

_SAVER = """
import sys, time
from attnkit.kernels.jit import _LockedIndexDataFile
folder, process, n_keys, start = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
cache = _LockedIndexDataFile(cache_path=folder, filename_base="shared-1.py3", source_stamp=("stamp", 1))
while time.time() < start:  # every process starts saving at the same moment
    time.sleep(0.001)
for i in range(n_keys):
    cache.save(("signature", process, i), ("machine code of", process, i, b"x" * 4096))
"""


def _run_at_once(scripts_and_args, env=None):
    """Start each (script, args) as a Python process, all together; fail on any failure."""
    children = [
        subprocess.Popen([sys.executable, "-c", script, *map(str, args)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for script, args in scripts_and_args
    ]  # fmt: skip
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err[-3000:]


def test_processes_saving_at_once_keep_every_entry_with_its_own_data(tmp_path):
    n_processes, n_keys = 4, 60
    start = time.time() + 3.0  # after every interpreter has imported numba
    _run_at_once([(_SAVER, (tmp_path, p, n_keys, start)) for p in range(n_processes)])
    cache = _LockedIndexDataFile(cache_path=str(tmp_path), filename_base="shared-1.py3", source_stamp=("stamp", 1))
    index = cache._load_index()
    assert len(index) == n_processes * n_keys  # no entry lost
    for p in range(n_processes):
        for i in range(n_keys):
            assert cache.load(("signature", p, i)) == ("machine code of", p, i, b"x" * 4096)
    assert len(set(index.values())) == len(index)  # one data file per key
    assert not list(tmp_path.glob("*.tmp.*"))  # no file left half written


def test_data_files_are_named_by_key_and_written_before_the_index_names_them(tmp_path):
    cache = _LockedIndexDataFile(cache_path=str(tmp_path), filename_base="f-3.py3", source_stamp=("stamp", 1))
    seen_at_index_write = []
    save_index = cache._save_index

    def save_index_checking(overloads):
        seen_at_index_write.extend(os.path.exists(cache._data_path(name)) for name in overloads.values())
        save_index(overloads)

    cache._save_index = save_index_checking
    cache.save(("a",), 1)
    cache.save(("b",), 2)
    cache.save(("a",), 3)  # the same key again: its own file, replaced
    assert seen_at_index_write and all(seen_at_index_write)
    assert cache.load(("a",)) == 3 and cache.load(("b",)) == 2
    names = cache._load_index()
    assert names[("a",)] == cache.data_name_of(("a",)) != cache.data_name_of(("b",)) == names[("b",)]
    assert sorted(p.name for p in tmp_path.glob("*.nbc")) == sorted(names.values())
    # a second process's view of the same folder names the same files
    other = _LockedIndexDataFile(cache_path=str(tmp_path), filename_base="f-3.py3", source_stamp=("stamp", 1))
    assert other.data_name_of(("b",)) == names[("b",)] and other.load(("b",)) == 2


_MODULE = """
from attnkit.kernels.jit import jit

@jit()
def twice_plus_one(x):
    return x * 2 + 1
"""

_COMPILER = """
import sys, numpy as np
sys.path.insert(0, sys.argv[1])
import shared_cache_kernel as m
m.twice_plus_one(np.arange(5, dtype=sys.argv[2]))
assert m.twice_plus_one.stats.cache_misses, "compiled nothing: the cache was not empty"
"""

_LOADER = """
import sys, numpy as np
sys.path.insert(0, sys.argv[1])
import shared_cache_kernel as m
for dtype in sys.argv[2:]:
    x = np.arange(5, dtype=dtype)
    assert np.array_equal(m.twice_plus_one(x), x * 2 + 1), dtype
stats = m.twice_plus_one.stats
assert not stats.cache_misses, f"compiled again: {dict(stats.cache_misses)}"
assert sum(stats.cache_hits.values()) == len(sys.argv) - 2, dict(stats.cache_hits)
"""


def test_signatures_compiled_in_processes_at_once_load_in_the_next(tmp_path):
    """Five processes compile one kernel for five dtypes into one cache folder at the same time;
    a sixth loads every signature from it, runs it, and compiles nothing."""
    (tmp_path / "shared_cache_kernel.py").write_text(textwrap.dedent(_MODULE))
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), ATTNKIT_COMPILE_NOTICE="0")
    dtypes = ["float32", "float64", "int32", "int64", "complex64"]
    _run_at_once([(_COMPILER, (tmp_path, dtype)) for dtype in dtypes], env=env)
    _run_at_once([(_LOADER, (tmp_path, *dtypes))], env=env)


def test_kernels_use_the_locked_cache():
    from attnkit.kernels.cpu.forward import _forward_kernel
    from attnkit.kernels.cpu.launch import _fan_out

    for dispatcher in (_forward_kernel, _fan_out):
        assert isinstance(dispatcher._cache, LockedFunctionCache)
        assert isinstance(dispatcher._cache._cache_file, _LockedIndexDataFile)


_WARMUP = """
import numpy as np
import attnkit
from attnkit.kernels import numba_attention as kernel
from attnkit.kernels.cpu.decode import _decode_worker
from attnkit.kernels.cpu.forward import _forward_worker

attnkit.warmup(["float64"], backward=False)  # two jobs: the forward here, the decode in a helper
assert _forward_worker.stats.cache_misses, "the forward compiled here"
assert _decode_worker.stats.cache_hits and not _decode_worker.stats.cache_misses, (
    f"decode: hits {dict(_decode_worker.stats.cache_hits)}, misses {dict(_decode_worker.stats.cache_misses)}")
before = {f: len(f.signatures) for f in (_forward_worker, _decode_worker)}
rng = np.random.default_rng(1)
q, k, v = rng.standard_normal((2, 8, 1, 64)), rng.standard_normal((2, 2, 700, 64)), rng.standard_normal((2, 2, 700, 64))
out, _ = kernel.flash_forward(q, k, v, None, scale=0.125, causal=None, window=None, softcap=None)
s = np.einsum("bhqd,bhkd->bhqk", q, np.repeat(k, 4, axis=1)) * 0.125
p = np.exp(s - s.max(-1, keepdims=True))
expected = np.einsum("bhqk,bhkd->bhqd", p / p.sum(-1, keepdims=True), np.repeat(v, 4, axis=1))
assert np.abs(out - expected).max() < 1e-10
assert before == {f: len(f.signatures) for f in (_forward_worker, _decode_worker)}, "a call compiled again"
print("ok")
"""


def test_warmup_compiles_in_helper_processes_and_this_one_loads_their_work(tmp_path):
    """With a cold cache, warmup's helper process compiles the decode kernel while this process
    compiles the forward; this process then loads the decode kernel from the cache (a hit, no
    compilation), and its calls compile nothing more and give the right result. On stderr: a
    line when compiling starts, one per job as it is ready, one at the end, and no per-kernel
    notice; a second process, which loads everything, says nothing."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("ATTNKIT_COMPILE_NOTICE", None)
    result = subprocess.run([sys.executable, "-c", _WARMUP], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("attnkit:")]
    assert lines[0].startswith("attnkit: warmup: compiling 2 kernel jobs for this CPU, 1 helper process"), lines
    ready = sorted(line.split("warmup: ")[1].split(" ready (")[0] for line in lines if " ready (" in line)
    assert ready == ["float64: decode", "float64: forward"], lines
    assert lines[-1].startswith("attnkit: warmup: done in") and "on-disk cache" in lines[-1], lines
    assert len(lines) == 4, lines  # nothing else: no "compiling the forward kernel" notice
    again = subprocess.run([sys.executable, "-c", "import attnkit; attnkit.warmup(['float64'], backward=False)"],
                           env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert again.returncode == 0 and "attnkit:" not in again.stderr, again.stderr[-3000:]


def test_warmup_processes_must_be_a_positive_int():
    import pytest

    import attnkit

    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="processes"):
            attnkit.warmup(["float32"], processes=bad)


_TRAINING_STEP = """
import torch
import attnkit
from attnkit.kernels import warmup
from attnkit.kernels.cpu.backward import _backward_worker

started, start = [], warmup._start_helper
warmup._start_helper = lambda job, *rest: started.append(job) or start(job, *rest)
torch.manual_seed(0)
q, k, v = (torch.randn(2, 4, 33, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
attnkit.attention(q, k, v, causal=True).sum().backward()
hits, misses = sum(_backward_worker.stats.cache_hits.values()), sum(_backward_worker.stats.cache_misses.values())
grads = [x.grad.clone() for x in (q, k, v)]
for x in (q, k, v):
    x.grad = None
torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
assert all(torch.allclose(g, x.grad, atol=1e-10) for g, x in zip(grads, (q, k, v)))
print(len(started), hits, misses)
"""


def test_a_first_training_step_compiles_its_backward_in_a_helper_meanwhile(tmp_path):
    """Cold cache: while the forward compiles here, a helper process compiles the backward kernel;
    the backward then loads it from the cache (a hit, no compilation) and the gradients are right.
    With the cache warm, nothing compiles and no helper starts."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), ATTNKIT_COMPILE_NOTICE="0")
    for run, helpers in (("cold", "1"), ("warm", "0")):
        result = subprocess.run([sys.executable, "-c", _TRAINING_STEP], env=env, capture_output=True, text=True,
                                timeout=900)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        # helpers started; the backward worker's cache hits and compilations
        assert result.stdout.split() == [helpers, "1", "0"], (run, result.stdout)


_PARALLEL_MODULE = """
import numpy as np
from numba import prange
from attnkit.kernels.jit import jit

@jit(parallel=True)
def fan_out(x):  # like kernels/cpu/launch.py's _fan_out: one parallel function, compiled once
    for i in prange(x.shape[0]):
        x[i] += 1.0

@jit()
def caller(x):  # like a kernel: compiled later, linking the cached parallel function
    fan_out(x)
    return x.sum()
"""

_CALLS = """
import sys, numpy as np
sys.path.insert(0, sys.argv[1])
import shared_parallel_kernel as m
for call in sys.argv[2:]:
    x = np.zeros(1000, dtype=call.split(":")[1])
    getattr(m, call.split(":")[0])(x)
    assert float(np.sum(x)) == 1000.0, call
print("ok")
"""


def test_a_function_compiled_after_loading_a_parallel_one_loads_first_in_a_new_process(tmp_path):
    """A parallel function loaded from the cache, then a caller compiled in that process: a third
    process that loads the caller first must start the threading layer (it segfaulted: Numba drops
    the loaded function's reload_init, so the caller was cached without it)."""
    (tmp_path / "shared_parallel_kernel.py").write_text(textwrap.dedent(_PARALLEL_MODULE))
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), ATTNKIT_COMPILE_NOTICE="0")
    for calls in (["fan_out:float64"], ["fan_out:float64", "caller:float64"], ["caller:float64"]):
        result = subprocess.run([sys.executable, "-c", _CALLS, str(tmp_path), *calls], env=env, capture_output=True,
                                text=True, timeout=300)  # fmt: skip
        assert result.returncode == 0 and result.stdout.strip() == "ok", (calls, result.returncode, result.stderr[-2000:])
