"""attnkit.kernels.simd: the hand-vectorised row max and exp2 of the Numba kernel's softmax."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from attnkit.kernels import simd

# Lengths around the vector widths (16 float32 / 8 float64 lanes) and a tile row.
LENGTHS = [0, 1, 7, 8, 9, 15, 16, 17, 33, 512, 1000]
DTYPES = [np.float32, np.float64]
# Relative error of 2**x against float64 numpy, on top of the rounding of x
# itself (|x| ulp ln2); the polynomial is below float32 / at float64 rounding.
EXP2_RTOL = {np.float32: 4e-7, np.float64: 4e-15}


def _row(rng, n, dtype, specials=True):
    row = (rng.standard_normal(n) * 6).astype(dtype)
    if specials and n >= 4:
        row[rng.integers(n)] = -np.inf
        row[rng.integers(n)] = np.nan
    return row


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("n", LENGTHS, ids=lambda n: f"N{n}")
def test_row_max_ignores_nan_and_keeps_the_initial_value(n, dtype):
    rng = np.random.default_rng()
    row = _row(rng, n, dtype)
    finite = row[~np.isnan(row)]
    for initial in (-np.inf, 0.5, 100.0):
        expected = max([initial, *finite.tolist()])
        got = simd.row_max(row, dtype(initial))
        assert got == expected, f"row_max {got} != {expected} (n={n}, initial={initial})"


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_row_max_of_special_rows(dtype):
    assert simd.row_max(np.full(20, -np.inf, dtype), dtype(-np.inf)) == -np.inf
    assert simd.row_max(np.full(20, np.nan, dtype), dtype(-np.inf)) == -np.inf
    assert simd.row_max(np.array([np.inf, 1.0], dtype), dtype(-np.inf)) == np.inf


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("n", LENGTHS, ids=lambda n: f"N{n}")
def test_exp2_affine_matches_numpy(n, dtype):
    """As the kernel calls it: shift = the row's max times the multiplier, so x <= 0."""
    rng = np.random.default_rng()
    row = _row(rng, n, dtype)
    multiplier = dtype(rng.uniform(0.05, 0.5))
    finite = row[np.isfinite(row)]
    shift = dtype(finite.max() * multiplier) if finite.size else dtype(0)
    x = row.astype(np.float64) * np.float64(multiplier) - np.float64(shift)
    expected = np.exp2(x)

    result = row.copy()
    total = simd.exp2_affine(result, multiplier, shift)

    nan = np.isnan(x)
    assert np.all(np.isnan(result[nan])), "NaN in must stay NaN"
    assert np.all(result[np.isneginf(row)] == 0), "-inf must give exactly 0"
    ok = ~nan
    # x is formed in the row's dtype (one fused multiply-add), so its rounding counts too.
    rounding = np.abs(x[ok]) * np.finfo(dtype).eps * np.log(2)
    error = np.abs(result[ok] - expected[ok]) / np.maximum(expected[ok], np.finfo(dtype).tiny)
    allowed = EXP2_RTOL[dtype] + rounding
    worst = int(np.argmax(error - allowed)) if error.size else 0
    assert np.all(error <= allowed), f"x={x[ok][worst]!r}: relative error {error[worst]:.3g} > {allowed[worst]:.3g}"
    if not nan.any():
        assert total == pytest.approx(result.sum(dtype=np.float64), rel=1e-6 if dtype == np.float32 else 1e-13)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_exp2_affine_underflows_to_exact_zero(dtype):
    """Below simd.FLUSH_BELOW (-64 for float32: a weight of 2^-64 of its row's largest changes no
    float32 sum) exp2 gives exactly 0, so no weight comes near the subnormals, which slow FMAs down."""
    floor = simd.FLUSH_BELOW[np.dtype(dtype)]
    assert floor == (-64 if dtype == np.float32 else -512)
    x = np.array([-np.inf, -1e30, floor - 50, floor - 0.5, floor, floor + 1, -1, 0, 0.25] * 3, dtype)
    result = x.copy()
    simd.exp2_affine(result, dtype(1), dtype(0))
    below = x < floor
    assert np.all(result[below] == 0)
    np.testing.assert_allclose(result[~below], np.exp2(x[~below].astype(np.float64)), rtol=EXP2_RTOL[dtype])


