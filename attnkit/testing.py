"""Helpers for testing attention implementations against each other.

Public so that kernel authors (and attnkit's own tests) compare results the
same way: a failure says which element, by how much, and what was allowed.
"""

from __future__ import annotations

import numpy as np

from . import _arrays


def _as_float64(x):
    return np.asarray(_arrays.to_numpy(x), dtype=np.float64)


def assert_close(actual, expected, *, atol, rtol=0.0, name="result"):
    """Assert |actual - expected| <= atol + rtol * |expected| everywhere.

    Shapes must match; NaN must sit in the same places on both sides and
    infinities must be equal. The message names the worst element.
    """
    a, e = _as_float64(actual), _as_float64(expected)
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {a.shape}, expected {e.shape}")
    nan_a, nan_e = np.isnan(a), np.isnan(e)
    if (nan_a != nan_e).any():
        where = tuple(int(i) for i in np.argwhere(nan_a != nan_e)[0])
        raise AssertionError(
            f"{name}: NaN mismatch at {where}: got {a[where]}, expected {e[where]} "
            f"({int((nan_a != nan_e).sum())} places)"
        )
    inf = np.isinf(a) | np.isinf(e)
    if (a[inf] != e[inf]).any():
        where = tuple(int(i) for i in np.argwhere(inf & (a != e))[0])
        raise AssertionError(f"{name}: at {where} got {a[where]}, expected {e[where]}")
    finite = ~(nan_a | inf)
    err = np.zeros(a.shape)
    err[finite] = np.abs(a[finite] - e[finite])
    allowed = atol + rtol * np.abs(np.where(finite, e, 0.0))
    bad = err > allowed
    if bad.any():
        worst = np.unravel_index(np.argmax(err - allowed), err.shape)
        worst = tuple(int(i) for i in worst)
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {a.size} elements differ; worst at {worst}: "
            f"got {a[worst]!r}, expected {e[worst]!r}, error {err[worst]:.3g} > allowed "
            f"{allowed[worst]:.3g} (atol={atol}, rtol={rtol}); max error {err.max():.3g}"
        )


def max_error(actual, expected):
    """Largest |actual - expected| over finite entries (0.0 for empty arrays)."""
    a, e = _as_float64(actual), _as_float64(expected)
    finite = np.isfinite(a) & np.isfinite(e)
    return float(np.abs(a - e)[finite].max()) if finite.any() else 0.0
