"""The NumPy specification as a backend: runs any call, anywhere, through host memory."""

from __future__ import annotations

import contextlib
import math
import sys

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


# The largest call the reference stands in for while a kernel compiles (attnkit.backends): its
# score matrix, in the compute dtype, at most this many bytes. The reference holds a few such
# arrays; at 2**25 float32 scores (B1 H32 N1024) it took 0.5-0.7 s forward and 1.3-1.8 s backward
# on the 2-core machine, against a first compilation of 15-30 s. Larger calls wait for the kernel:
# their own time dwarfs its compilation.
STAND_IN_BYTES = 128 << 20


def score_count(spec):
    """How many scores a call computes: the batch entries' (or packed sequences') Nq x Nk, per head."""
    if spec.packed:
        return spec.hq * int((spec.lengths_q * spec.lengths_k).sum())
    return math.prod(spec.batch) * spec.hq * spec.nq * spec.nk


_WARMUP_MODULE = __package__.rsplit(".", 1)[0] + ".kernels.warmup"  # imported only with the kernels (Numba)
_NO_LIMIT = contextlib.nullcontext()
_BLAS_CONTROLLER = []  # threadpoolctl's controller, made at the first limit (it lists the loaded libraries)


def _blas_threads_while_helpers_compile():
    """A context manager: NumPy's BLAS on one thread while helper processes compile kernels
    (kernels/warmup.py), else nothing. Beside two compiling helpers on two cores, OpenBLAS's threads
    wait for cores the helpers hold: a first call standing in for the kernel (fp32 B1 H32/8 N1024
    causal) took 1.1-3.1 s beside two busy processes with its threads, 0.42-0.52 s on one (0.30
    against 0.32 s on a quiet machine; #24)."""
    warmup = sys.modules.get(_WARMUP_MODULE)
    if warmup is None or not warmup.compiling():
        return _NO_LIMIT
    try:
        if not _BLAS_CONTROLLER:
            from threadpoolctl import ThreadpoolController

            _BLAS_CONTROLLER.append(ThreadpoolController())
        return _BLAS_CONTROLLER[0].limit(limits=1, user_api="blas")
    except Exception:  # threadpoolctl cannot read this process's libraries: the call runs as it is
        return _NO_LIMIT


class ReferenceBackend(Backend):
    """The NumPy specification. Runs anything, anywhere, through host memory."""

    name = "reference"

    def stand_in_refusal(self, spec):
        """None when the reference can stand in for a kernel still compiling on this call (small
        enough: STAND_IN_BYTES), else why not."""
        scores = score_count(spec)
        size = scores * (8 if spec.dtype == "float64" else 4)
        if size > STAND_IN_BYTES:
            return f"{scores:,} scores ({size / 2**20:.0f} MiB) are more than the reference stands in for"
        return None

    def forward(self, q, k, v, mask, spec, *, alibi=None, return_weights=False, dropout=None, sinks=None):
        with _blas_threads_while_helpers_compile():
            return self._forward(q, k, v, mask, spec, alibi, return_weights, dropout, sinks)

    def _forward(self, q, k, v, mask, spec, alibi, return_weights, dropout, sinks):
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
        with _blas_threads_while_helpers_compile():
            return self._backward(q, k, v, mask, out, d_out, lse, spec, alibi, dropout)

    def _backward(self, q, k, v, mask, out, d_out, lse, spec, alibi, dropout):
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
