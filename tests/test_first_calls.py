"""First calls on a machine where the kernels are not compiled yet: the NumPy reference stands in
while helper processes compile them (attnkit.backends, kernels/warmup.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import attnkit
from attnkit import backends
from attnkit.backends import NumbaBackend, choose_backend
from attnkit.backends.reference import STAND_IN_BYTES
from attnkit.kernels import jit, warmup
from attnkit.validation import validate_attention

# A training step in float64, compared with torch's SDPA (math backend) in float64; the process
# records whatever Numba compiles in it.
_FIRST_CALLS = r"""
import sys
import torch
from numba.core import event
import attnkit
from attnkit.kernels import warmup

def step(q, k, v, mask):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = attnkit.attention(q, k, v, causal="bottom_right", mask=mask)
    out.backward(d_out)
    return [out.detach()] + [x.grad for x in (q, k, v)]

def expected(q, k, v, mask):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    visible = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril(k.shape[-2] - q.shape[-2]) & mask
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=True)
    out.backward(d_out)
    return [out.detach()] + [x.grad for x in (q, k, v)]

g = torch.Generator().manual_seed(int(sys.argv[1]))
q = torch.randn(2, 4, 37, 24, dtype=torch.float64, generator=g)
k, v = (torch.randn(2, 2, 45, 24, dtype=torch.float64, generator=g) for _ in range(2))
mask = torch.rand(37, 45, generator=g) > 0.3
d_out = torch.randn(2, 4, 37, 24, dtype=torch.float64, generator=g)
want = expected(q, k, v, mask)
report = []
for call in range(2):
    if call == 1:
        warmup.wait_for_background()  # the helpers' work is in the cache now
    runs_on = attnkit.explain(q, k, v, causal="bottom_right", mask=mask).split("'")[1]
    with event.install_recorder("numba:compile") as compiled:
        got = step(q, k, v, mask)
    error = max(float((a - b).abs().max()) for a, b in zip(got, want))
    report.append(f"{runs_on} compiled={len(compiled.buffer)} helpers={len(warmup._HELPERS)} ok={error < 1e-10}")
print(" | ".join(report))
"""


def _run(code, cache, *arguments):
    env = {key: value for key, value in os.environ.items() if key != "ATTNKIT_WHILE_COMPILING"}
    env["NUMBA_CACHE_DIR"] = str(cache)
    result = subprocess.run([sys.executable, "-c", code, *arguments], env=env, capture_output=True, text=True,
                            timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip(), result.stderr


def test_first_calls_run_on_the_reference_while_helpers_compile_then_on_the_kernel(tmp_path):
    """A cold cache: the first training step runs on the reference and compiles nothing in the
    calling process (two helpers compile the forward and the backward kernel); once they are done,
    the next step runs on the Numba kernel, loaded from the cache (still nothing compiled here).
    A later process runs the kernel from its first call and starts no helper. Each step equals
    torch's SDPA in float64."""
    stdout, stderr = _run(_FIRST_CALLS, tmp_path, "1")
    assert stdout == "reference compiled=0 helpers=2 ok=True | numba compiled=0 helpers=2 ok=True", stdout
    assert stderr.count("attnkit: compiling the CPU kernels (float64: forward, backward)") == 1, stderr
    markers = list(tmp_path.rglob(f"{warmup.READY_MARKER_PREFIX}*"))
    assert len([m for m in markers if not m.name.endswith(".lock")]) == 2, markers

    stdout, stderr = _run(_FIRST_CALLS, tmp_path, "2")
    assert stdout == "numba compiled=0 helpers=0 ok=True | numba compiled=0 helpers=0 ok=True", stdout
    assert "attnkit: compiling" not in stderr, stderr


@pytest.fixture
def not_compiled(monkeypatch):
    """The Numba backend as on a cold cache whose kernels helpers can compile; returns the calls
    to compile_in_background (start flags)."""
    started = []
    monkeypatch.setattr(NumbaBackend, "compiled_for", lambda self, spec, request: False)
    monkeypatch.setattr(NumbaBackend, "compile_in_background",
                        lambda self, spec, request, *, start=True: started.append(start) or True)  # fmt: skip
    monkeypatch.delenv("ATTNKIT_WHILE_COMPILING", raising=False)
    return started


def _spec(batch, hq, n, dtype=np.float32):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((batch, hq, n, 8)).astype(dtype)
    k = rng.standard_normal((batch, 1, n, 8)).astype(dtype)
    return validate_attention(q, k, k, causal=True, mask=None, scale=None, window=None, softcap=None)


