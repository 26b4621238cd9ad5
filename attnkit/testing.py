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


def assert_within_rule(name, actual, expected, plain, factor, *, floor=1e-6):
    """flash-attn's accuracy rule: max |actual - expected| <= factor * max |plain - expected| + floor.

    expected is an exact (float64) reference; plain is a plain implementation
    run in the kernel's own precision on the same inputs, whose error sets the
    budget; factor is 2 for outputs and 3 for gradients in flash-attn's tests.
    Infinities must match (a -inf lse where the reference has one); NaN in
    actual fails. The message names the worst element and the budget.
    """
    a, e, p = _as_float64(actual), _as_float64(expected), _as_float64(plain)
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {a.shape}, expected {e.shape}")
    if np.isnan(a).any():
        raise AssertionError(f"{name}: NaN at {np.argwhere(np.isnan(a))[:5].tolist()}")
    infinite = (np.isinf(a) | np.isinf(e)) & (a != e)
    if infinite.any():
        where = tuple(int(i) for i in np.argwhere(infinite)[0])
        raise AssertionError(f"{name}: at {where} got {a[where]}, expected {e[where]}")
    error, baseline = _finite_errors(a, e), _finite_errors(p, e)
    plain_error = float(baseline.max()) if baseline.size else 0.0
    allowed = factor * plain_error + floor
    if error.size and error.max() > allowed:
        where = tuple(int(i) for i in np.unravel_index(np.argmax(error), error.shape))
        raise AssertionError(
            f"{name}: max error {error.max():.3g} at {where} (got {a[where]:.9g}, reference {e[where]:.9g}); "
            f"allowed {allowed:.3g} = {factor} x {plain_error:.3g} (the plain implementation's error) + {floor:g}"
        )


def _finite_errors(a, e):
    """|a - e| where both are finite, 0 elsewhere (equal infinities are no error)."""
    both = np.isfinite(a) & np.isfinite(e)
    return np.where(both, np.abs(np.where(both, a, 0.0) - np.where(both, e, 0.0)), 0.0)


def max_error(actual, expected):
    """Largest |actual - expected| over finite entries (0.0 for empty arrays)."""
    a, e = _as_float64(actual), _as_float64(expected)
    finite = np.isfinite(a) & np.isfinite(e)
    return float(np.abs(a - e)[finite].max()) if finite.any() else 0.0


def torch_attention(q, k, v, mask=None, *, scale, causal=None, window=None, softcap=None, dropout_p=0.0,
                    dropout_keep=None):  # fmt: skip
    """Dense attention in plain torch ops, in the inputs' own dtype and on their device.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) torch tensors; the
    contract's order of operations, visibility from reference.visible_keys.
    dropout_keep (a bool tensor broadcastable to the weights) drops weights as
    torch does, the kept ones scaled by 1 / (1 - dropout_p); lse is before dropout.
    Differentiable. Returns out (B, Hq, Nq, Dv) and lse (B, Hq, Nq); a row that
    sees no key gives 0 and -inf. Run in low precision it is the "plain
    implementation" whose error sets a kernel's budget (flash-attn's 2x rule).
    """
    import torch

    from .reference import visible_keys

    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q @ k.transpose(-1, -2)) * scale  # (B, Hq, Nq, Nk)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    visible = visible_keys(q.shape[2], k.shape[2], causal or False, window)
    visible = (torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device) if visible is None
               else torch.as_tensor(visible, device=s.device))
    if mask is not None:
        if mask.dtype == torch.bool:
            visible = visible & mask
        else:
            s = s + mask.to(s.dtype)
    s = s.masked_fill(~visible, float("-inf"))
    empty = torch.isneginf(s).all(-1, keepdim=True)  # rows that see no key
    s = torch.where(empty, torch.zeros_like(s), s)
    p = torch.where(empty, torch.zeros_like(s), torch.softmax(s, -1))
    lse = torch.where(empty[..., 0], torch.full_like(s[..., 0], float("-inf")), torch.logsumexp(s, -1))
    if dropout_p > 0:
        p = p * (dropout_keep.to(p.dtype) * (1.0 / (1.0 - dropout_p) if dropout_p < 1 else 0.0))
    return p @ v, lse
