"""Packed sequences of different lengths: attnkit.varlen_attention (flash-attn's "varlen").

Sequence b is the queries cu_seqlens_q[b]:cu_seqlens_q[b+1] against the keys
cu_seqlens_k[b]:cu_seqlens_k[b+1]; the kernels run each at its own (Nq_b, Nk_b)
and nothing between them (no padding, no mask): the Numba kernel through its
segment table (kernels/numba_attention.py, `segments=`), the Triton kernel
through cu_seqlens read per program. The specification is
attnkit.reference.varlen_attention.

The flow is attention()'s: check the arguments (TypeError/ValueError naming
the argument), pick the backend for the data's device, run it under torch
autograd when an input requires grad, hand back the input's type and dtype.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from . import _arrays
from .backends import Request, choose_backend, cpu_product_path
from .reference import resolve_scale
from .reference.varlen import ALIGNMENTS
from .validation import FLOAT_DTYPES, _check_array, _number, _window

__all__ = ["varlen_attention"]


@dataclass(frozen=True)
class VarlenSpec:
    """One varlen call after validation (sizes, options, the sequences' offsets on the host)."""

    kind: str  # "numpy" or "torch"
    device: str
    dtype: str
    hq: int
    hkv: int
    d: int
    dv: int
    cu_q: np.ndarray  # (B + 1,) int64, on the host
    cu_k: np.ndarray
    causal: bool
    align: str
    scale: float
    window: tuple | None
    softcap: float | None
    has_alibi: bool

    @property
    def lengths_q(self):
        return np.diff(self.cu_q)

    @property
    def lengths_k(self):
        return np.diff(self.cu_k)

    def options(self):
        return dict(causal=self.causal, align=self.align, scale=self.scale, window=self.window, softcap=self.softcap)

    def describe(self):
        def spread(lengths):
            low, high = (int(lengths.min()), int(lengths.max())) if lengths.size else (0, 0)
            return f"{low}..{high} (total {int(lengths.sum())})"

        return (f"{self.dtype} {self.kind} on {self.device}: {len(self.lengths_q)} packed sequences, Hq={self.hq}, "
                f"Hkv={self.hkv}, Nq {spread(self.lengths_q)}, Nk {spread(self.lengths_k)}, D={self.d}, Dv={self.dv}")


def explain_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=False, align="bottom_right", scale=None,
                   window=None, softcap=None, alibi_slopes=None, backend="auto"):  # fmt: skip
    """Which backend varlen_attention (and so the flash-attn functions) would run, and why (a string)."""
    spec = validate_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, align=align, scale=scale,
                           window=window, softcap=softcap, alibi_slopes=alibi_slopes)  # fmt: skip
    grad = spec.kind == "torch" and _torch_grad(q, k, v)
    return choose_backend(spec, backend, Request(grad=grad), warn=False).explain(spec)


def host_offsets(name, cu_seqlens, total, *, int32_only=False):
    """cu_seqlens as a host int64 array after checking it: 1-D integers, starting at 0,
    never decreasing, ending at total. (B + 1,) entries give B sequences."""
    if _arrays.family(cu_seqlens) is None:
        raise TypeError(f"{name} must be a 1-D integer torch.Tensor or numpy.ndarray; got {_arrays.type_name(cu_seqlens)}")
    dtype = _arrays.dtype_name(cu_seqlens)
    allowed = ("int32",) if int32_only else ("int32", "int64")
    if dtype not in allowed:
        raise TypeError(f"{name} must have dtype {' or '.join(allowed)}; got {dtype}")
    if cu_seqlens.ndim != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D with B + 1 >= 1 entries; got shape {tuple(cu_seqlens.shape)}")
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