def test_the_reference_stands_in_only_for_auto_small_calls_and_unless_told_to_wait(not_compiled, monkeypatch):
    small = _spec(1, 2, 64)
    request = backends.Request(grad=True)
    choice = choose_backend(small, "auto", request)
    assert choice.backend.name == "reference" and not_compiled == [True]
    assert "stands in" in choice.explain(small)
    assert choose_backend(small, "numba", request).backend.name == "numba"  # named: never replaced

    # explain() says what a call would run on and starts nothing
    assert choose_backend(small, "auto", request, warn=False, start_compiling=False).backend.name == "reference"
    assert not_compiled == [True, False]

    # too large for the reference: the call compiles (or waits for a helper) where it runs
    side = int((STAND_IN_BYTES // 4) ** 0.5)  # one float32 head with just more scores than the limit
    assert choose_backend(_spec(1, 1, side + 1), "auto", request).backend.name == "numba"
    assert choose_backend(_spec(1, 1, side), "auto", request).backend.name == "reference"
    assert choose_backend(_spec(1, 1, side * 3 // 4, np.float64), "auto", request).backend.name == "numba"

    monkeypatch.setenv("ATTNKIT_WHILE_COMPILING", "wait")
    assert choose_backend(small, "auto", request).backend.name == "numba"
    monkeypatch.setenv("ATTNKIT_WHILE_COMPILING", "later")
    with pytest.raises(ValueError, match="ATTNKIT_WHILE_COMPILING must be one of reference, wait; got 'later'"):
        choose_backend(small, "auto", request)


def test_a_call_runs_the_kernel_when_no_helper_can_compile_it(not_compiled, monkeypatch):
    monkeypatch.setattr(NumbaBackend, "compile_in_background", lambda self, spec, request, *, start=True: False)
    assert choose_backend(_spec(1, 2, 64), "auto", backends.Request()).backend.name == "numba"


def test_a_unit_whose_helper_failed_is_compiled_by_the_caller(monkeypatch):
    """A helper that exits with an error marks nothing: the unit is not ready, and no second helper
    is started for it (the call then compiles it itself, rather than stand in forever)."""
    monkeypatch.setattr(warmup, "_HELPERS", {})
    monkeypatch.setattr(warmup, "_FAILED", set())
    monkeypatch.setattr(warmup, "_TOLD", [True])
    failing = [sys.executable, "-c", "raise SystemExit(3)"]
    monkeypatch.setattr(warmup, "_start_helper", lambda job, errors=None: subprocess.Popen(failing))
    monkeypatch.setattr(warmup, "_cache_to_share", lambda: True)
    unit = ("float32", False, "a kernel nobody compiles")
    assert warmup.compile_in_background([unit]) is True
    warmup.wait_for_background([unit])
    assert not warmup.units_ready([unit])
    assert warmup.compile_in_background([unit]) is False


def test_ready_markers_go_with_a_stale_cache(tmp_path):
    """Markers vouch for compiled code in the cache: when the kernel sources change, both go."""
    (tmp_path / "f.nbi").write_text("index")
    (tmp_path / f"{warmup.READY_MARKER_PREFIX}0123").write_text("unit")
    (tmp_path / "other.txt").write_text("kept")
    assert jit._discard_unless_stamped(tmp_path, "sources, version 1")
    assert sorted(p.name for p in tmp_path.iterdir()) == [jit._STAMP, "other.txt"]


def test_explain_on_a_warm_process_names_the_kernel():
    """In this process the kernels run (the suite compiles them): auto picks numba."""
    q = np.random.default_rng(0).standard_normal((1, 2, 16, 8)).astype(np.float32)
    attnkit.attention(q, q, q)
    assert attnkit.explain(q, q, q).startswith("backend 'numba'")


_REGISTRIES = r"""
import sys
import numba
import numpy as np
import attnkit.kernels.numba_attention  # imports kernels/jit.py, which hooks Numba's registries
imported_early = "numba.np.arraymath" in sys.modules

@numba.njit
def add(a):
    return a + 1.0

add(1.0)  # Numba's registries are loaded now: what a first compilation does
before = "scipy.linalg" in sys.modules
from numba.np import arraymath, linalg

@numba.njit
def dot(a, b):
    return np.dot(a, b)

a = np.arange(6.0).reshape(2, 3)
ok = np.array_equal(dot(a, a.T), a @ a.T)
from attnkit.kernels.cpu_blas import BLAS_NAME
print(BLAS_NAME, imported_early, before, arraymath._HAVE_BLAS, arraymath.ensure_blas is linalg.ensure_blas, ok,
      "scipy.linalg" in sys.modules)
"""


def test_numbas_registries_load_without_importing_scipy_linalg_and_np_dot_still_compiles(tmp_path):
    """kernels/jit.py's defer_scipy_import: importing the kernels does not import numba.np.arraymath
    (a process that loads its kernels from the cache never needs it); when a first compilation
    loads Numba's registries, its BLAS check finds SciPy's cython_blas on disk instead of importing
    scipy.linalg; Numba's np.dot still compiles, and imports SciPy when it does. (Where attnkit's
    own BLAS is SciPy's, cpu_blas.py imports it first.)"""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", _REGISTRIES], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    blas, *found = result.stdout.split()
    assert found == ["False", str(blas != "mkl"), "True", "True", "True", "True"], result.stdout


# A fresh process whose kernels are in the cache: a training step and a decode step, checked
# against torch; whether Numba loaded its registries; then the external symbols that every
# library in the cache declares, read from the files without importing anything they name.
_LOADS = r"""
import io, json, pickle, sys
from pathlib import Path
import llvmlite.binding as ll
import torch
import attnkit

def step(q, k, v, attend):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = attend(q, k, v)
    out.sum().backward()
    return [out.detach()] + [x.grad for x in (q, k, v)]

g = torch.Generator().manual_seed(3)
q, k, v = (torch.randn(1, 4, 40, 16, generator=g) for _ in range(3))
got = step(q, k, v, lambda q, k, v: attnkit.attention(q, k, v, causal=True))
want = step(q, k, v, lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
got.append(attnkit.attention(q[:, :, -1:], k, v))
want.append(torch.nn.functional.scaled_dot_product_attention(q[:, :, -1:], k, v))
error = max(float((a - b).abs().max()) for a, b in zip(got, want))

class Anything:
    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)
    def __init__(self, *args, **kwargs):
        pass
    def __setstate__(self, state):
        pass

class NoImports(pickle.Unpickler):
    def find_class(self, module, name):
        return Anything

libraries, declared, unresolved = 0, set(), set()
for folder in sys.argv[1:]:
    for path in sorted(Path(folder).glob("*.nbc")):
        name, kind, data = NoImports(io.BytesIO(path.read_bytes())).load()[0]
        bitcode = data if kind == "bitcode" else data[1]  # a helper kept as IR to link (kernels/jit.py), or machine code
        libraries += 1
        for function in ll.parse_bitcode(bitcode).functions:
            if function.is_declaration and not function.name.startswith("llvm."):
                declared.add(function.name)
                if not ll.address_of_symbol(function.name):
                    unresolved.add(function.name)
registries = "numba.np.random.legacy" in sys.modules

import numba  # then the process compiles code that needs the registries (a compilation loads them)
import numpy as np

@numba.njit
def needs_registries(n):
    counts = {"a": 0, "b": 0}
    for word in ("a", "b", "a"):
        counts[word] += 1
    np.random.seed(n)
    return counts["a"], np.random.random() < 1.0

compiled_later = needs_registries(3) == (2, True)
print(json.dumps(dict(error=error, registries=registries, libraries=libraries, compiled_later=compiled_later,
                      nrt=any(name.startswith("NRT_") for name in declared),
                      own=any(name.startswith("attnkit_") for name in declared), unresolved=sorted(unresolved))))
"""


def test_a_process_loads_its_kernels_without_numbas_registries_and_links_them():
    """A load from the cache skips Numba's registries (LockedFunctionCache.load_overload: a tenth
    of a second of a first call). A fresh process that finds its kernels in the cache runs a
    training step and a decode step (equal to torch's) without importing them. That is safe while
    nothing in the cache calls a symbol that only a registry provides (the process would abort
    while linking it): every external that the cached libraries declare (Numba's runtime, its C
    helpers, attnkit's BLAS and threads) resolves in that process. The process then compiles a
    function of its own that needs them (a dict of strings, np.random)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 40, 16, generator=g, requires_grad=True) for _ in range(3))
    attnkit.attention(q, k, v, causal=True).sum().backward()  # compiled here where the cache lacks them
    attnkit.attention(q.detach()[:, :, -1:], k.detach(), v.detach())
    kernels = Path(jit.__file__).parent
    folders = [str(folder) for folder in (jit.cache_folder(kernels), jit.cache_folder(kernels / "cpu")) if folder]
    result = subprocess.run([sys.executable, "-c", _LOADS, *folders], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["error"] < 1e-5, found
    assert not found["registries"] and found["compiled_later"], found
    assert found["libraries"] >= 10 and found["nrt"] and found["own"], found  # the scan saw the kernels' externals
    assert found["unresolved"] == [], f"cached code calls symbols that a load does not set up: {found}"


def test_the_reference_runs_its_blas_on_one_thread_while_helpers_compile(monkeypatch):
    """Beside helper processes compiling on every core, the BLAS threads of a call standing in for
    the kernel waited for cores the helpers held (a first call 1.1-3.1 s instead of ~0.5): while
    helpers compile, the reference limits NumPy's BLAS to one thread for the call, and only then."""
    from threadpoolctl import threadpool_info

    from attnkit.backends import reference as reference_backend

    def blas_threads():
        return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]

    before = blas_threads()
    if not before or max(before) == 1:
        pytest.skip("NumPy's BLAS runs on one thread here anyway")
    seen = []
    real = reference_backend.reference_attention

    def spy(*args, **kwargs):
        seen.append(blas_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(reference_backend, "reference_attention", spy)
    q = np.random.default_rng(5).standard_normal((1, 2, 8, 4))
    for helpers in ([("float32", False, "forward")], []):
        monkeypatch.setattr(warmup, "compiling", lambda units=None, helpers=helpers: list(helpers))
        out = attnkit.attention(q, q, q, backend="reference")
        np.testing.assert_allclose(out, real(q, q, q), rtol=1e-12)
    assert seen == [[1] * len(before), before], seen
    assert blas_threads() == before  # the limit ends with the call


STEP_CASES = {
    # id: (q shape, kv shape, options): what a stand-in call may carry
    "gqa-causal": ((1, 8, 64, 16), (1, 4, 80, 16), dict(causal=True)),
    "mask-shared-by-heads": ((2, 6, 33, 8), (2, 3, 33, 8), dict(mask="shared")),
    "mask-per-head-window": ((2, 6, 33, 8), (2, 3, 33, 8), dict(mask="per-head", window=(5, 3))),
    "alibi": ((1, 4, 40, 8), (1, 2, 40, 8), dict(alibi="slopes", causal=True)),
    "sinks-softcap": ((1, 4, 40, 8), (1, 2, 40, 8), dict(sinks="logits", softcap=2.0)),
    "batch-axes": ((3, 2, 4, 40, 8), (3, 2, 2, 40, 8), dict(causal=True)),
}


@pytest.mark.parametrize("case", STEP_CASES.values(), ids=STEP_CASES.keys())
def test_the_reference_runs_a_large_call_a_few_kv_heads_at_a_time_with_the_same_bits(case, monkeypatch):
    """Standing in for a kernel (helpers compiling), above _SCORES_PER_STEP_BYTES of scores the
    reference backend runs a dense call a few kv heads at a time (their temporaries, not the whole
    call's): forward and gradients bit for bit those of the call run whole, masks, ALiBi slopes and
    sinks cut to each step's query heads. Called for itself it runs whole (the specification)."""
    from attnkit.backends import reference as reference_backend

    q_shape, kv_shape, options = case
    rng = np.random.default_rng(sum(q_shape))
    q, k, v = (torch.tensor(rng.standard_normal(s), dtype=torch.float32) for s in (q_shape, kv_shape, kv_shape))
    hq, nq, nk = q_shape[-3], q_shape[-2], kv_shape[-2]
    extra = {"shared": rng.random((q_shape[0], 1, nq, nk)) > 0.3, "per-head": rng.random((q_shape[0], hq, nq, nk)) > 0.3}
    options = dict(options)
    if "mask" in options:
        options["mask"] = torch.from_numpy(extra[options["mask"]])
    if "alibi" in options:
        options.pop("alibi")
        options["alibi_slopes"] = torch.tensor(rng.random(hq), dtype=torch.float32)
    if "sinks" in options:
        options["sinks"] = torch.tensor(rng.standard_normal(hq), dtype=torch.float32)
    steps = []
    real_steps = reference_backend._head_steps
    monkeypatch.setattr(reference_backend, "_head_steps", lambda *a: steps.append(real_steps(*a)) or steps[-1])
    results = []
    helpers = [("float32", False, "forward")]
    for step_bytes, compiling in ((1 << 40, helpers), (1, []), (1, helpers)):  # whole, whole, one kv head a step
        monkeypatch.setattr(warmup, "compiling", lambda units=None, compiling=compiling: list(compiling))
        monkeypatch.setattr(reference_backend, "_SCORES_PER_STEP_BYTES", step_bytes)
        inputs = [x.clone().requires_grad_() for x in (q, k, v)]
        out = attnkit.attention(*inputs, backend="reference", **options)
        out.backward(torch.ones_like(out))
        results.append([out.detach()] + [x.grad for x in inputs])
    assert steps[:4] == [None] * 4 and [len(s) for s in steps[4:]] == [kv_shape[-3]] * 2, steps
    for whole, whole_again, stepped in zip(*results):
        torch.testing.assert_close(stepped, whole, rtol=0, atol=0)
        torch.testing.assert_close(whole_again, whole, rtol=0, atol=0)
