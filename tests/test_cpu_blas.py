"""attnkit.kernels.cpu_blas: the BLAS binding the Numba kernel's tile products go through."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from attnkit.kernels import cpu_blas

# (M, K, N): a tile shape, odd shapes, a vector on each side, an empty product.
SHAPES = [(128, 64, 512), (37, 59, 129), (1, 64, 300), (300, 64, 1), (5, 1, 7), (9, 0, 4)]


def _operand(x, layout):
    """x as the kernel passes it: 'rows' contiguous, or 'cols' (a transposed view)."""
    return np.ascontiguousarray(x) if layout == "rows" else np.ascontiguousarray(x.T).T


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("a_layout", ["rows", "cols"])
@pytest.mark.parametrize("b_layout", ["rows", "cols"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-K{}-N{}".format(*s))
def test_matmul_matches_float64_numpy(shape, a_layout, b_layout, dtype):
    rng = np.random.default_rng()
    m, k, n = shape
    a = _operand(rng.standard_normal((m, k)).astype(dtype), a_layout)
    b = _operand(rng.standard_normal((k, n)).astype(dtype), b_layout)
    c = rng.standard_normal((m, n)).astype(dtype)
    expected = 0.5 * (a.astype(np.float64) @ b.astype(np.float64)) + 2.0 * c.astype(np.float64)
    cpu_blas.matmul(a, b, c, dtype(0.5), dtype(2.0))
    # float32: K products, each rounded; a few ulps of the largest partial sum.
    tolerance = (1e-5 if dtype == np.float32 else 1e-13) * max(1, k)
    error = np.abs(c - expected).max(initial=0.0)
    assert error <= tolerance, f"max |error| {error:.3g} > {tolerance:.3g} for {shape} {a_layout}/{b_layout}"


def test_matmul_writes_into_a_row_slice_of_a_larger_array():
    # The kernel accumulates into dk_partial[b, slot, j0:j1] and acc[:bq]: row slices.
    rng = np.random.default_rng()
    big = rng.standard_normal((50, 16)).astype(np.float32)
    before = big.copy()
    a, b = rng.standard_normal((7, 3)).astype(np.float32), rng.standard_normal((3, 16)).astype(np.float32)
    cpu_blas.matmul(a, b, big[10:17], np.float32(1), np.float32(1))
    np.testing.assert_allclose(big[10:17], before[10:17] + a @ b, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.delete(big, range(10, 17), axis=0), np.delete(before, range(10, 17), axis=0))


def test_matmul_rejects_operands_without_a_unit_stride():
    a = np.ones((8, 8), np.float32)[::2, ::2]
    with pytest.raises(ValueError, match="unit stride"):
        cpu_blas.matmul(a, np.ones((4, 3), np.float32), np.zeros((4, 3), np.float32), np.float32(1), np.float32(0))


def test_thread_setting_is_per_call_and_restored():
    previous = cpu_blas.set_threads_local(1)
    assert cpu_blas.set_threads_local(previous) == (1 if cpu_blas.BLAS_NAME == "mkl" else 0)


def _run(code, **env):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600,
        env={**os.environ, **env},
    )  # fmt: skip


def test_openblas_fallback_computes_the_same_attention():
    """ATTNKIT_CPU_BLAS=openblas: the kernel through SciPy's BLAS, forward and backward, vs the reference."""
    result = _run(
        """
        import numpy as np
        from attnkit.kernels import cpu_blas
        from attnkit.kernels.numba_attention import flash_backward, flash_forward
        from attnkit.reference import attention, attention_backward
        assert cpu_blas.BLAS_NAME == "openblas", cpu_blas.BLAS_NAME
        rng = np.random.default_rng()
        q = rng.standard_normal((2, 4, 129, 32))
        k, v = rng.standard_normal((2, 2, 300, 32)), rng.standard_normal((2, 2, 300, 32))
        d_out = rng.standard_normal((2, 4, 129, 32))
        kw = dict(scale=0.2, causal="bottom_right", window=None, softcap=None)
        out, lse = flash_forward(*(x.astype(np.float32) for x in (q, k, v)), None, **kw)
        grads = flash_backward(*(x.astype(np.float32) for x in (q, k, v)), None, out, d_out.astype(np.float32), lse, **kw)
        ref_out, ref_lse = attention(q, k, v, scale=0.2, causal="bottom_right", return_lse=True)
        ref_grads = attention_backward(q, k, v, ref_out, d_out, ref_lse, scale=0.2, causal="bottom_right")
        errors = [abs(out - ref_out).max()] + [abs(g - r).max() for g, r in zip(grads, ref_grads)]
        assert max(errors) < 1e-4, errors
        print("ok", errors)
        """,
        ATTNKIT_CPU_BLAS="openblas",
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_unknown_blas_choice_is_a_clear_error():
    result = _run("import attnkit.kernels.cpu_blas", ATTNKIT_CPU_BLAS="cublas")
    assert result.returncode != 0
    assert "ATTNKIT_CPU_BLAS must be one of auto, mkl, openblas; got 'cublas'" in result.stderr


@pytest.mark.skipif(cpu_blas.BLAS_NAME != "mkl", reason="torch here carries no MKL")
def test_torch_imported_after_the_kernel_still_works():
    """The kernel loads libtorch_cpu through ctypes before torch itself is imported."""
    result = _run(
        """
        import sys, numpy as np
        from attnkit.kernels.numba_attention import flash_forward
        assert "torch" not in sys.modules
        q = np.random.default_rng().standard_normal((1, 2, 70, 16)).astype(np.float32)
        out, _ = flash_forward(q, q, q, None, scale=0.25, causal=None, window=None, softcap=None)
        import torch
        expected = torch.nn.functional.scaled_dot_product_attention(*(torch.from_numpy(q),) * 3, scale=0.25)
        assert torch.allclose(torch.from_numpy(out), expected, atol=1e-5)
        a = torch.randn(300, 300)
        assert torch.allclose(a @ a, (a.double() @ a.double()).float(), atol=1e-3)
        print("ok")
        """
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def _gomp_parallel_bindings(stderr):
    """{library file name: libgomp path} of each GOMP_parallel binding in an LD_DEBUG=bindings report."""
    found = {}
    for line in stderr.splitlines():
        if "`GOMP_parallel'" in line and "binding file" in line:
            source = line.split("binding file ", 1)[1].split(" [", 1)[0]
            target = line.split(" to ", 1)[1].split(" [", 1)[0]
            found[os.path.basename(source)] = target
    return found


@pytest.mark.skipif(cpu_blas.BLAS_NAME != "mkl" or not sys.platform.startswith("linux"),
                    reason="libtorch_cpu is loaded by attnkit only on the MKL path (Linux here)")  # fmt: skip
def test_numba_and_torch_share_one_openmp_runtime_whatever_the_import_order():
    """The kernel's BLAS binding loads libtorch_cpu before torch is imported. Numba's OpenMP layer,
    started next, and torch's ops must then use one libgomp: two runtimes' thread teams spin
    against each other (~4x slower calls on 2 cores, bench/results/busy-machine.md). The dynamic
    linker reports which library each GOMP_parallel reference bound to (glibc's LD_DEBUG)."""
    result = _run(
        """
        import sys
        import attnkit.kernels.cpu_blas
        import numba
        from numba.np.ufunc import parallel
        assert "torch" not in sys.modules
        parallel._launch_threads()
        print("layer", numba.threading_layer())
        import torch
        torch.ones(8) @ torch.ones(8)
        print("ok")
        """,
        LD_DEBUG="bindings", LD_BIND_NOW="1",
    )  # fmt: skip
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
    if "layer omp" not in result.stdout:
        pytest.skip(f"Numba's threading layer here is not OpenMP ({result.stdout.strip()})")
    bindings = _gomp_parallel_bindings(result.stderr)
    numba_side = [path for name, path in bindings.items() if name.startswith("omppool")]
    torch_side = [path for name, path in bindings.items() if name.startswith("libtorch_cpu")]
    if not torch_side:
        pytest.skip("this libtorch_cpu calls no GOMP_parallel (not an OpenMP build)")
    assert numba_side and numba_side[0] == torch_side[0], bindings