def validate_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal, align, scale, window, softcap, alibi_slopes):
    """A VarlenSpec, or a TypeError/ValueError naming the argument."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_array(name, x)
        if x.ndim != 3:
            raise ValueError(f"{name} must be (H, total, D) with 3 axes; got shape {tuple(x.shape)}")
    families = {_arrays.family(x) for x in (q, k, v)}
    devices = {_arrays.device_name(x) for x in (q, k, v)}
    if len(families) > 1 or len(devices) > 1:
        raise ValueError(
            "q, k and v must be the same array type on the same device; got "
            + ", ".join(f"{n} {_arrays.type_name(x)} on {_arrays.device_name(x)}" for n, x in zip("qkv", (q, k, v)))
        )
    dtypes = {_arrays.dtype_name(x) for x in (q, k, v)}
    if len(dtypes) > 1:
        raise TypeError(f"q, k and v must share a dtype; got {_arrays.dtype_name(q)}, {_arrays.dtype_name(k)}, "
                        f"{_arrays.dtype_name(v)}")
    hq, total_q, d = q.shape
    hkv, total_k, dk = k.shape
    if dk != d:
        raise ValueError(f"k's head dim must equal q's; got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if v.shape[0] != hkv or v.shape[1] != total_k:
        raise ValueError(f"v must be (Hkv, total_k, Dv) = ({hkv}, {total_k}, Dv); got {tuple(v.shape)}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"the query heads ({hq}) must be a multiple of the kv heads ({hkv})")
    cu_q = host_offsets("cu_seqlens_q", cu_seqlens_q, total_q)
    cu_k = host_offsets("cu_seqlens_k", cu_seqlens_k, total_k)
    if len(cu_q) != len(cu_k):
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same sequences; got {len(cu_q) - 1} and {len(cu_k) - 1}"
        )
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool; got {causal!r}")
    if align not in ALIGNMENTS:
        raise ValueError(f"align must be one of {ALIGNMENTS}; got {align!r}")
    if alibi_slopes is not None:
        if _arrays.family(alibi_slopes) is None or _arrays.dtype_name(alibi_slopes) not in FLOAT_DTYPES:
            raise TypeError(f"alibi_slopes must be a float array of shape (Hq,) or (B, Hq); got "
                            f"{_arrays.type_name(alibi_slopes)}")
        if tuple(alibi_slopes.shape) not in ((hq,), (len(cu_q) - 1, hq)):
            raise ValueError(f"alibi_slopes must have shape ({hq},) or ({len(cu_q) - 1}, {hq}); "
                             f"got {tuple(alibi_slopes.shape)}")
        if _arrays.device_name(alibi_slopes) != _arrays.device_name(q):
            raise ValueError(f"alibi_slopes is on {_arrays.device_name(alibi_slopes)}; q is on {_arrays.device_name(q)}")
    return VarlenSpec(
        kind=_arrays.family(q), device=_arrays.device_name(q), dtype=_arrays.dtype_name(q),
        hq=hq, hkv=hkv, d=d, dv=v.shape[2], cu_q=cu_q, cu_k=cu_k, causal=bool(causal), align=align,
        scale=resolve_scale(None if scale is None else _number("scale", scale), d), window=_window(window),
        softcap=None if softcap is None else _number("softcap", softcap, positive=True),
        has_alibi=alibi_slopes is not None,
    )  # fmt: skip


# ---------------------------------------------------------------------------
# CPU: the Numba kernel with a segment table
# ---------------------------------------------------------------------------


def _key_layout(lengths_k):
    """(starts, total): where each sequence's keys go in the kernel's key axis (see
    kernels.cpu.plan._segment_table: starts a multiple of 16, 16 free between)."""
    from .kernels.cpu.plan import SEGMENT_ALIGN

    room = (lengths_k + 2 * SEGMENT_ALIGN - 1) // SEGMENT_ALIGN * SEGMENT_ALIGN
    starts = np.concatenate([[0], np.cumsum(room)[:-1]]).astype(np.int64)
    return starts, int(room.sum())


def _spread_keys(x, cu_k, starts, total):
    """(H, total_k, X) keys as the kernel's (1, H, total, X): sequence b's rows moved to starts[b]."""
    out = np.zeros((1, x.shape[0], total, x.shape[2]), x.dtype)
    for b in range(len(starts)):
        n = cu_k[b + 1] - cu_k[b]
        out[0, :, starts[b] : starts[b] + n] = x[:, cu_k[b] : cu_k[b + 1]]
    return out


def _gather_keys(x, cu_k, starts):
    """The inverse of _spread_keys: (1, H, total, X) -> (H, total_k, X)."""
    parts = [x[0, :, starts[b] : starts[b] + cu_k[b + 1] - cu_k[b]] for b in range(len(starts))]
    return np.concatenate(parts, axis=1) if parts else x[0, :, :0]


def _segments(spec, starts):
    """The kernel's (B, 5) segment rows (b, qs, Nq, ks, Nk)."""
    lengths_q, lengths_k = spec.lengths_q, spec.lengths_k
    return np.column_stack([np.zeros_like(lengths_q), spec.cu_q[:-1], lengths_q, starts, lengths_k]).astype(np.int64)


def _host(x, bf16):
    """x as the kernel's NumPy operand: bf16 bits (uint16) when bf16, float64 kept, else float32."""
    if bf16:
        return _arrays.bf16_bits(x)
    x = _arrays.to_numpy(x)
    return x if x.dtype == np.float64 else x.astype(np.float32, copy=False)


