"""The Numba kernel behind the public API: dispatch, torch autograd, layouts,
concurrency, and installs where the JIT cache cannot be written.

The kernel's own numerical sweeps are in test_numba_kernel.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import attnkit
from attnkit import reference
from attnkit.testing import assert_close

ROOT = Path(__file__).resolve().parents[1]


def qkv(rng, shape_q, shape_k, dv=None, dtype=np.float32):
    dv = shape_k[-1] if dv is None else dv
    return (rng.standard_normal(shape_q).astype(dtype), rng.standard_normal(shape_k).astype(dtype),
            rng.standard_normal(shape_k[:-1] + (dv,)).astype(dtype))


def test_auto_picks_numba_for_cpu_data():
    q = np.zeros((1, 2, 8, 16), np.float32)
    assert attnkit.explain(q, q, q).startswith("backend 'numba'")
    text = attnkit.explain(q, q, q, return_weights=True)
    assert text.startswith("backend 'reference'") and "skipped 'numba': return_weights" in text


def test_fallback_for_weights_is_announced():
    q = np.zeros((1, 2, 8, 16), np.float32)
    with pytest.warns(attnkit.AttnkitFallbackWarning, match="return_weights"):
        attnkit.attention(q, q, q, return_weights=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=["fp16", "bf16", "fp32", "fp64"])
def test_torch_dtypes_round_trip(dtype):
    q, k, v = (torch.randn(2, 4, 33, 16).to(dtype) for _ in range(3))
    out, lse = attnkit.attention(q, k, v, causal=True, return_lse=True, backend="numba")
    assert out.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    expected, expected_lse = reference.attention(*(x.double().numpy() for x in (q, k, v)), causal=True,
                                                 return_lse=True)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-5, torch.float64: 1e-10}[dtype]
    assert_close(out, expected, atol=tol, rtol=tol, name="out")
    assert_close(lse, expected_lse, atol=tol, rtol=tol, name="lse")


def test_broadcast_batch_strided_inputs_and_masks():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((3, 19, 4, 16)).astype(np.float32).transpose(0, 2, 1, 3)  # (B, H, N, D) view
    k = rng.standard_normal((1, 2, 23, 16)).astype(np.float32)  # shared across the batch
    v = rng.standard_normal((2, 23, 8)).astype(np.float32)
    masks = {
        "key_padding": rng.random((3, 1, 1, 23)) < 0.8,
        "per_head_additive": rng.standard_normal((4, 19, 23)).astype(np.float32),
        "per_query_constant": rng.random((3, 4, 19, 1)) < 0.9,
    }
    for name, mask in masks.items():
        out = attnkit.attention(q, k, v, mask=mask, causal="bottom_right", backend="numba")
        expected = reference.attention(*(x.astype(np.float64) for x in (q, k, v)), mask=mask,
                                       causal="bottom_right")
        assert_close(out, expected, atol=2e-5, rtol=2e-5, name=name)


def test_torch_tensors_are_viewed_not_copied(monkeypatch):
    """Contiguous float32 CPU tensors reach the compiled kernels as views of their own memory.

    (A read-only view on the way, such as np.broadcast_to returns, made the
    kernel wrapper copy q, k and v: 96 MiB at N=16384.)
    """
    from attnkit.kernels import numba_attention

    for n in (16, 300):  # small calls run on the calling thread (forward_serial)
        q, k, v = (torch.randn(2, 4, n, 32, requires_grad=True) for _ in range(3))
        with numba_attention.recording() as launches:
            attnkit.scaled_dot_product_attention(q, k, v, backend="numba").sum().backward()
        assert len(launches) == 2, f"N={n}: kernels called: {[launch.worker for launch in launches]}"
        for launch in launches:
            name = launch.worker
            for array, tensor in zip((launch.q, launch.k, launch.v), (q, k, v)):
                assert np.shares_memory(array, tensor.detach().numpy()), f"{name} got a copy"


# gradcheck over every feature, for this backend too: tests/test_api.py::test_gradcheck.


def test_sdpa_gradients_on_cpu_tensors_match_torch():
    q, k, v = (torch.randn(2, 4, 70, 32, requires_grad=True) for _ in range(3))
    out = attnkit.scaled_dot_product_attention(q, k, v, is_causal=True)
    d_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), d_out)
    expected_out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    expected = torch.autograd.grad(expected_out, (q, k, v), d_out)
    assert_close(out.detach(), expected_out.detach(), atol=2e-5, rtol=2e-5, name="out")
    for name, g, e in zip(("dq", "dk", "dv"), grads, expected):
        assert_close(g, e, atol=1e-4, rtol=1e-4, name=name)


def test_eight_threads_at_once_get_their_own_answers():
    rng = np.random.default_rng(2)
    inputs = [qkv(rng, (1, 4, 97, 32), (1, 2, 131, 32)) for _ in range(8)]
    expected = [reference.attention(*(x.astype(np.float64) for x in i), causal=True) for i in inputs]
    results = [None] * 8

    def work(index):
        for _ in range(3):
            results[index] = attnkit.attention(*inputs[index], causal=True, backend="numba")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        assert_close(results[i], expected[i], atol=2e-5, rtol=2e-5, name=f"thread {i}")


def test_the_load_gauge_counts_other_programs_runnable_threads(monkeypatch):
    """kernels.cpu.threads: a running average of the machine's runnable threads less ours, sampled no
    more often than SAMPLE_INTERVAL_S; one thread per call once other programs' threads fill every core."""
    from attnkit.kernels.cpu import threads

    clock, runnable = [10.0], [2]
    gauge = threads._LoadGauge(lambda: runnable[0], lambda: clock[0])
    assert gauge.other_runnable(own=2) == 0.0  # only ours
    runnable[0] = 4
    assert gauge.other_runnable(own=2) == 0.0  # too soon to look again
    for _ in range(30):
        clock[0] += threads.SAMPLE_INTERVAL_S
        gauge.other_runnable(own=2)
    assert gauge.other_runnable(own=2) == pytest.approx(2.0, abs=1e-3)  # two of another program's
    monkeypatch.setattr(threads, "_GAUGE", gauge)
    monkeypatch.setattr(threads, "_usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "_numba_threads", lambda: 2)
    assert threads.worker_count() == 1  # two cores, both wanted by others: the calling thread alone
    gauge.average = 3.0  # one other thread: the parallel kernels still gain from both cores
    assert threads.worker_count() == 2
    monkeypatch.setenv("ATTNKIT_LOAD_AWARE", "0")
    gauge.average = 9.0
    assert threads.worker_count() == 2
    assert threads._LoadGauge(lambda: None).other_runnable(own=1) == 0.0  # no /proc/loadavg: quiet


def test_worker_count_follows_numbas_thread_count_of_the_calling_thread(monkeypatch):
    """numba.set_num_threads is per thread: worker_count reads the calling thread's (its raw getter
    after the first call, kernels/cpu/threads._numba_threads), on a quiet machine."""
    import threading

    import numba

    from attnkit.kernels.cpu import threads

    monkeypatch.setattr(threads, "_GAUGE", threads._LoadGauge(lambda: None))  # no load to see
    full = numba.get_num_threads()
    seen = []
    try:
        for wanted in (1, full, 1):
            numba.set_num_threads(wanted)
            seen.append(threads.worker_count())
        other = threading.Thread(target=lambda: seen.append(threads.worker_count()))  # its own setting: all
        other.start()
        other.join()
    finally:
        numba.set_num_threads(full)
    assert seen == [1, full, 1, full]


def test_with_one_core_left_every_kernel_runs_on_the_calling_thread(monkeypatch):
    """Forward, decode and backward of calls big enough for the parallel kernels run their serial
    versions (no OpenMP region) when one thread is all there is, with the same results."""
    from attnkit.kernels import numba_attention

    monkeypatch.setattr(numba_attention, "worker_count", lambda: 1)
    rng = np.random.default_rng(5)
    cases = {"forward": ((1, 4, 200, 32), (1, 2, 230, 32)), "decode": ((2, 8, 1, 64), (2, 2, 700, 64))}
    for name, (shape_q, shape_k) in cases.items():
        q, k, v = (torch.from_numpy(x).requires_grad_() for x in qkv(rng, shape_q, shape_k))
        with numba_attention.recording() as launches:
            out = attnkit.attention(q, k, v, causal="bottom_right", backend="numba")
            d_out = torch.randn_like(out)
            grads = torch.autograd.grad(out, (q, k, v), d_out)
        backward = "decode_backward" if name == "decode" else "backward"
        assert [launch.worker for launch in launches] == [f"{name}_serial", f"{backward}_serial"], name
        q64, k64, v64 = (x.detach().double().numpy() for x in (q, k, v))
        expected, lse = reference.attention(q64, k64, v64, causal="bottom_right", return_lse=True)
        expected_grads = reference.attention_backward(q64, k64, v64, expected, d_out.double().numpy(), lse,
                                                      causal="bottom_right")
        assert_close(out.detach().numpy(), expected, atol=2e-5, rtol=2e-5, name=f"{name} out")
        for grad_name, g, e in zip(("dq", "dk", "dv"), grads, expected_grads):
            assert_close(g.numpy(), e, atol=1e-4, rtol=1e-4, name=f"{name} {grad_name}")


FORKED = """
    import os, signal, numpy as np, attnkit
    from attnkit import reference
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 4, 300, 32), dtype=np.float32) for _ in range(3))
    expected = reference.attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), causal=True)
    attnkit.attention(q, k, v, causal=True, backend="numba")  # the parent's OpenMP threads start
    pid = os.fork()
    if pid == 0:  # GNU OpenMP cannot run here (Numba would terminate the child): one thread instead
        signal.alarm(120)  # a hang fails the test instead of stalling it
        out = attnkit.attention(q, k, v, causal=True, backend="numba")
        os._exit(0 if np.abs(out - expected).max() < 2e-5 else 3)
    _, status = os.waitpid(pid, 0)
    print("child", os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_runs_parallel_calls():
    result = _run_python(FORKED)
    assert result.returncode == 0 and "child 0" in result.stdout, result.stdout + result.stderr[-3000:]


def _run_python(code, env=None, cwd=None):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})}, cwd=cwd)


CONCURRENT = """
    import threading, numpy as np, attnkit, numba
    from attnkit import reference
    rng = np.random.default_rng(0)
    inputs = [[rng.standard_normal((1, 2, 65, 16), dtype=np.float32) for _ in range(3)] for _ in range(8)]
    out = [None] * 8
    def work(i):
        out[i] = attnkit.attention(*inputs[i], backend="numba")
    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    [t.start() for t in threads]; [t.join() for t in threads]
    for i in range(8):
        ref = reference.attention(*(x.astype(np.float64) for x in inputs[i]))
        assert np.abs(out[i] - ref).max() < 2e-5, i
    print("layer", numba.threading_layer())
"""


def test_concurrent_calls_under_the_workqueue_layer():
    """workqueue aborts the process when two threads enter a parallel region: attnkit must serialise."""
    result = _run_python(CONCURRENT, env={"NUMBA_THREADING_LAYER": "workqueue"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "layer workqueue" in result.stdout


def _installed_copy(target):
    """attnkit laid out as an install would (kernels/, reference/, bench/ inside attnkit/)."""
    package = target / "attnkit"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "attnkit", package, ignore=ignore)
    for sub in ("kernels", "reference", "bench"):
        shutil.copytree(ROOT / sub, package / sub, ignore=ignore)
    return target


@pytest.mark.parametrize("home_writable", [False, True], ids=["nothing-writable", "home-writable"])
def test_read_only_install_still_runs(tmp_path, home_writable):
    """A read-only package folder: the kernels cache in the user's cache folder, and `attnkit info`
    says so; with HOME read-only too, nothing can be cached and the kernel compiles in memory."""
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux's unshare for a read-only bind mount")
    target = _installed_copy(tmp_path / "site")
    home = tmp_path / "home"
    home.mkdir()
    code = ("import numpy as np, attnkit; from attnkit.info import kernel_cache; q = np.ones((1, 2, 9, 8), np.float32); "
            "out = attnkit.attention(q, q, q, backend='numba'); "
            "assert np.allclose(out, 1); print('ran', kernel_cache())")
    protect_home = "" if home_writable else f"mount --bind {home} {home} && mount -o remount,bind,ro {home} && "
    script = (f"mount --bind {target} {target} && mount -o remount,bind,ro {target} && {protect_home}"
              f"touch {target}/probe 2>/dev/null && echo WRITABLE; "
              f"{sys.executable} -c \"{code}\"")
    env = {**os.environ, "PYTHONPATH": str(target), "HOME": str(home), "XDG_CACHE_HOME": str(home)}
    env.pop("NUMBA_CACHE_DIR", None)
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True,
                            timeout=600, env=env, cwd=tmp_path)
    if "Operation not permitted" in result.stderr and "ran" not in result.stdout:
        pytest.skip(f"mount namespaces are not permitted here: {result.stderr.strip()[:200]}")
    assert "WRITABLE" not in result.stdout
    assert result.returncode == 0 and "ran" in result.stdout, result.stderr[-3000:]
    if home_writable:
        assert "the user's cache folder" in result.stdout and str(home) in result.stdout, result.stdout
        assert list(home.rglob("*.nbi")), "nothing cached in the user's cache folder"
    else:
        assert "nowhere writable" in result.stdout, result.stdout


def test_jit_cache_is_written_and_reused(tmp_path):
    code = """
        import time, numpy as np, attnkit
        q = np.ones((1, 2, 9, 8), np.float32)
        start = time.perf_counter(); attnkit.attention(q, q, q, backend="numba")
        print(time.perf_counter() - start)
    """
    env = {"NUMBA_CACHE_DIR": str(tmp_path)}
    first = _run_python(code, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert list(tmp_path.rglob("*.nbi")), "no cache index written"
    second = _run_python(code, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert float(second.stdout) < float(first.stdout)
    # The first process said it was compiling, one line for the forward kernel; the second loaded and said nothing.
    notices = [line for line in first.stderr.splitlines() if line.startswith("attnkit: compiling")]
    assert notices == [notices[0]] and "compiling the forward kernel for this CPU" in notices[0], first.stderr[-2000:]
    assert "attnkit: compiling" not in second.stderr


def test_warmup_compiles_ahead():
    attnkit.warmup()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts page faults with getrusage (Linux)")
def test_training_loop_reuses_its_memory():
    """The steady state of forward + backward through autograd touches no fresh pages.

    Its results once came from separate allocations that glibc gave back to the
    system after every step: ~20,000 minor page faults over these six steps
    (a third of the N = 1024 backward's time). The allowance, a quarter of the
    results' pages per step, leaves room for what an allocator does once.
    """
    import resource

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 1024, 64, generator=generator).requires_grad_(True) for _ in range(3))
    d_out = torch.randn(1, 8, 1024, 64, generator=generator)

    def step():
        for x in (q, k, v):
            x.grad = None
        attnkit.attention(q, k, v, backend="numba").backward(d_out)

    for _ in range(3):
        step()
    steps = 6
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    result_pages = 4 * q.numel() * q.element_size() // 4096  # out, dq, dk, dv
    assert faults <= steps * result_pages // 4, (
        f"{faults} page faults in {steps} steady-state steps; the results span {result_pages} pages per step"
    )


def _kernel_signatures():
    """{dispatcher name: number of compiled signatures} over attnkit's Numba kernel modules."""
    import importlib
    import pkgutil

    import attnkit.kernels
    import attnkit.kernels.cpu

    counts = {}
    for package in (attnkit.kernels, attnkit.kernels.cpu):
        for info in pkgutil.iter_modules(package.__path__):
            name = f"{package.__name__}.{info.name}"
            if "triton" in info.name:
                continue
            module = importlib.import_module(name)
            for attribute, value in vars(module).items():
                if hasattr(value, "signatures") and hasattr(value, "py_func"):
                    counts[f"{name}.{attribute}"] = len(value.signatures)
    return counts


def test_after_warmup_no_call_of_the_prepared_dtypes_compiles(monkeypatch):
    """warmup(float32) compiles what float32 calls run: afterwards small, large, causal, masked, windowed,
    ALiBi, softcapped, packed, dropout, sinks, decode and backward calls add no dispatcher signature,
    on all threads or (a busy machine, a forked child) on one."""
    from attnkit.kernels import numba_attention

    import numba

    monkeypatch.setattr(numba_attention, "worker_count", numba.get_num_threads)  # however busy the machine
    attnkit.warmup(["float32"])
    before = _kernel_signatures()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 300, 32, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.rand(2, 1, 300, 300, generator=g) > 0.2
    calls = [
        dict(), dict(causal=True), dict(mask=mask), dict(window=(30, 0), softcap=5.0),
        dict(alibi_slopes=torch.rand(4)), dict(dropout_p=0.1), dict(sinks=torch.randn(4)),
    ]  # fmt: skip
    for options in calls:
        attnkit.attention(q, k, v, **options).sum().backward()
    small = attnkit.attention(*(x[:1, :2, :8, :16] for x in (q, k, v)))
    decode = attnkit.attention(q[:, :, -1:].detach(), k[:, :2].detach(), v[:, :2].detach())
    long_k, long_v = (torch.randn(1, 2, 2048, 32, generator=g) for _ in range(2))  # the parallel decode kernel
    attnkit.attention(q[:1, :, -1:].detach(), long_k, long_v)
    packed = attnkit.varlen_attention(q[0], k[0], v[0], torch.tensor([0, 100, 300]), torch.tensor([0, 120, 300]),
                                      causal=True)  # fmt: skip
    packed.sum().backward()
    assert small.shape == (1, 2, 8, 16) and decode.shape == (2, 4, 1, 32)
    monkeypatch.setattr(numba_attention, "worker_count", lambda: 1)
    with numba_attention.recording() as launches:
        attnkit.attention(q, k, v, causal=True).sum().backward()
        attnkit.attention(q[:, :, -1:].detach(), k[:, :2].detach(), v[:, :2].detach())
    assert [launch.worker for launch in launches] == ["forward_serial", "backward_serial", "decode_serial"]
    after = _kernel_signatures()
    grown = {name: (before.get(name, 0), count) for name, count in after.items() if count != before.get(name, 0)}
    assert not grown, f"compiled after warmup: {grown}"
