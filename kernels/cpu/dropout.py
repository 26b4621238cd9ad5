"""Attention dropout in the CPU kernel: each tile's keep factors, regenerated from the seed.

The mask is reference/dropout.py's, drawn tile by tile: Philox4x32-10 on the
counter (key // 8, row, head, sequence), one call per eight keys, so nothing of
size N^2 is stored and the backward draws exactly what the forward drew.
"""

from __future__ import annotations

import numpy as np

from ...reference.dropout import KEYS_PER_CALL, PHILOX_M0, PHILOX_M1, PHILOX_ROUNDS, PHILOX_W0, PHILOX_W1
from ..jit import jit as _jit

# uint64 constants: mixing uint64 with a Python int would give float64 in Numba.
_M0, _M1 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1)
_W0, _W1 = np.uint64(PHILOX_W0), np.uint64(PHILOX_W1)
_LOW32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
_LOW16 = np.uint64(0xFFFF)
_SHIFT16 = np.uint64(16)

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
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint64-held 32-bit words (reference.dropout.philox4x32, one counter)."""
    for _ in range(PHILOX_ROUNDS):
        product0 = _M0 * c0
        product1 = _M1 * c2
        c0, c1, c2, c3 = (
            (product1 >> _SHIFT32) ^ c1 ^ k0, product1 & _LOW32, (product0 >> _SHIFT32) ^ c3 ^ k1, product0 & _LOW32,
        )  # fmt: skip
        k0 = (k0 + _W0) & _LOW32
        k1 = (k1 + _W1) & _LOW32
    return c0, c1, c2, c3


@_jit()
def _dropout_factors(factors, draws, params, keep, zero, i0, j0, h, seg):
    """factors (Bq, Bk) = keep where weight (seg, h, i0 + r, j0 + c) is kept, else zero.

    draws is scratch for one row's 16-bit draws: at least Bk + 16 uint64.
    """
    n_rows, n_cols = factors.shape
    k0, k1, limit = params[_D_KEY0], params[_D_KEY1], params[_D_THRESHOLD]
    head, sequence = np.uint64(h), np.uint64(seg)
    first_group = j0 // KEYS_PER_CALL
    skip = j0 - first_group * KEYS_PER_CALL  # keys of the first group before j0
    n_groups = (skip + n_cols + KEYS_PER_CALL - 1) // KEYS_PER_CALL
    for r in range(n_rows):
        row = np.uint64(i0 + r)
        for g in range(n_groups):
            w0, w1, w2, w3 = _philox(np.uint64(first_group + g), row, head, sequence, k0, k1)
            draws[8 * g] = w0 & _LOW16
            draws[8 * g + 1] = w0 >> _SHIFT16
            draws[8 * g + 2] = w1 & _LOW16
            draws[8 * g + 3] = w1 >> _SHIFT16
            draws[8 * g + 4] = w2 & _LOW16
            draws[8 * g + 5] = w2 >> _SHIFT16
            draws[8 * g + 6] = w3 & _LOW16
            draws[8 * g + 7] = w3 >> _SHIFT16
        out = factors[r]
        for c in range(n_cols):
            out[c] = keep if draws[skip + c] >= limit else zero
