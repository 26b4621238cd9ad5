"""Packed sequences of different lengths: attnkit.varlen_attention (flash-attn's "varlen").

Sequence b is the queries cu_seqlens_q[b]:cu_seqlens_q[b+1] against the keys
cu_seqlens_k[b]:cu_seqlens_k[b+1]; the kernels run each at its own (Nq_b, Nk_b)
and nothing between them (no padding, no mask). The specification is
attnkit.reference.varlen_attention.

The same operation as attention(): one spec (validation.validate_packed),
one backend choice, one autograd Function; each backend lays packed
sequences out for its kernel (backends/cpu.py, backends/cuda.py).
"""

from __future__ import annotations

from . import _arrays
from .api import _attend_traced, _needs_grad, _traced, run_attention
from .backends import Request, choose_backend
from .dropout import draw_dropout
from .validation import dropout_probability, validate_packed

__all__ = ["varlen_attention"]


def varlen_attention(
    q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=False, align="bottom_right", scale=None, window=None,
    softcap=None, alibi_slopes=None, sinks=None, dropout_p=0.0, dropout_seed=None, return_lse=False, backend="auto",
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
        sinks: None, or a learned logit per query head (Hq,) joining every
            row's softmax (see attention()).
        dropout_p, dropout_seed: attention dropout, as attention()'s;
            sequence b draws the mask a dense call draws for batch entry b.
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
    traced = _traced(q)  # torch.compile, or no data: the offsets are data, read by the operator when it runs
    spec = validate_packed(
        q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, align=align, scale=scale, window=window,
        softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, read_offsets=not traced,
    )  # fmt: skip
    dropout_p = dropout_probability(dropout_p)
    if traced:
        out, lse = _attend_traced(q, k, v, None, alibi_slopes, spec, backend, return_weights=False,
                                  dropout_p=dropout_p, dropout_seed=dropout_seed, sinks=sinks,
                                  offsets=(cu_seqlens_q, cu_seqlens_k))  # fmt: skip
        return (out, lse) if return_lse else out
    grad = _needs_grad(spec, q, k, v, sinks)
    # The dense calls' chooser: same refusals, same AttnkitFallbackWarning (pointing at the caller).
    backend = choose_backend(spec, backend, Request(grad=grad, dropout=dropout_p > 0), stacklevel=3).backend
    out, lse, _ = run_attention(
        backend, spec, q, k, v, None, alibi_slopes, sinks, grad=grad,
        dropout=draw_dropout(dropout_p, dropout_seed, spec.kind),
    )  # fmt: skip
    return (out, lse) if return_lse else out
