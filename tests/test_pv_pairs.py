"""Decode's bf16 P V on the pair product (kernels/pv_pairs.py) against NumPy: four rows' weights,
rounded to bf16, times two keys' V rows a step; C-contiguous caches and flash-attn's (B, N, Hkv, D)
layout read in place; even and odd key counts; columns beyond the whole blocks left alone."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from attnkit.kernels.bf16 import bf16_bits, bf16_to_float32
from attnkit.kernels.key_dots import PAIRS
from attnkit.kernels.pv_pairs import PV_PAIR_COLUMNS, PV_ROWS, pair_columns, pv_pairs_block
from attnkit.testing import assert_close


@njit(cache=False)
def _block(v, b, h, j, bk, p, r, acc, dv):
    return pv_pairs_block(v, b, h, j, bk, p, r, acc, dv, 4)


@njit(cache=False)
def _one_row(v, b, h, j, bk, p, r, acc, dv):
    return pv_pairs_block(v, b, h, j, bk, p, r, acc, dv, 1)


_SHAPES = {"4-rows": (_block, PV_ROWS), "1-row": (_one_row, 1)}  # (function, rows)


def _cache(rng, batch, heads, keys, d, flash_layout, dtype=np.uint16):
    """(kernel array, its float64 values): bf16 bits (or float32) in (B, Hkv, N, D), or in flash-attn's
    (B, N, Hkv, D) seen as such."""
    shape = (batch, keys, heads, d) if flash_layout else (batch, heads, keys, d)
    values = rng.standard_normal(shape)
    array = bf16_bits(values) if dtype == np.uint16 else values.astype(dtype)
    exact = (bf16_to_float32(array) if dtype == np.uint16 else array).astype(np.float64)
    if flash_layout:
        array, exact = array.transpose(0, 2, 1, 3), exact.transpose(0, 2, 1, 3)
    return array, exact


def _rounded(p):
    """p (float32) to the nearest bf16, ties to even, as float64: what the block multiplies by."""
    return bf16_to_float32(bf16_bits(p)).astype(np.float64)


@pytest.mark.skipif(PAIRS is None, reason="no bf16 pair product on this CPU target (tests/test_targets.py builds it)")
@pytest.mark.parametrize("shape", list(_SHAPES))
@pytest.mark.parametrize("flash_layout", [False, True], ids=["bhnd", "flash-layout"])
@pytest.mark.parametrize("bk", [1, 2, 7, 64, 511], ids=lambda n: f"{n}keys")
@pytest.mark.parametrize("blocks,extra", [(1, 0), (2, 0), (2, 24), (0, 40)], ids=["1block", "2blocks", "2blocks+24",
                                                                                 "under-a-block"])
def test_pv_pairs_block_matches_numpy(blocks, extra, bk, flash_layout, shape):
    """acc[r + i, :blocks x pair_columns(rows)] gains round_bf16(p[r + i, :bk]) @ v[b, h, j : j + bk] for
    the block's rows (four, or MHA's one); its other rows and columns, and the columns past the whole
    blocks, keep their values; the return value is the first column left."""
    block, rows = _SHAPES[shape]
    dv = blocks * pair_columns(rows) + extra
    rng = np.random.default_rng(bk + 1000 * blocks + 7 * extra + flash_layout + 10000 * rows)
    v, v_exact = _cache(rng, 2, 3, 600, dv, flash_layout)
    for b, h, j, r in [(0, 0, 0, 0), (1, 2, 600 - bk, 3), (1, 1, 13, 1)]:
        # softmax weights: positive, most below 1, padded rows as the decode worker's score buffer has
        p = rng.random((rows + r + 2, bk + 5)).astype(np.float32) ** 3
        acc = rng.standard_normal((rows + r + 2, dv)).astype(np.float32)
        before = acc.copy()
        done = block(v, b, h, j, bk, p, r, acc, dv)
        assert done == blocks * pair_columns(rows)
        expected = before.astype(np.float64)
        expected[r : r + rows, :done] += _rounded(p[r : r + rows, :bk]) @ v_exact[b, h, j : j + bk, :done]
        # float32 sums of bk exact products: a few ulps of the sums' size
        assert_close(acc, expected, atol=2e-6 * (bk + 1), rtol=1e-5,
                     name=f"acc (b={b}, h={h}, j={j}, r={r}, bk={bk}, dv={dv})")  # fmt: skip


@pytest.mark.skipif(PAIRS is None, reason="no bf16 pair product on this CPU target")
def test_pv_pairs_rounds_the_weights_to_nearest_even():
    """The weights are rounded to bf16 to nearest, ties to even: 1 + 2^-8 (a tie) goes down to 1,
    1 + 3 * 2^-8 (a tie) up to 1 + 2^-6, 1 + 2^-7 + 2^-9 to 1 + 2^-7 (nearest); a V of ones shows them."""
    rng = np.random.default_rng(5)
    v, _ = _cache(rng, 1, 1, 4, PV_PAIR_COLUMNS, False)
    v[...] = bf16_bits(np.ones_like(v, dtype=np.float64))
    weights = [1 + 2.0**-8, 1 + 3 * 2.0**-8, 1 + 2.0**-7 + 2.0**-9, 0.5]
    p = np.zeros((PV_ROWS, 4), np.float32)
    p[:, :] = np.array(weights, np.float32)[:, None] * np.eye(4, dtype=np.float32)  # row i: weight i on key i
    acc = np.zeros((PV_ROWS, PV_PAIR_COLUMNS), np.float32)
    _block(v, 0, 0, 0, 4, p, 0, acc, PV_PAIR_COLUMNS)
    np.testing.assert_array_equal(acc[:, 0], np.array([1.0, 1 + 2.0**-6, 1 + 2.0**-7, 0.5], np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_pv_pairs_block_does_nothing_off_bf16_caches(dtype):
    """A float V (or a target without a pair product) leaves everything to the caller: 0 columns done."""
    rng = np.random.default_rng(3)
    v, _ = _cache(rng, 1, 2, 16, PV_PAIR_COLUMNS, False, dtype)
    p = rng.random((PV_ROWS, 16)).astype(np.float32)
    acc = rng.standard_normal((PV_ROWS, PV_PAIR_COLUMNS)).astype(np.float32)
    before = acc.copy()
    assert _block(v, 0, 1, 0, 16, p, 0, acc, PV_PAIR_COLUMNS) == 0
    assert _one_row(v, 0, 1, 0, 16, p, 0, acc, PV_PAIR_COLUMNS) == 0
    np.testing.assert_array_equal(acc, before)
