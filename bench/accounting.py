"""Arithmetic of the benchmark: FLOP counts, power-law fits, extrapolation, units.

Pure functions on plain numbers, shared by the sweep, the report and the charts.
"""

from __future__ import annotations

import math

MODES = ("forward", "backward", "both")

# Backward costs 2.5 forwards (FlashAttention's convention, used by every peer):
# it recomputes the scores and runs four more matrix products.
PASS_COST = {"forward": 1.0, "backward": 2.5, "both": 3.5}

ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


def attention_flops(batch, heads, nq, nk, head_dim, causal=False, mode="forward"):
    """FLOPs of one call as everyone counts them.

    Forward is 4 * B * H * Nq * Nk * D (two matrix products of 2 * Nq * Nk * D
    each), halved when causal; backward is 2.5x forward, forward + backward 3.5x.
    """
    if mode not in PASS_COST:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    flops = 4 * batch * heads * nq * nk * head_dim * PASS_COST[mode]
    return flops / 2 if causal else flops


def fit_exponent(ns, values):
    """Least-squares slope of log(value) against log(N): value ~ c * N^slope.

    Non-positive values carry no information on a log scale and are dropped.
    Returns None when fewer than two distinct N remain.
    """
    pairs = [(math.log(n), math.log(v)) for n, v in zip(ns, values) if n > 0 and v and v > 0]
    if len({x for x, _ in pairs}) < 2:
        return None
    mean_x = sum(x for x, _ in pairs) / len(pairs)
    mean_y = sum(y for _, y in pairs) / len(pairs)
    covariance = sum((x - mean_x) * (y - mean_y) for x, y in pairs)
    variance = sum((x - mean_x) ** 2 for x, _ in pairs)
    return covariance / variance


def extrapolate(ns, values, n, lowest=1.0, highest=3.0):
    """Predict the value at n from the last two measured (N, value) pairs.

    The local power-law exponent is clipped to [lowest, highest] so that noise
    at small N cannot predict a shrinking cost, nor an absurd one. Returns None
    without two usable points.
    """
    usable = [(m, v) for m, v in zip(ns, values) if v and v > 0 and m < n]
    if len(usable) < 2:
        return None
    (n1, v1), (n2, v2) = sorted(usable)[-2:]
    if n1 == n2:
        return None
    exponent = min(max(math.log(v2 / v1) / math.log(n2 / n1), lowest), highest)
    return v2 * (n / n2) ** exponent


def format_bytes(count):
    """1536 -> '1.5 KiB'; binary units, three significant digits."""
    if count is None:
        return "-"
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" or abs(size) >= 100 else f"{size:.3g} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def format_seconds(seconds):
    """0.00123 -> '1.23 ms'."""
    if seconds is None:
        return "-"
    for unit, factor in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if abs(seconds) >= factor or unit == "us":
            return f"{seconds / factor:.3g} {unit}"
    raise AssertionError("unreachable")
