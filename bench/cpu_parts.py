"""The Numba kernel's parts, timed one at a time on one thread.

    python -m attnkit.bench.cpu_parts [--repeats 7]

- the two tile products of the forward pass (S = Q_blk K_blkᵀ, acc += P V_blk)
  over one head of 2048 keys, through attnkit's BLAS binding (kernels/cpu_blas.py:
  MKL where torch carries it) and through np.dot inside Numba (SciPy's OpenBLAS);
- the same products in bf16 on attnkit's micro-kernel (kernels/bf16.py), where
  the CPU has AVX-512 BF16;
- the softmax row passes of kernels/simd.py over a 128 x 512 tile, in ns per score.

Best of --repeats runs, the two products taking turns (this machine's speed
drifts; the best is the least disturbed). The figures quoted in docs/kernel-log.md and in
bench/results/cpu.md come from this script.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from numba import njit
from threadpoolctl import threadpool_limits

from ..kernels import cpu_blas, simd
from ..kernels import microkernels as bf16

N_KEYS = 2048
BLOCK_Q, BLOCK_K = 128, 512


@njit
def _products_blas(q, k, v, s, acc, repeats):
    previous = cpu_blas.set_threads_local(1)
    one, zero = np.float32(1), np.float32(0)
    for _ in range(repeats):
        for j0 in range(0, k.shape[0], s.shape[1]):
            cpu_blas.matmul(q, k[j0 : j0 + s.shape[1]].T, s, one, zero)
            cpu_blas.matmul(s, v[j0 : j0 + s.shape[1]], acc, one, one)
    cpu_blas.set_threads_local(previous)


@njit
def _products_np_dot(q, k, v, s, pv, repeats):
    for _ in range(repeats):
        for j0 in range(0, k.shape[0], s.shape[1]):
            np.dot(q, k[j0 : j0 + s.shape[1]].T, s)
            np.dot(s, v[j0 : j0 + s.shape[1]], pv)


@njit
def _products_f32_micro(q, k_t, v, s, acc, repeats):
    """The two products on the float32 FMA micro-kernel (K transposed once, as the kernel does)."""
    block_k = s.shape[1]
    for _ in range(repeats):
        for j0 in range(0, v.shape[0], block_k):
            bf16.gemm_f32(q, k_t[:, j0:], s, q.shape[0], block_k, q.shape[1], False)
            bf16.gemm_f32(s, v[j0:], acc, q.shape[0], acc.shape[1], block_k, True)


@njit
def _products_bf16(q, k_packed, v_packed, s, p, acc, repeats):
    """The same two products on the bf16 micro-kernel (q bf16 rows, K and V pair-packed)."""
    d_pairs, block_k = k_packed.shape[0], s.shape[1]
    for _ in range(repeats):
        for j0 in range(0, k_packed.shape[1] // 2 - 16, block_k):
            bf16.gemm(q, k_packed[:, 2 * j0 :], s, q.shape[0], block_k, d_pairs, False)
            bf16.gemm(p, v_packed[j0 // 2 :], acc, q.shape[0], acc.shape[1], block_k // 2, True)


@njit
def _row_max_pass(tile, repeats):
    total = np.float32(0)
    for _ in range(repeats):
        for r in range(tile.shape[0]):
            total += simd.row_max(tile[r], np.float32(-np.inf))
    return total


@njit
def _exp2_pass(tile, repeats):
    total = np.float32(0)
    for _ in range(repeats):
        for r in range(tile.shape[0]):
            total += simd.exp2_affine(tile[r], np.float32(0.18), np.float32(30.0))
    return total


def _best(runs, repeats):
    """Best time of each function in runs, the functions taking turns (so drift hits all alike)."""
    for run in runs:
        run()  # compile / warm up
    best = [float("inf")] * len(runs)
    for _ in range(repeats):
        for i, run in enumerate(runs):
            start = time.perf_counter()
            run()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def _mkl_bf16_gemm_rate(repeats):
    """{"M x N x K": GFLOP/s} of MKL's cblas_gemm_bf16bf16f32 on one thread, or {} without it.

    The product the bf16 issue first proposed; on CPUs where MKL takes its generic
    path it is no faster than sgemm, which is why attnkit has its own micro-kernel.
    """
    import ctypes

    path = cpu_blas._torch_library_path()
    if path is None:
        return {}
    try:
        library = ctypes.CDLL(path)
        gemm, set_threads = library.cblas_gemm_bf16bf16f32, library.mkl_set_num_threads_local
    except (OSError, AttributeError):
        return {}
    c_int, c_float, pointer = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    gemm.argtypes = [c_int] * 6 + [c_float, pointer, c_int, pointer, c_int, c_float, pointer, c_int]
    rng = np.random.default_rng(1)
    rates = {}
    previous = set_threads(ctypes.byref(c_int(1)))
    try:
        for m, n, k, transposed_b in ((128, 512, 64, True), (128, 512, 128, True), (128, 64, 512, False)):
            a = bf16.bf16_bits(rng.standard_normal((m, k)))
            b = bf16.bf16_bits(rng.standard_normal((n, k) if transposed_b else (k, n)))
            c = np.zeros((m, n), np.float32)
            args = (101, 111, 112 if transposed_b else 111, m, n, k, 1.0, a.ctypes.data, k, b.ctypes.data,
                    k if transposed_b else n, 0.0, c.ctypes.data, n)  # row-major, A, B or B^T
            calls = 20
            (elapsed,) = _best([lambda: [gemm(*args) for _ in range(calls)]], repeats)
            rates[f"{m} x {n} x {k}"] = calls * 2 * m * n * k / elapsed / 1e9
    finally:
        set_threads(ctypes.byref(c_int(previous)))
    return rates


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m attnkit.bench.cpu_parts", description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per part; the best is kept (default 7)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1; got {args.repeats}")

    rng = np.random.default_rng(0)
    print(f"tile products, one thread, Q block {BLOCK_Q} x K block {BLOCK_K}, {N_KEYS} keys "
          f"(attnkit's BLAS: {cpu_blas.BLAS_NAME}):")
    with threadpool_limits(limits=1, user_api="blas"):
        for d in (64, 128):
            q = rng.standard_normal((BLOCK_Q, d), dtype=np.float32)
            k, v = (rng.standard_normal((N_KEYS, d), dtype=np.float32) for _ in range(2))
            s = np.empty((BLOCK_Q, BLOCK_K), np.float32)
            acc = np.zeros((BLOCK_Q, d), np.float32)
            calls = 10
            flops = calls * 4 * BLOCK_Q * N_KEYS * d
            times = _best([lambda: _products_blas(q, k, v, s, acc, calls),
                           lambda: _products_np_dot(q, k, v, s, acc, calls)], args.repeats)
            blas, numpy = (flops / t / 1e9 for t in times)
            line = f"  D={d:<4} {cpu_blas.BLAS_NAME} {blas:6.1f} GFLOP/s   np.dot (SciPy's BLAS) {numpy:6.1f} GFLOP/s"
            if bf16.F32_PRODUCTS == "fma":
                k_t = np.zeros((d, N_KEYS + 16), np.float32)
                k_t[:, :N_KEYS] = k.T
                (t32,) = _best([lambda: _products_f32_micro(q, k_t, v, s, acc, calls)], args.repeats)
                line += f"   f32 micro-kernel {flops / t32 / 1e9:6.1f} GFLOP/s"
            if bf16.BF16_PRODUCTS != "fp32":
                q16, p16 = bf16.bf16_bits(q), bf16.bf16_bits(rng.random((BLOCK_Q, BLOCK_K)))
                k_packed = np.zeros((d // 2, 2 * (N_KEYS + 16)), np.uint16)
                v_packed = np.zeros((N_KEYS // 2, 2 * d), np.uint16)
                bf16.pack_pairs(bf16.bf16_bits(k).T, k_packed)
                bf16.pack_pairs(bf16.bf16_bits(v), v_packed)
                (t16,) = _best([lambda: _products_bf16(q16, k_packed, v_packed, s, p16, acc, calls)], args.repeats)
                line += f"   bf16 micro-kernel {flops / t16 / 1e9:6.1f} GFLOP/s"
            print(line)

    tile = (rng.standard_normal((BLOCK_Q, BLOCK_K)) * 3).astype(np.float32)
    passes = 50
    scores = passes * tile.size
    scratch = tile.copy()
    row_max, exp2 = (t / scores * 1e9 for t in _best(
        [lambda: _row_max_pass(tile, passes), lambda: _exp2_pass(scratch, passes)], args.repeats))
    mkl_bf16 = _mkl_bf16_gemm_rate(args.repeats)
    if mkl_bf16:
        print("MKL's own bf16 GEMM (cblas_gemm_bf16bf16f32 in torch's libtorch_cpu), one thread, "
              "the shapes M x N x K of the forward's two products:")
        for shape, rate in mkl_bf16.items():
            print(f"  {shape:<16} {rate:6.1f} GFLOP/s")
    print(f"softmax row passes over a {BLOCK_Q} x {BLOCK_K} tile, one thread:")
    print(f"  row max        {row_max:.3f} ns/score")
    print(f"  exp2 + row sum {exp2:.3f} ns/score")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
