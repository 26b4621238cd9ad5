"""The NumPy specification as a backend: runs any call, anywhere, through host memory."""

from __future__ import annotations

import contextlib
import math
import sys

import numpy as np

from .. import _arrays
from ..reference import attention as reference_attention
from ..reference import attention_backward as reference_attention_backward
from ..reference import attention_mask_gradient
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


def _score_bytes(spec):
    """The bytes of a call's scores in the reference's compute dtype."""
    return score_count(spec) * (8 if spec.dtype == "float64" else 4)


# Standing in for a kernel (helpers compiling), a dense call of more than this many bytes of scores
# runs a few kv heads (and their query heads) at a time: each step's temporaries (scores, weights,
# their gradients: ~8 arrays of the scores' size in the backward) then fit a step's share, and are
# new memory for each call no more. The backward of fp32 B1 H32/8 N1024 causal (128 MiB of scores)
# took 2.3-4.6 s at its first call on the Xeon VM and 0.4-2.5 s later, backing ~1 GiB of new memory
# each time; eight steps of 16 MiB: 0.31-0.33 s, the same bits (per head the arithmetic is the
# same). Called for itself, the reference runs the specification as written: the whole (B, H, Nq,
# Nk) scores at once (what `attnkit bench` charts as its memory).
_SCORES_PER_STEP_BYTES = 16 << 20
_WARMUP_MODULE = __package__.rsplit(".", 1)[0] + ".kernels.warmup"


def _helpers_compiling():
    """Whether helper processes are compiling kernels now (kernels/warmup.py, imported only with the
    kernels, which import Numba): the reference is standing in for them."""
    warmup = sys.modules.get(_WARMUP_MODULE)
    return warmup is not None and bool(warmup.compiling())


