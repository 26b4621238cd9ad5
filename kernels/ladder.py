"""The optimisation ladder: one attention forward, made faster one idea at a time.

Each rung computes softmax(q k^T * scale) v for q, k, v of shape (B, H, N, D)
(non-causal, no mask, float32) and differs from the rung below in one idea:

    1. python_loops       every multiply a Python statement (reference.naive_attention)
    2. numpy_vectorised   whole-matrix NumPy: fast BLAS, but the (N, N) scores live in memory
    3. numba_rows         compiled, one query row at a time, online softmax: memory O(N),
                          but every score is a scalar dot product and a libm exp
    4. numba_tiles        query-block x key-block tiles through the BLAS (np.dot into
                          preallocated buffers): arithmetic intensity of a matrix product
    5. numba_tiles_exp2   the same tiles with a vectorisable polynomial exp2 instead of libm exp
    6. vector_softmax     the production kernel on one thread with its products still on the
                          BLAS: tiles of 128 x 512, row max and exp2 as explicit 16-wide
                          vector code, scale folded into exp2, no rescale when the max holds
    7. microkernel        the same with attnkit's AVX-512 FMA micro-kernel for the products
                          instead of the BLAS (kernels/microkernels.py)
    8. threads            every core: the production kernel as attnkit runs it
    9. bf16_products      bf16 inputs on the bf16 path (AMX tiles or VDPBF16PS), float32 accumulation
                          (needs avx512_bf16; AMX tiles would be the next rung, on CPUs that have them)
   10. triton             the fused GPU kernel (only with a CUDA device)

Rungs 1-7 run on one thread (the BLAS pinned to one thread too), so each step
measures one idea; rung 8 adds the threads, rung 9 the lower precision.
bench/ladder.py times them on one input and docs/ladder.md explains the figures.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ..reference import attention as numpy_attention
from ..reference import naive_attention
from .cpu.constants import _FASTMATH  # the flags without 'nnan'/'ninf': -inf stays comparable


BLOCK_Q, BLOCK_K = 64, 256


def python_loops(q, k, v):
    return naive_attention(q, k, v)


def numpy_vectorised(q, k, v):
    return numpy_attention(q, k, v)


@njit(cache=True, fastmath=_FASTMATH)
def _rows(q, k, v, scale):
    batch, heads, n, d = q.shape
    nk, dv = k.shape[2], v.shape[3]
    out = np.zeros((batch, heads, n, dv), q.dtype)
    acc = np.zeros(dv, np.float32)  # (Dv,) running weighted sum of values
    for b in range(batch):
        for h in range(heads):
            for i in range(n):
                running_max, running_sum = -np.inf, 0.0
                acc[:] = 0.0
                for j in range(nk):
                    s = 0.0
                    for c in range(d):
                        s += q[b, h, i, c] * k[b, h, j, c]
                    s *= scale
                    if s > running_max:  # rescale what was summed under the old max
                        correction = math.exp(running_max - s)
                        running_sum *= correction
                        acc *= correction
                        running_max = s
                    p = math.exp(s - running_max)
                    running_sum += p
                    acc += p * v[b, h, j]
                out[b, h, i] = acc / running_sum
    return out


def numba_rows(q, k, v):
    return _rows(q, k, v, np.float32(1.0 / math.sqrt(q.shape[-1])))


@njit(cache=True, fastmath=_FASTMATH)
def _exp2_inplace(x, bits):
    """x[c] = 2**x[c] for a float32 row with x <= 0; bits is int32 scratch of x's length.

    2**x = 2**n * 2**f with n the nearest integer and f in [-0.5, 0.5]: 2**f is a
    degree-6 polynomial, 2**n is the float whose exponent field is n + 127. Both
    loops are branch-free arithmetic that LLVM turns into SIMD, unlike a call to
    libm's exp per element. Relative error ~2e-7; x <= -127 (and -inf) gives 0.
    """
    two_to_n = bits.view(np.float32)  # the same memory, read as floats
    for c in range(x.shape[0]):
        xc = max(x[c], np.float32(-127.0))
        n = np.floor(xc + np.float32(0.5))
        f = xc - n
        x[c] = np.float32(1.0) + f * (np.float32(0.6931472) + f * (np.float32(0.2402265) + f * (
            np.float32(0.05550411) + f * (np.float32(0.009618129) + f * (
                np.float32(0.001333355) + f * np.float32(0.0001540353))))))
        bits[c] = np.int32(n + np.float32(127.0)) << 23  # n = -127 gives bits 0, the float 0.0
    for c in range(x.shape[0]):
        x[c] *= two_to_n[c]


@njit(cache=True, fastmath=_FASTMATH)
def _tiles(q, k, v, scale, fast_exp):
    batch, heads, n, d = q.shape
    nk, dv = k.shape[2], v.shape[3]
    out = np.empty((batch, heads, n, dv), q.dtype)
    scores = np.empty(BLOCK_Q * BLOCK_K, np.float32)  # one tile of q k^T, reshaped per tile
    pv = np.empty((BLOCK_Q, dv), np.float32)  # one tile of p v
    acc = np.empty((BLOCK_Q, dv), np.float32)
    row_max = np.empty(BLOCK_Q, np.float32)
    row_sum = np.empty(BLOCK_Q, np.float32)
    bits = np.empty(BLOCK_K, np.int32)  # scratch for the exp2 bit trick
    log2e = np.float32(1.0 / math.log(2.0))
    for b in range(batch):
        for h in range(heads):
            for i0 in range(0, n, BLOCK_Q):
                bq = min(BLOCK_Q, n - i0)
                q_blk = q[b, h, i0:i0 + bq]  # (bq, D), C-contiguous for the BLAS
                acc[:bq] = 0.0
                row_max[:bq] = -np.inf
                row_sum[:bq] = 0.0
                for j0 in range(0, nk, BLOCK_K):
                    bk = min(BLOCK_K, nk - j0)
                    s = scores[:bq * bk].reshape((bq, bk))  # C-contiguous, as np.dot's out must be
                    np.dot(q_blk, k[b, h, j0:j0 + bk].T, s)  # (bq, bk) through the BLAS
                    for r in range(bq):
                        new_max = max(row_max[r], s[r].max() * scale)
                        correction = math.exp(row_max[r] - new_max)
                        row_sum[r] *= correction
                        acc[r] *= correction
                        row_max[r] = new_max
                        if fast_exp:
                            for c in range(bk):
                                s[r, c] = (s[r, c] * scale - new_max) * log2e
                            _exp2_inplace(s[r], bits[:bk])
                        else:
                            for c in range(bk):
                                s[r, c] = math.exp(s[r, c] * scale - new_max)
                        row_sum[r] += s[r].sum()
                    np.dot(s, v[b, h, j0:j0 + bk], pv[:bq])  # (bq, Dv) through the BLAS
                    acc[:bq] += pv[:bq]
                for r in range(bq):
                    out[b, h, i0 + r] = acc[r] / row_sum[r]
    return out


def _one_blas_thread(fn, *args):
    """Run fn with the BLAS on one thread, so the single-threaded rungs stay single-threaded
    (the production kernel pins it per worker itself)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return fn(*args)


