"""The NumPy specification as a backend: runs any call, anywhere, through host memory."""

from __future__ import annotations

from .. import _arrays
from ..reference import attention as reference_attention
from ..reference import attention_backward as reference_attention_backward
from ..reference.varlen import varlen_attention, varlen_attention_backward
from .base import Backend


def _options(spec, alibi):
    """reference.attention's (and reference.varlen's) keyword arguments for this call."""
    slopes = _arrays.to_numpy(alibi)
    if slopes is not None and not spec.packed:  # (B, Hq) over the batch entries -> (*batch, Hq)
        slopes = slopes.reshape((spec.batch if slopes.ndim == 2 else ()) + (spec.hq,))
    options = dict(scale=spec.scale, window=spec.window, softcap=spec.softcap, align=spec.align, alibi_slopes=slopes)
    options["causal"] = spec.causal is not None if spec.packed else spec.causal
    return options


def _dense_dropout(dropout, spec):
    """reference.attention's dropout arguments: the seed's keep mask, drawn whole."""
    return {} if dropout is None else dict(dropout_p=dropout.p, dropout_keep=dropout.keep(spec))


def _packed_dropout(dropout):
    return {} if dropout is None else dict(dropout_p=dropout.p, dropout_seed=dropout.seed)


class ReferenceBackend(Backend):
    """The NumPy specification. Runs anything, anywhere, through host memory."""

    name = "reference"

    def forward(self, q, k, v, mask, spec, *, alibi=None, return_weights=False, dropout=None, sinks=None):
        qn, kn, vn, sinks_n = map(_arrays.to_numpy, (q, k, v, sinks))
        if spec.packed:
            out, lse = varlen_attention(
                qn, kn, vn, spec.cu_q, spec.cu_k, **_options(spec, alibi), **_packed_dropout(dropout), sinks=sinks_n,
                return_lse=True,
            )  # fmt: skip
            weights = None
        else:
            out, lse, weights = reference_attention(
                qn, kn, vn, mask=_arrays.to_numpy(mask), return_lse=True, return_weights=True, sinks=sinks_n,
                **_dense_dropout(dropout, spec), **_options(spec, alibi),
            )  # fmt: skip
        weights = _arrays.like(weights, q) if return_weights else None
        return _arrays.like(out, q), _arrays.like(lse, q, keep_dtype=True), weights

    def backward(self, q, k, v, mask, out, d_out, lse, spec, *, alibi=None, dropout=None):
        arrays = map(_arrays.to_numpy, (q, k, v, out, d_out, lse))
        if spec.packed:
            grads = varlen_attention_backward(
                *arrays, spec.cu_q, spec.cu_k, **_options(spec, alibi), **_packed_dropout(dropout)
            )
        else:
            grads = reference_attention_backward(
                *arrays, mask=_arrays.to_numpy(mask), **_dense_dropout(dropout, spec), **_options(spec, alibi),
            )  # fmt: skip
        return tuple(_arrays.like(g, x) for g, x in zip(grads, (q, k, v)))
