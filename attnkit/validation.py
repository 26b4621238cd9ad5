"""Checking the user's arguments once, before any backend runs.

validate_attention() (dense calls) and validate_packed() (packed sequences,
cu_seqlens) either raise a TypeError/ValueError that names the argument, what
it was given and what it expects, or return one AttentionSpec: the problem's
sizes and the normalised options every backend reads. Backends never check
user input again.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from . import _arrays
from .reference import resolve_causal, resolve_scale
from .reference.attention import CAUSAL_MODES

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True)
class AttentionSpec:
    """One attention call after validation.

    Dense calls: sizes are those of the inputs as the backends receive them, at
    least three axes, q (*batch, hq, nq, d), k (*batch, hkv, nk, d), v (*batch,
    hkv, nk, dv), each input's own leading axes broadcasting to `batch`; every
    batch entry is one sequence. Packed calls (cu_q / cu_k set): q (hq, nq, d),
    k (hkv, nk, d), v (hkv, nk, dv) hold the sequences one after another, nq and
    nk the totals, batch ().

    One visibility rule for both (reference.visible_range): query i of a
    sequence sits at key position i + diagonal, diagonal Nk - Nq when `align` is
    "bottom_right", else 0; `causal` (None or the alignment's name) hides keys
    past that position, the window and ALiBi measure from it.
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
    causal: str | None  # None, "top_left" or "bottom_right" (then equal to align)
    align: str  # "top_left" or "bottom_right": where queries sit among the keys
    scale: float
    window: tuple | None  # (left, right), None on a side = unlimited
    softcap: float | None
    mask_kind: str | None  # None, "bool" or "additive"
    squeeze: bool  # every input had two axes: drop the head axis from results
    alibi: bool = False  # ALiBi slopes given: scores get -slope * |position - j|
    sinks: bool = False  # a learned sink logit per query head joins every row's softmax (attnkit.sinks)
    cu_q: np.ndarray | None = None  # packed calls: (S + 1,) int64 query offsets, on the host
    cu_k: np.ndarray | None = None  # packed calls: (S + 1,) int64 key offsets

    @property
    def packed(self):
        return self.cu_q is not None

    @property
    def lengths_q(self):
        return np.diff(self.cu_q)

    @property
    def lengths_k(self):
        return np.diff(self.cu_k)

    @property
    def out_shape(self):
        return self.batch + (self.hq, self.nq, self.dv)

    @property
    def scores_shape(self):
        return self.batch + (self.hq, self.nq, self.nk)

    def describe(self):
        if self.packed:
            def spread(lengths):
                low, high = (int(lengths.min()), int(lengths.max())) if lengths.size else (0, 0)
                return f"{low}..{high} (total {int(lengths.sum())})"

            return (f"{self.dtype} {self.kind} on {self.device}: {len(self.lengths_q)} packed sequences, "
                    f"Hq={self.hq}, Hkv={self.hkv}, Nq {spread(self.lengths_q)}, Nk {spread(self.lengths_k)}, "
                    f"D={self.d}, Dv={self.dv}")  # fmt: skip
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


def dropout_probability(dropout_p):
    """dropout_p as a float after checking it: a real number in [0, 1]."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float in [0, 1]; got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1]; got {dropout_p}")
    return float(dropout_p)


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
    return "bool" if dtype == "bool" else "additive"


def _check_inputs(q, k, v):
    """(family, device, dtype) of q, k and v after checking each and that they agree."""
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
    return families.pop(), devices[0], dtypes[0]


def _check_heads(qs, ks, vs):
    """Hq, Hkv, D and Dv agree between q (..., Hq, Nq, D), k (..., Hkv, Nk, D), v (..., Hkv, Nk, Dv)."""
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
    if ks[-3] == 0:
        raise ValueError(f"k has shape {ks}: no heads; expected at least one kv head (axis -3)")
    if qs[-3] % ks[-3]:
        raise ValueError(
            f"q has {qs[-3]} heads and k has {ks[-3]}; expected the query heads to be a whole "
            f"multiple of the kv heads (GQA), got q {qs}, k {ks}"
        )


def _alibi(alibi_slopes, q, hq, sequences):
    """Whether ALiBi slopes were given, after checking them: (Hq,) or (sequences, Hq) floats on q's device."""
    if alibi_slopes is None:
        return False
    if _arrays.family(alibi_slopes) is None or _arrays.dtype_name(alibi_slopes) not in FLOAT_DTYPES:
        raise TypeError(f"alibi_slopes must be a float array of shape (Hq,) or (B, Hq); got "
                        f"{_arrays.type_name(alibi_slopes)}")  # fmt: skip
    shapes = {(hq,), (sequences, hq)}
    if tuple(alibi_slopes.shape) not in shapes:
        raise ValueError(f"alibi_slopes must have shape {' or '.join(map(str, sorted(shapes)))}; "
                         f"got {tuple(alibi_slopes.shape)}")  # fmt: skip
    if _arrays.device_name(alibi_slopes) != _arrays.device_name(q):
        raise ValueError(f"alibi_slopes is on {_arrays.device_name(alibi_slopes)}; q is on {_arrays.device_name(q)}")
    if _arrays.family(alibi_slopes) == "torch" and alibi_slopes.requires_grad:
        raise ValueError("alibi_slopes requires grad; gradients with respect to the slopes are not supported")
    return True


def _sinks(sinks, q, hq):
    """Whether sinks were given, after checking them: (Hq,) floats, q's array type and device."""
    if sinks is None:
        return False
    if _arrays.family(sinks) != _arrays.family(q) or _arrays.dtype_name(sinks) not in FLOAT_DTYPES:
        raise TypeError(f"sinks must be a float {_arrays.type_name(q)} of shape (Hq,) like q; got "
                        f"{_arrays.type_name(sinks)}")  # fmt: skip
    if tuple(sinks.shape) != (hq,):
        raise ValueError(f"sinks must have shape ({hq},), one logit per query head; got {tuple(sinks.shape)}")
    if _arrays.device_name(sinks) != _arrays.device_name(q):
        raise ValueError(f"sinks is on {_arrays.device_name(sinks)}; q is on {_arrays.device_name(q)}")
    return True


def _common_options(scale, softcap, window, d):
    """scale (resolved), softcap and window after checking them."""
    if scale is not None:
        scale = _number("scale", scale)
    if softcap is not None:
        softcap = _number("softcap", softcap, positive=True)
    return dict(scale=resolve_scale(scale, d), softcap=softcap, window=_window(window))


def _align(align, causal):
    """Where the queries sit: causal's alignment, else align (default "top_left")."""
    if align is None:
        return causal or "top_left"
    if align not in CAUSAL_MODES:
        raise ValueError(f"align must be None or one of {CAUSAL_MODES}; got {align!r}")
    if causal is not None and align != causal:
        raise ValueError(f"align={align!r} contradicts causal={causal!r}; give one alignment")
    return align


def validate_attention(q, k, v, *, causal, mask, scale, window, softcap, alibi_slopes=None, align=None, sinks=None):
    """Check every argument of attention(); return the AttentionSpec.

    An input with two axes (N, D) counts as one head: the sizes in the spec are
    those of as_heads(x), and spec.squeeze says whether every input had two.
    alibi_slopes: (Hq,) or (B, Hq) with B the batch entries (all leading axes together).
    """
    kind, device, dtype = _check_inputs(q, k, v)
    qs, ks, vs = (tuple(as_heads(x).shape) for x in (q, k, v))
    _check_heads(qs, ks, vs)
    try:
        batch = np.broadcast_shapes(qs[:-3], ks[:-3], vs[:-3])
    except ValueError:
        raise ValueError(
            f"the leading (batch) axes of q, k and v do not broadcast: q {qs}, k {ks}, v {vs}"
        ) from None
    hq = qs[-3]
    causal = resolve_causal(causal)
    scores_shape = batch + (hq, qs[-2], ks[-2])
    return AttentionSpec(
        kind=kind, device=device, dtype=dtype, batch=batch, hq=hq, hkv=ks[-3], nq=qs[-2], nk=ks[-2],
        d=qs[-1], dv=vs[-1], causal=causal, align=_align(align, causal), **_common_options(scale, softcap, window, qs[-1]),
        mask_kind=_mask_kind(mask, q, scores_shape), squeeze=max(q.ndim, k.ndim, v.ndim) == 2,
        alibi=_alibi(alibi_slopes, q, hq, math.prod(batch)), sinks=_sinks(sinks, q, hq),
    )  # fmt: skip


def host_offsets(name, cu_seqlens, total, *, int32_only=False, read=True):
    """cu_seqlens as a host int64 array after checking it: 1-D integers, starting at 0,
    never decreasing, ending at total. (S + 1,) entries give S sequences. read=False (while
    torch.compile traces: the values are data there) checks the type, dtype and shape only, and
    returns None."""
    if _arrays.family(cu_seqlens) is None:
        raise TypeError(f"{name} must be a 1-D integer torch.Tensor or numpy.ndarray; got {_arrays.type_name(cu_seqlens)}")
    dtype = _arrays.dtype_name(cu_seqlens)
    allowed = ("int32",) if int32_only else ("int32", "int64")
    if dtype not in allowed:
        raise TypeError(f"{name} must have dtype {' or '.join(allowed)}; got {dtype}")
    if cu_seqlens.ndim != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D with S + 1 >= 1 entries; got shape {tuple(cu_seqlens.shape)}")
    if not read:
        return None
    offsets = np.asarray(_arrays.to_numpy(cu_seqlens), np.int64)
    if offsets[0] != 0:
        raise ValueError(f"{name}[0] must be 0; got {int(offsets[0])}")
    steps = np.diff(offsets)
    if np.any(steps < 0):
        b = int(np.argmax(steps < 0))
        raise ValueError(
            f"{name} must not decrease; got {name}[{b}] = {int(offsets[b])} > {name}[{b + 1}] = {int(offsets[b + 1])}"
        )
    if offsets[-1] != total:
        raise ValueError(f"{name}[-1] must equal the number of tokens, {total}; got {int(offsets[-1])}")
    return offsets


def validate_packed(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal, align, scale, window, softcap, alibi_slopes,
                    sinks=None, read_offsets=True):
    """varlen_attention's arguments as an AttentionSpec with cu_q / cu_k, or a TypeError/ValueError naming the argument.

    read_offsets=False (torch.compile tracing) checks the offsets' type, dtype and shape but not
    their values, and leaves cu_q / cu_k None: attnkit's operator checks the values when it runs."""
    kind, device, dtype = _check_inputs(q, k, v)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 3:
            raise ValueError(f"{name} must be (H, total, D) with 3 axes; got shape {tuple(x.shape)}")
    _check_heads(tuple(q.shape), tuple(k.shape), tuple(v.shape))
    hq, total_q, d = q.shape
    hkv, total_k, dv = v.shape
    cu_q = host_offsets("cu_seqlens_q", cu_seqlens_q, total_q, read=read_offsets)
    cu_k = host_offsets("cu_seqlens_k", cu_seqlens_k, total_k, read=read_offsets)
    sequences_q, sequences_k = cu_seqlens_q.shape[0] - 1, cu_seqlens_k.shape[0] - 1
    if sequences_q != sequences_k:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same sequences; got {sequences_q} and {sequences_k}"
        )
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool; got {causal!r}")
    if align not in CAUSAL_MODES:
        raise ValueError(f"align must be one of {CAUSAL_MODES}; got {align!r}")
    return AttentionSpec(
        kind=kind, device=device, dtype=dtype, batch=(), hq=hq, hkv=hkv, nq=total_q, nk=total_k, d=d, dv=dv,
        causal=align if causal else None, align=align, **_common_options(scale, softcap, window, d), mask_kind=None,
        squeeze=False, alibi=_alibi(alibi_slopes, q, hq, sequences_q), sinks=_sinks(sinks, q, hq), cu_q=cu_q,
        cu_k=cu_k,
    )  # fmt: skip


def as_heads(x):
    """x with at least three axes: (N, D) becomes (1, N, D), one head."""
    return x if x.ndim >= 3 else x.reshape((1,) * (3 - x.ndim) + tuple(x.shape))
