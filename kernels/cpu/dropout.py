"""Attention dropout in the CPU kernel: each tile's keep factors, regenerated from the seed.

The mask is reference/dropout.py's, drawn tile by tile: Philox4x32-10 on the
counter (key // 8, row, head, sequence), one call per eight keys, so nothing of
size N^2 is stored and the backward draws exactly what the forward drew.

A row's calls run as one loop over counters on 32-bit words, which LLVM
vectorises (a counter per lane, each 32 x 32 product widened to 64 bits); each
call's four words are stored in order, and read back as 16-bit halves they are
the row's draws in key order (little-endian: the low half first, as the
reference orders them). On the 2-vCPU Xeon of 2026-12-05, 0.30 ns a weight on
a 512-key row and 0.41 on a 97-key row, against 0.67-0.72 ns for the same loop
in 64-bit words storing each draw on its own (docs/kernel-log.md v40).
"""

from __future__ import annotations

import sys

import numpy as np

from ...reference.dropout import KEYS_PER_CALL, PHILOX_M0, PHILOX_M1, PHILOX_ROUNDS, PHILOX_W0, PHILOX_W1
from ..jit import jit as _jit

if sys.byteorder != "little":  # pragma: no cover - every CPU Numba compiles for is little-endian
    raise ImportError("attnkit's CPU dropout reads 32-bit words as their 16-bit halves, low half first")

# Typed constants: mixing unsigned integers with a Python int would give float64 in Numba.
_M0, _M1 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1)
_W0, _W1 = np.uint32(PHILOX_W0), np.uint32(PHILOX_W1)
_SHIFT32 = np.uint64(32)
# A row's calls are rounded up to a whole number of vector steps (8 counters: 64-bit products in a
# 512-bit register): the calls past the row cost less than a scalar remainder loop (a 97-key row,
# 13 calls: 0.55 -> 0.41 ns a weight; a 512-key row, 65 calls: 0.27 -> 0.30).
_CALLS_PER_STEP = 8

# Layout of the kernels' dropout parameters (uint64): Philox's key words and the drop threshold.
_D_KEY0 = 0
_D_KEY1 = 1
_D_THRESHOLD = 2
_N_DROPOUT = 3


def dropout_parameters(seed, p):
    """The kernels' (3,) uint64 parameters for a seed and probability (zeros: no dropout)."""
    from ...reference.dropout import split_seed, threshold

    params = np.zeros(_N_DROPOUT, np.uint64)
    if seed is not None:
        params[_D_KEY0], params[_D_KEY1] = split_seed(seed)
        params[_D_THRESHOLD] = threshold(p)
    return params


@_jit(inline="always")
def draw_words(block_k):
    """uint32 elements of _dropout_factors' scratch for tiles of up to block_k keys (a bf16 tile can
    start one key early) starting anywhere in a group of eight."""
    groups = (block_k + 1 + 2 * KEYS_PER_CALL - 2) // KEYS_PER_CALL
    return 4 * _CALLS_PER_STEP * -(-groups // _CALLS_PER_STEP)


@_jit(inline="always")
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 words (reference.dropout.philox4x32, one counter). Only the products
    are 64-bit; every result is cast back to uint32, since Numba widens arithmetic on 32-bit integers
    to 64 bits (the words would then carry high bits, and the loop would not vectorise as well)."""
    for _ in range(PHILOX_ROUNDS):
        product0 = _M0 * np.uint64(c0)
        product1 = _M1 * np.uint64(c2)
        c0, c1, c2, c3 = (
            np.uint32(np.uint32(product1 >> _SHIFT32) ^ c1 ^ k0), np.uint32(product1),
            np.uint32(np.uint32(product0 >> _SHIFT32) ^ c3 ^ k1), np.uint32(product0),
        )  # fmt: skip
        k0 = np.uint32(k0 + _W0)
        k1 = np.uint32(k1 + _W1)
    return c0, c1, c2, c3


@_jit()
def _dropout_factors(factors, words, params, keep, zero, i0, j0, h, seg):
    """factors (Bq, Bk) = keep where weight (seg, h, i0 + r, j0 + c) is kept, else zero.

    words: uint32 scratch, at least draw_words(Bk) elements: one row's Philox words, four per call.
    """
    n_rows, n_cols = factors.shape
    k0, k1, limit = np.uint32(params[_D_KEY0]), np.uint32(params[_D_KEY1]), np.int64(params[_D_THRESHOLD])
    head, sequence = np.uint32(h), np.uint32(seg)
    first_group = j0 // KEYS_PER_CALL
    skip = j0 - first_group * KEYS_PER_CALL  # keys of the first group before j0
    n_groups = (skip + n_cols + KEYS_PER_CALL - 1) // KEYS_PER_CALL
    n_groups = -(-n_groups // _CALLS_PER_STEP) * _CALLS_PER_STEP  # whole vector steps: no scalar remainder
    if words.shape[0] < 4 * n_groups:
        raise ValueError("_dropout_factors: words must hold a row's Philox words")
    draws = words.view(np.uint16)  # draw j of the row (from the first group's first key) is draws[j]
    for r in range(n_rows):
        row = np.uint32(i0 + r)
        for g in range(n_groups):
            w0, w1, w2, w3 = _philox(np.uint32(first_group + g), row, head, sequence, k0, k1)
            words[4 * g] = w0
            words[4 * g + 1] = w1
            words[4 * g + 2] = w2
            words[4 * g + 3] = w3
        for c in range(n_cols):
            factors[r, c] = keep if np.int64(draws[skip + c]) >= limit else zero