def _alibi_host(alibi_slopes, spec):
    if alibi_slopes is None:
        return None
    slopes = np.asarray(_arrays.to_numpy(alibi_slopes), np.float64)
    return slopes.reshape(-1 if slopes.ndim == 2 else 1, spec.hq)


def _foldable_decode(spec, alibi_slopes):
    """Whether every sequence has one query and the GQA group can become its rows.

    One query against a sequence's keys (bottom-right: it sees all of them) is
    the same for every head of a group; the group's Hq / Hkv queries then run
    as Hq / Hkv rows of one kv head, so each key tile is read once per group
    and feeds several rows of the micro-kernel (flash-attn folds decode the same way).
    """
    return (
        spec.hq > spec.hkv and len(spec.cu_q) > 1 and np.all(spec.lengths_q == 1) and spec.window is None
        and alibi_slopes is None and (not spec.causal or spec.align == "bottom_right")
    )  # fmt: skip


def _numba_forward(q, k, v, alibi_slopes, spec):
    from .kernels.numba_attention import flash_forward

    bf16 = cpu_product_path(spec.dtype)[0] == "bf16"
    qn, kn, vn = (_host(x, bf16) for x in (q, k, v))
    folded = _foldable_decode(spec, alibi_slopes)
    if folded:  # (Hq, B, D) -> (Hkv, B * group, D): sequence b's rows are its group's queries
        group, batch = spec.hq // spec.hkv, len(spec.cu_q) - 1
        qn = qn.reshape(spec.hkv, group, batch, spec.d).transpose(0, 2, 1, 3).reshape(spec.hkv, batch * group, spec.d)
        spec = dataclasses.replace(spec, hq=spec.hkv, cu_q=spec.cu_q * group, causal=False)
    starts, total = _key_layout(spec.lengths_k)
    out, lse = flash_forward(
        qn[None], _spread_keys(kn, spec.cu_k, starts, total), _spread_keys(vn, spec.cu_k, starts, total), None,
        scale=spec.scale, causal="bottom_right" if spec.causal else None, window=spec.window,
        softcap=spec.softcap, bf16_products=bf16, segments=_segments(spec, starts), align=spec.align,
        alibi=_alibi_host(alibi_slopes, spec),
    )  # fmt: skip
    out, lse = out[0], lse[0]
    if folded:  # back to (Hq, B, Dv) and (Hq, B)
        out = out.reshape(spec.hkv, batch, group, -1).transpose(0, 2, 1, 3).reshape(spec.hkv * group, batch, -1)
        lse = lse.reshape(spec.hkv, batch, group).transpose(0, 2, 1).reshape(spec.hkv * group, batch)
    return _arrays.like(out, q), _arrays.like(lse, q, keep_dtype=True)


def _numba_backward(q, k, v, out, d_out, lse, alibi_slopes, spec):
    from .kernels.numba_attention import flash_backward

    bf16 = cpu_product_path(spec.dtype)[0] == "bf16"
    qn, kn, vn, on, don = (_host(x, bf16) for x in (q, k, v, out, d_out))
    starts, total = _key_layout(spec.lengths_k)
    dq, dk, dv = flash_backward(
        qn[None], _spread_keys(kn, spec.cu_k, starts, total), _spread_keys(vn, spec.cu_k, starts, total), None,
        on[None], don[None], np.asarray(_arrays.to_numpy(lse))[None],
        scale=spec.scale, causal="bottom_right" if spec.causal else None, window=spec.window,
        softcap=spec.softcap, bf16_products=bf16, segments=_segments(spec, starts), align=spec.align,
        alibi=_alibi_host(alibi_slopes, spec),
    )  # fmt: skip
    dk, dv = (_gather_keys(g, spec.cu_k, starts) for g in (dk, dv))
    return _arrays.like(dq[0], q), _arrays.like(dk, k), _arrays.like(dv, v)


# ---------------------------------------------------------------------------
# The reference (any device, through host memory)
# ---------------------------------------------------------------------------


def _reference_forward(q, k, v, alibi_slopes, spec):
    from .reference.varlen import varlen_attention as reference

    out, lse = reference(
        *map(_arrays.to_numpy, (q, k, v)), spec.cu_q, spec.cu_k, **spec.options(),
        alibi_slopes=_arrays.to_numpy(alibi_slopes), return_lse=True,
    )  # fmt: skip
    return _arrays.like(out, q), _arrays.like(lse, q, keep_dtype=True)


