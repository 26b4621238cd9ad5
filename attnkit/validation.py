"""Checking the user's arguments once, before any backend runs.

validate_attention() either raises a TypeError/ValueError that names the
argument, what it was given and what it expects, or returns an AttentionSpec:
the problem's sizes and the normalised options every backend reads. Backends
never check user input again.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from . import _arrays
from .reference import resolve_causal, resolve_scale

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True)
class AttentionSpec:
    """One attention call after validation.

    Sizes are those of the inputs as the backends receive them: at least three
    axes, q (*batch, hq, nq, d), k (*batch, hkv, nk, d), v (*batch, hkv, nk, dv),
    each input's own leading axes broadcasting to `batch`.
    """

    kind: str  # "numpy" or "torch"
    device: str  # "cpu", "cuda:0", ...
    dtype: str  # one of FLOAT_DTYPES
    batch: tuple
    hq: int
    hkv: int
    nq: int
    nk: int
    d: int
    dv: int
    causal: str | None  # None, "top_left" or "bottom_right"
    scale: float
    window: tuple | None  # (left, right), None on a side = unlimited
    softcap: float | None
    mask_kind: str | None  # None, "bool" or "additive"
    squeeze: bool  # every input had two axes: drop the head axis from results

    @property
    def out_shape(self):
        return self.batch + (self.hq, self.nq, self.dv)

    @property
    def scores_shape(self):
        return self.batch + (self.hq, self.nq, self.nk)

    def describe(self):
        batch = "x".join(map(str, self.batch)) or "-"
        return (
            f"{self.dtype} {self.kind} on {self.device}: batch {batch}, Hq={self.hq}, "
            f"Hkv={self.hkv}, Nq={self.nq}, Nk={self.nk}, D={self.d}, Dv={self.dv}"
        )


def _check_array(name, x):
    if _arrays.family(x) is None:
        raise TypeError(
            f"{name} must be a numpy.ndarray or a torch.Tensor; got {_arrays.type_name(x)}"
        )
    if _arrays.dtype_name(x) not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} has dtype {_arrays.dtype_name(x)}; expected a floating dtype "
            f"({', '.join(FLOAT_DTYPES)})"
        )
    if x.ndim < 2:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}; expected at least 2 axes (..., N, D)"
        )


def _number(name, value, *, positive=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number or None; got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be positive, or None to disable it; got {value}")
    return value


def _window(window):
    if window is None:
        return None
    if isinstance(window, (str, bytes)) or not hasattr(window, "__len__") or len(window) != 2:
        raise TypeError(
            f"window must be a (left, right) pair of non-negative ints or None; got {window!r}"
        )
    sides = []
    for side, value in zip(("left", "right"), window):
        if value is None:
            sides.append(None)
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(
                f"window {side} must be a non-negative int or None (unlimited); got {value!r}"
            )
        if value < 0:
            raise ValueError(
                f"window {side} must be >= 0, or None for unlimited; got {int(value)}"
            )
        sides.append(int(value))
    return None if sides == [None, None] else tuple(sides)


def _mask_kind(mask, q, scores_shape):
    if mask is None:
        return None
    if _arrays.family(mask) != _arrays.family(q):
        raise TypeError(
            f"mask must be a {_arrays.type_name(q)} like q; got {_arrays.type_name(mask)}"
        )
    if _arrays.device_name(mask) != _arrays.device_name(q):
        raise ValueError(
            f"mask is on {_arrays.device_name(mask)} but q is on {_arrays.device_name(q)}; "
            "expected one device"
        )
    dtype = _arrays.dtype_name(mask)
    if dtype not in ("bool",) + FLOAT_DTYPES:
        raise TypeError(
            f"mask has dtype {dtype}; expected bool (True = may attend) or a floating "
            "dtype (added to the scores)"
        )
    try:
        fits = np.broadcast_shapes(tuple(mask.shape), scores_shape) == scores_shape
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)}; expected a shape that broadcasts to "
            f"{scores_shape} = (..., Hq, Nq, Nk)"
        )
    if _arrays.family(mask) == "torch" and dtype != "bool" and mask.requires_grad:
        raise ValueError("mask requires grad; gradients with respect to the mask are not supported")
    return "bool" if dtype == "bool" else "additive"


def validate_attention(q, k, v, *, causal, mask, scale, window, softcap):
    """Check every argument of attention(); return the AttentionSpec.

    An input with two axes (N, D) counts as one head: the sizes in the spec are
    those of as_heads(x), and spec.squeeze says whether every input had two.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_array(name, x)
    families = {_arrays.family(x) for x in (q, k, v)}
    if len(families) > 1:
        raise TypeError(
            "q, k and v must be all NumPy arrays or all torch tensors; got "
            f"q {_arrays.type_name(q)}, k {_arrays.type_name(k)}, v {_arrays.type_name(v)}"
        )
    devices = [_arrays.device_name(x) for x in (q, k, v)]
    if len(set(devices)) > 1:
        raise ValueError(
            f"q, k and v must be on one device; got q on {devices[0]}, k on {devices[1]}, "
            f"v on {devices[2]}"
        )
    dtypes = [_arrays.dtype_name(x) for x in (q, k, v)]
    if len(set(dtypes)) > 1:
        raise TypeError(
            f"q, k and v must share one dtype; got q {dtypes[0]}, k {dtypes[1]}, v {dtypes[2]}"
        )

    qs, ks, vs = (tuple(as_heads(x).shape) for x in (q, k, v))
    if qs[-1] != ks[-1]:
        raise ValueError(
            f"q and k must have the same head dimension D (last axis); got q {qs}, k {ks}"
        )
    if qs[-1] == 0:
        raise ValueError(f"q has shape {qs}; expected a head dimension D of at least 1")
    if ks[-2] != vs[-2]:
        raise ValueError(
            f"k and v must have the same number of keys Nk (axis -2); got k {ks}, v {vs}"
        )
    if ks[-3] != vs[-3]:
        raise ValueError(
            f"k and v must have the same number of heads Hkv (axis -3); got k {ks}, v {vs}"
        )
    hq, hkv = qs[-3], ks[-3]
    if hkv == 0 or hq % hkv:
        raise ValueError(
            f"q has {hq} heads and k has {hkv}; expected the query heads to be a whole "
            f"multiple of the kv heads (GQA), got q {qs}, k {ks}"
        )
    try:
        batch = np.broadcast_shapes(qs[:-3], ks[:-3], vs[:-3])
    except ValueError:
        raise ValueError(
            f"the leading (batch) axes of q, k and v do not broadcast: q {qs}, k {ks}, v {vs}"
        ) from None

    if scale is not None:
        scale = _number("scale", scale)
    if softcap is not None:
        softcap = _number("softcap", softcap, positive=True)
    scores_shape = batch + (hq, qs[-2], ks[-2])
    return AttentionSpec(
        kind=_arrays.family(q),
        device=devices[0],
        dtype=dtypes[0],
        batch=batch,
        hq=hq,
        hkv=hkv,
        nq=qs[-2],
        nk=ks[-2],
        d=qs[-1],
        dv=vs[-1],
        causal=resolve_causal(causal),
        scale=resolve_scale(scale, qs[-1]),
        window=_window(window),
        softcap=softcap,
        mask_kind=_mask_kind(mask, q, scores_shape),
        squeeze=max(q.ndim, k.ndim, v.ndim) == 2,
    )


def as_heads(x):
    """x with at least three axes: (N, D) becomes (1, N, D), one head."""
    return x if x.ndim >= 3 else x.reshape((1,) * (3 - x.ndim) + tuple(x.shape))