def _head_steps(spec, mask, dropout, return_weights):
    """[(query heads, kv heads)] slices to run a dense call in, or None to run it whole: calls not
    standing in for a kernel, small ones, packed ones, and those with dropout (its keep mask is
    drawn whole) or returned weights."""
    if spec.packed or dropout is not None or return_weights or spec.hkv < 2 or not _helpers_compiling():
        return None
    if mask is not None and mask.ndim >= 3 and mask.shape[-3] not in (1, spec.hq):
        return None
    per_kv_head = _score_bytes(spec) // spec.hkv
    if per_kv_head * spec.hkv <= _SCORES_PER_STEP_BYTES:
        return None
    step, group = max(1, _SCORES_PER_STEP_BYTES // per_kv_head), spec.hq // spec.hkv
    return [(slice(h * group, min(h + step, spec.hkv) * group), slice(h, min(h + step, spec.hkv)))
            for h in range(0, spec.hkv, step)]  # fmt: skip


# A mask's gradient is computed a few query heads at a time, each step's scores at most this many bytes
# (B2 N512 fp32: 2 MiB a head, one head a step; tiny calls in one step)
_MASK_GRADIENT_STEP_BYTES = 1 << 20


def _mask_gradient_steps(spec):
    """[(query heads, kv heads)] slices of a dense call for mask_gradient: whole kv groups, or a
    divisor of the group's query heads (a step then reads one kv head), each step's scores at most
    _MASK_GRADIENT_STEP_BYTES when a head allows."""
    if spec.hq == 0:  # no query heads: one empty step (the gradient is zeros)
        return [(slice(0, 0), slice(0, spec.hkv))]
    group = spec.hq // spec.hkv
    per_head = max(1, _score_bytes(spec) // spec.hq)
    step = max(1, _MASK_GRADIENT_STEP_BYTES // per_head)
    if step >= group:
        step -= step % group  # whole groups
        return [(slice(h, min(h + step, spec.hq)), slice(h // group, min(h + step, spec.hq) // group))
                for h in range(0, spec.hq, step)]  # fmt: skip
    step = max(d for d in range(1, step + 1) if group % d == 0)  # within a group: one kv head
    return [(slice(h, h + step), slice(h // group, h // group + 1)) for h in range(0, spec.hq, step)]


def _steps_options(steps, spec, alibi, mask):
    """(query heads, kv heads, keyword arguments) of each step: the call's options, its mask
    ((..., Hq or 1, Nq, Nk), or (Nq, Nk)) and ALiBi slopes (..., Hq) cut to the step's query heads."""
    options = _options(spec, alibi)
    slopes = options.pop("alibi_slopes")
    for heads, kv_heads in steps:
        step_mask = mask if mask is None or mask.ndim < 3 or mask.shape[-3] == 1 else mask[..., heads, :, :]
        step_slopes = None if slopes is None else slopes[..., heads]
        yield heads, kv_heads, dict(options, mask=step_mask, alibi_slopes=step_slopes)


_NO_LIMIT = contextlib.nullcontext()
_BLAS_CONTROLLER = []  # threadpoolctl's controller, made at the first limit (it lists the loaded libraries)


def _one_blas_thread():
    """A context manager: NumPy's BLAS on one thread (nothing where threadpoolctl cannot)."""
    try:
        if not _BLAS_CONTROLLER:
            from threadpoolctl import ThreadpoolController

            _BLAS_CONTROLLER.append(ThreadpoolController())
        return _BLAS_CONTROLLER[0].limit(limits=1, user_api="blas")
    except Exception:  # threadpoolctl cannot read this process's libraries: the call runs as it is
        return _NO_LIMIT


def _blas_threads_while_helpers_compile():
    """A context manager: NumPy's BLAS on one thread while helper processes compile kernels
    (kernels/warmup.py), else nothing. Beside two compiling helpers on two cores, OpenBLAS's threads
    wait for cores the helpers hold: a first call standing in for the kernel (fp32 B1 H32/8 N1024
    causal) took 1.1-3.1 s beside two busy processes with its threads, 0.42-0.52 s on one (0.30
    against 0.32 s on a quiet machine; #24)."""
    return _one_blas_thread() if _helpers_compiling() else _NO_LIMIT


class ReferenceBackend(Backend):
    """The NumPy specification. Runs anything, anywhere, through host memory."""

    name = "reference"

    def stand_in_refusal(self, spec):
        """None when the reference can stand in for a kernel still compiling on this call (small
        enough: STAND_IN_BYTES), else why not."""
        size = _score_bytes(spec)
        if size > STAND_IN_BYTES:
            return f"{score_count(spec):,} scores ({size / 2**20:.0f} MiB) are more than the reference stands in for"
        return None

    def forward(self, q, k, v, mask, spec, *, alibi=None, return_weights=False, dropout=None, sinks=None):
        with _blas_threads_while_helpers_compile():
            return self._forward(q, k, v, mask, spec, alibi, return_weights, dropout, sinks)

    def _forward(self, q, k, v, mask, spec, alibi, return_weights, dropout, sinks):
        qn, kn, vn, sinks_n, mask_n = map(_arrays.to_numpy, (q, k, v, sinks, mask))
        steps = _head_steps(spec, mask_n, dropout, return_weights)
        weights = None
        if spec.packed:
            out, lse = varlen_attention(
                qn, kn, vn, spec.cu_q, spec.cu_k, **_options(spec, alibi), **_packed_dropout(dropout), sinks=sinks_n,
                return_lse=True,
            )  # fmt: skip
        elif steps:  # a few kv heads at a time (_SCORES_PER_STEP_BYTES)
            parts = [reference_attention(
                qn[..., heads, :, :], kn[..., kv_heads, :, :], vn[..., kv_heads, :, :], return_lse=True,
                sinks=None if sinks_n is None else sinks_n[heads], **options,
            ) for heads, kv_heads, options in _steps_options(steps, spec, alibi, mask_n)]  # fmt: skip
            out = np.concatenate([part[0] for part in parts], axis=-3)  # (..., Hq, Nq, Dv)
            lse = np.concatenate([part[1] for part in parts], axis=-2)  # (..., Hq, Nq)
        else:
            result = reference_attention(
                qn, kn, vn, mask=mask_n, return_lse=True, return_weights=return_weights, sinks=sinks_n,
                **_dense_dropout(dropout, spec), **_options(spec, alibi),
            )  # fmt: skip
            out, lse = result[:2]
            weights = _arrays.like(result[2], q) if return_weights else None
        return _arrays.like(out, q), _arrays.like(lse, q, keep_dtype=True), weights

    def backward(self, q, k, v, mask, out, d_out, lse, spec, *, alibi=None, dropout=None):
        with _blas_threads_while_helpers_compile():
            return self._backward(q, k, v, mask, out, d_out, lse, spec, alibi, dropout)

    def mask_gradient(self, q, k, v, mask, out, d_out, lse, spec, *, alibi=None, dropout=None):
        """The gradient of an additive mask (dense calls), like mask: the scores' gradient summed to
        its shape, from the specification whatever backend ran the call (out and lse from any
        backend are the same function). The kernels never store the scores' gradient; it is as
        large as the mask broadcast to (..., Hq, Nq, Nk), which T5's learned position bias is.

        A few query heads at a time (_mask_gradient_steps), on one BLAS thread: a step's
        temporaries stay in the caches, and OpenBLAS's threads do not spin on the cores the
        kernels' next call needs. T5's bias step (python -m attnkit.bench.mask_gradient, B2 H8
        N512 D64 fp32) took 105-127 ms whole with NumPy's threads (torch: 71 ms)."""
        qn, kn, vn, on, don, lse_n = map(_arrays.to_numpy, (q, k, v, out, d_out, lse))
        mask_n = _arrays.to_numpy(mask)
        # the whole keep mask: the kernels' draws (the same bits) rather than the reference's NumPy ones
        keep = None if dropout is None else dropout.keep_drawn_by_kernels(spec)
        head_axis = mask_n.ndim >= 3 and mask_n.shape[-3] == spec.hq  # else the mask's heads broadcast: a sum
        parts = []
        with _one_blas_thread():
            for heads, kv_heads, options in _steps_options(_mask_gradient_steps(spec), spec, alibi, mask_n):
                drop = {} if keep is None else dict(dropout_p=dropout.p, dropout_keep=keep[..., heads, :, :])
                parts.append(attention_mask_gradient(
                    qn[..., heads, :, :], kn[..., kv_heads, :, :], vn[..., kv_heads, :, :], on[..., heads, :, :],
                    don[..., heads, :, :], lse_n[..., heads, :], **options, **drop,
                ))  # fmt: skip
        d_mask = np.concatenate(parts, axis=-3) if head_axis else sum(parts[1:], parts[0])
        return _arrays.like(d_mask, mask)

    def _backward(self, q, k, v, mask, out, d_out, lse, spec, alibi, dropout):
        arrays = tuple(map(_arrays.to_numpy, (q, k, v, out, d_out, lse)))
        mask_n = _arrays.to_numpy(mask)
        steps = _head_steps(spec, mask_n, dropout, False)
        if spec.packed:
            grads = varlen_attention_backward(
                *arrays, spec.cu_q, spec.cu_k, **_options(spec, alibi), **_packed_dropout(dropout)
            )
        elif steps:  # a few kv heads at a time (_SCORES_PER_STEP_BYTES): dK and dV of a kv head need only its group
            qn, kn, vn, on, don, lse_n = arrays
            parts = [reference_attention_backward(
                qn[..., heads, :, :], kn[..., kv_heads, :, :], vn[..., kv_heads, :, :], on[..., heads, :, :],
                don[..., heads, :, :], lse_n[..., heads, :], **options,
            ) for heads, kv_heads, options in _steps_options(steps, spec, alibi, mask_n)]  # fmt: skip
            grads = [np.concatenate([part[i] for part in parts], axis=-3) for i in range(3)]
        else:
            grads = reference_attention_backward(
                *arrays, mask=mask_n, **_dense_dropout(dropout, spec), **_options(spec, alibi),
            )  # fmt: skip
        return tuple(_arrays.like(g, x) for g, x in zip(grads, (q, k, v)))