def test_exp2_affine_is_deterministic():
    row = _row(np.random.default_rng(), 1000, np.float32, specials=False)
    first, second = row.copy(), row.copy()
    total_first = simd.exp2_affine(first, np.float32(0.3), np.float32(row.max() * np.float32(0.3)))
    total_second = simd.exp2_affine(second, np.float32(0.3), np.float32(row.max() * np.float32(0.3)))
    assert first.tobytes() == second.tobytes() and total_first == total_second


@pytest.mark.parametrize("n", [1, 7, 16, 17, 33, 512, 1000], ids=lambda n: f"N{n}")
def test_exp2_affine_bits_also_writes_the_row_rounded_to_bf16(n):
    """The fused pass (a bf16 tile's P V operand made in the softmax's pass): the same float row and
    sum as exp2_affine_at, and bits[r, :n] equal to the float row rounded to nearest even bf16;
    other rows and the columns past n untouched."""
    from attnkit.kernels.bf16 import bf16_bits

    rng = np.random.default_rng(n)
    matrix = np.stack([_row(rng, n, np.float32, specials=False) for _ in range(3)])
    matrix[1, rng.integers(n)] = -np.inf  # a masked score: exactly 0, bits 0
    fused, bits = matrix.copy(), np.full((3, n + 3), 12345, np.uint16)
    multiplier, shift = np.float32(0.7), np.float32(2.5)
    total = simd.exp2_affine_at(matrix, 1, multiplier, shift)
    fused_total = simd.exp2_affine_bits_at(fused, 1, multiplier, shift, bits)
    assert fused_total == total and fused.tobytes() == matrix.tobytes()
    assert np.array_equal(bits[1, :n], bf16_bits(matrix[1]))
    assert (bits[0] == 12345).all() and (bits[2] == 12345).all() and (bits[1, n:] == 12345).all()
    with pytest.raises(ValueError, match="hold the row"):
        simd.exp2_affine_bits_at(fused, 1, multiplier, shift, bits[:, : n - 1] if n > 1 else bits[:1, :0])