def numba_tiles(q, k, v):
    return _one_blas_thread(_tiles, q, k, v, np.float32(1.0 / math.sqrt(q.shape[-1])), False)


def numba_tiles_exp2(q, k, v):
    return _one_blas_thread(_tiles, q, k, v, np.float32(1.0 / math.sqrt(q.shape[-1])), True)


def _production(q, k, v, *, threads=None, f32_products=None):
    """kernels/numba_attention.flash_forward on `threads` threads (default: all) and products."""
    import numba

    from .numba_attention import flash_forward

    previous = numba.get_num_threads()
    numba.set_num_threads(threads or previous)
    try:
        out, _ = _one_blas_thread(
            lambda: flash_forward(q, k, v, None, scale=1.0 / math.sqrt(q.shape[-1]), causal=None, window=None,
                                  softcap=None, f32_products=f32_products))
    finally:
        numba.set_num_threads(previous)
    return out


def vector_softmax(q, k, v):
    return _production(q, k, v, threads=1, f32_products="blas")


def microkernel(q, k, v):
    return _production(q, k, v, threads=1, f32_products="fma")


def threads(q, k, v):
    return _production(q, k, v)


def bf16_products(q, k, v):
    """The production kernel on q, k, v rounded to bf16 (their bits in, float32 out)."""
    from .microkernels import bf16_bits, bf16_to_float32
    from .numba_attention import flash_forward

    out, _ = flash_forward(*(bf16_bits(x) for x in (q, k, v)), None, scale=1.0 / math.sqrt(q.shape[-1]),
                           causal=None, window=None, softcap=None)
    return bf16_to_float32(out)


def bf16_unavailable():
    """Why the bf16 rung cannot run here, or None (it runs wherever bf16 stays bf16: VDPBF16PS or widened)."""
    from .microkernels import BF16_DETAIL, BF16_PRODUCTS

    return None if BF16_PRODUCTS != "fp32" else BF16_DETAIL


def triton(q, k, v):
    """The Triton kernel on the GPU; inputs are copied to the device outside the timing."""
    import torch

    from .triton_attention import flash_forward

    out, _ = flash_forward(q, k, v, None, scale=1.0 / math.sqrt(q.shape[-1]), causal=None,
                           window=None, softcap=None)
    torch.cuda.synchronize()
    return out


# (name, function, what the step adds), bottom rung first.
RUNGS = (
    ("python_loops", python_loops, "the mathematics, one scalar at a time"),
    ("numpy_vectorised", numpy_vectorised, "whole-array operations and the BLAS; N x N scores in memory"),
    ("numba_rows", numba_rows, "compiled loops and the online softmax: O(N) memory"),
    ("numba_tiles", numba_tiles, "tiles through the BLAS: each loaded value used many times"),
    ("numba_tiles_exp2", numba_tiles_exp2, "a vectorised exp2 instead of one libm call per score"),
    ("vector_softmax", vector_softmax, "bigger tiles, explicit vector max/exp2, scale folded in (BLAS products)"),
    ("microkernel", microkernel, "attnkit's AVX-512 FMA micro-kernel instead of the BLAS"),
    ("threads", threads, "every core (the production kernel)"),
    ("bf16_products", bf16_products, "bf16 inputs on the bf16 path: AMX tiles or VDPBF16PS (float32 accumulation)"),
    ("triton", triton, "the fused GPU kernel"),
)


# Rungs that compute in lower precision, and their tolerance against float64
# (the float32 rungs are held to the runner's and the tests' tighter one).
TOLERANCES = {"bf16_products": 5e-2}