def _reference_backward(q, k, v, out, d_out, lse, alibi_slopes, spec):
    from .reference.varlen import varlen_attention_backward as reference

    grads = reference(
        *map(_arrays.to_numpy, (q, k, v, out, d_out, lse)), spec.cu_q, spec.cu_k, **spec.options(),
        alibi_slopes=_arrays.to_numpy(alibi_slopes),
    )  # fmt: skip
    return tuple(_arrays.like(g, x) for g, x in zip(grads, (q, k, v)))


# ---------------------------------------------------------------------------
# CUDA: the Triton kernel
# ---------------------------------------------------------------------------


def _triton_forward(q, k, v, alibi_slopes, spec):
    from .kernels.triton_attention import varlen_forward

    return varlen_forward(q, k, v, alibi_slopes, spec)


def _triton_backward(q, k, v, out, d_out, lse, alibi_slopes, spec):
    from .kernels.triton_attention import varlen_backward

    return varlen_backward(q, k, v, out, d_out, lse, alibi_slopes, spec)


_BACKENDS = {
    "numba": (_numba_forward, _numba_backward),
    "triton": (_triton_forward, _triton_backward),
    "reference": (_reference_forward, _reference_backward),
}


class _PackedKernels:
    """One backend's packed forward / backward in the form autograd.AttentionFunction calls a
    backend with (the ALiBi slopes ride where a dense call's mask does), so packed and dense
    calls share one autograd Function."""

    def __init__(self, name):
        self.name = name

    def forward(self, q, k, v, alibi_slopes, spec, *, return_weights=False, dropout_p=0.0, dropout_keep=None):
        out, lse = _BACKENDS[self.name][0](q, k, v, alibi_slopes, spec)
        return out, lse, None

    def backward(self, q, k, v, alibi_slopes, out, d_out, lse, spec, *, dropout_p=0.0, dropout_keep=None):
        return _BACKENDS[self.name][1](q, k, v, out, d_out.contiguous(), lse, alibi_slopes, spec)


def varlen_attention(
    q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=False, align="bottom_right", scale=None, window=None,
    softcap=None, alibi_slopes=None, return_lse=False, backend="auto",
):  # fmt: skip
    """Attention over packed sequences of different lengths, each on its own.

    Args:
        q: (Hq, total_q, D) queries of B sequences one after another (a NumPy
            array or a torch tensor).
        k: (Hkv, total_k, D) keys; Hq must be a multiple of Hkv (GQA/MQA).
        v: (Hkv, total_k, Dv) values.
        cu_seqlens_q, cu_seqlens_k: (B + 1,) int32 or int64 offsets, starting at
            0 and ending at total_q / total_k; sequence b is rows
            cu_seqlens_q[b]:cu_seqlens_q[b+1] against keys
            cu_seqlens_k[b]:cu_seqlens_k[b+1]. A sequence may be empty.
        causal: a bool; keys past each query's position are hidden.
        align: where a sequence's queries sit among its keys: "bottom_right"
            (flash-attn's convention; query i at key position i + Nk - Nq, so
            the last query meets the last key, as in decoding) or "top_left"
            (position i). Causal, window and ALiBi measure from it.
        scale: factor on q.k, default 1/sqrt(D).
        window: (left, right): keys position - left ... position + right; None
            on a side is unlimited.
        softcap: scores become softcap * tanh(scores / softcap).
        alibi_slopes: None, (Hq,) or (B, Hq): scores get
            -slope * |position - j| (after the softcap), inside the kernel.
        return_lse: also return lse (Hq, total_q), float32 (float64 for
            float64 input); -inf for a row that sees no key.
        backend: "auto" (Numba on the CPU, Triton on CUDA), "numba",
            "triton" or "reference".

    Returns:
        out (Hq, total_q, Dv) with q's type, device and dtype, or (out, lse).
        Torch inputs that require grad get gradients (not through lse or the
        offsets).

    Raises:
        TypeError, ValueError: naming the argument, for any invalid input.
    """
    spec = validate_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, align=align, scale=scale, window=window,
        softcap=softcap, alibi_slopes=alibi_slopes,
    )  # fmt: skip
    grad = spec.kind == "torch" and _torch_grad(q, k, v)
    # The dense calls' chooser: same refusals, same AttnkitFallbackWarning (pointing at the caller).
    kernels = _PackedKernels(choose_backend(spec, backend, Request(grad=grad), stacklevel=3).backend.name)
    if grad:
        from .autograd import AttentionFunction

        out, lse = AttentionFunction.apply(q, k, v, alibi_slopes, None, kernels, spec, 0.0, False)
    else:
        out, lse, _ = kernels.forward(q, k, v, alibi_slopes, spec)
    return (out, lse) if return_lse else out


def _torch_grad(q, k, v):
    import torch

    return torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