@pytest.mark.parametrize("dropout", [False, True], ids=["plain", "dropout"])
@pytest.mark.parametrize("n", [1, 7, 16, 17, 33, 512, 1000], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("rows", [1, 2, 5], ids=lambda rows: f"rows{rows}")
def test_gradient_pairs_match_numpy(n, rows, dropout):
    """The backward's fused bf16 pass over a tile: dS = P (dP - delta) scale in float32, then P and dS
    rounded to bf16 into pair-interleaved rows (zeros in an odd last row's partner) and dS into its
    own rows; nothing else written. With dropout's factors Z: dS = P (dP Z - delta) scale, and the P
    stored is P Z."""
    from attnkit.kernels.bf16 import bf16_bits

    rng = np.random.default_rng(n * 10 + rows)
    p = rng.random((rows + 2, n + 5), dtype=np.float32)
    p[0, rng.integers(n)] = 0.0  # a masked score
    dp = rng.standard_normal((rows + 2, n + 5), dtype=np.float32)
    delta = rng.standard_normal(rows + 2).astype(np.float32)
    scale = np.float32(0.125)
    n_pairs = (rows + 1) // 2
    p_pairs, ds_pairs = (np.full((n_pairs + 1, 2 * n + 3), 777, np.uint16) for _ in range(2))
    ds_rows = np.full((rows + 2, n + 1), 777, np.uint16)
    p_before, dp_before = p.copy(), dp.copy()
    keep = np.where(rng.random((rows + 1, n + 2)) < 0.7, np.float32(1 / 0.7), np.float32(0)) if dropout else None
    simd.gradient_pairs(p, dp, rows, n, delta, scale, p_pairs, ds_pairs, ds_rows, keep)
    assert p.tobytes() == p_before.tobytes() and dp.tobytes() == dp_before.tobytes()
    z = keep[:rows, :n] if dropout else np.float32(1)
    ds = p[:rows, :n] * (dp[:rows, :n] * z - delta[:rows, None]) * scale  # float32 throughout, in the kernels' order
    p_bits, ds_bits = bf16_bits(p[:rows, :n] * z), bf16_bits(ds)
    if rows % 2:  # the last pair's second row is past the tile: zeros
        p_bits, ds_bits = (np.vstack([x, np.zeros((1, n), np.uint16)]) for x in (p_bits, ds_bits))
    for t in range(2):
        assert np.array_equal(p_pairs[:n_pairs, t : 2 * n : 2], p_bits[t::2])
        assert np.array_equal(ds_pairs[:n_pairs, t : 2 * n : 2], ds_bits[t::2])
    assert np.array_equal(ds_rows[:rows, :n], bf16_bits(ds))
    assert (p_pairs[n_pairs:] == 777).all() and (ds_pairs[n_pairs:] == 777).all()
    assert (p_pairs[:, 2 * n :] == 777).all() and (ds_pairs[:, 2 * n :] == 777).all()
    assert (ds_rows[rows:] == 777).all() and (ds_rows[:, n:] == 777).all()
    with pytest.raises(ValueError, match="hold the tile"):
        simd.gradient_pairs(p, dp, rows, n, delta, scale, p_pairs[:, : 2 * n - 1], ds_pairs, ds_rows)
    with pytest.raises(ValueError, match="hold the tile"):
        simd.gradient_pairs(p, dp, rows + 3, n, delta, scale, p_pairs, ds_pairs, ds_rows)
    with pytest.raises(ValueError, match="contiguous"):
        simd.gradient_pairs(p[:, ::2], dp[:, ::2], rows, 1, delta, scale, p_pairs, ds_pairs, ds_rows)
    if dropout:
        with pytest.raises(ValueError, match="keep must hold the tile"):
            simd.gradient_pairs(p, dp, rows, n, delta, scale, p_pairs, ds_pairs, ds_rows, keep[:, : n - 1])


def test_rows_must_be_contiguous():
    strided = np.zeros(40, np.float32)[::2]
    with pytest.raises(ValueError, match="contiguous"):
        simd.row_max(strided, np.float32(0))
    with pytest.raises(ValueError, match="contiguous"):
        simd.exp2_affine(strided, np.float32(1), np.float32(0))


def test_exact_when_first_compiled_by_a_fastmath_caller(tmp_path):
    """Numba puts a fastmath caller's flags on what it compiles for it.

    The exp2 must not depend on exact float arithmetic (an add-and-subtract
    rounding trick folded to nothing under 'reassoc' and gave 2**x = 2**x rounded
    wrong by up to 41%). A fresh cache directory makes the fastmath kernel the
    first to compile exp2_affine in the child process.
    """
    code = textwrap.dedent(
        """
        import numpy as np
        from numba import njit
        from attnkit.kernels import simd

        @njit(fastmath={"reassoc", "nsz", "arcp", "contract", "afn"})
        def through_fastmath(row, multiplier, shift):
            return simd.exp2_affine(row, multiplier, shift) + simd.row_max(row, shift)

        for dtype in (np.float32, np.float64):
            x = np.linspace(-30, 0, 301).astype(dtype)
            through_fastmath(x.copy(), dtype(1), dtype(0))
            y = x.copy()
            simd.exp2_affine(y, dtype(1), dtype(0))
            error = np.abs(y / np.exp2(x.astype(np.float64)) - 1).max()
            assert error < 1e-6, (dtype, error)
        print("ok")
        """
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
