"""Packed sequences of different lengths (flash-attn's "varlen"), one at a time.

The specification of attnkit.varlen_attention and of the attnkit.flash_attn
functions: sequence b is queries q[:, cu_q[b]:cu_q[b+1]] against keys and values
[cu_k[b], cu_k[b+1]) and nothing else, computed by attention() on its own.

Where a sequence's queries sit among its keys is `align`: "bottom_right"
(flash-attn's convention: query i at key position i + Nk - Nq, so the last query
meets the last key, as when decoding against a cache) or "top_left" (position
i). Causal, the window and ALiBi all measure from that position:
- causal keeps keys j <= position;
- window (left, right) keeps position - left <= j <= position + right;
- ALiBi adds -slope_h * |position - j| to the score (after the softcap).
"""

from __future__ import annotations

import numpy as np

from .attention import (
    CAUSAL_MODES, alibi_bias, attention, attention_backward, compute_dtype, visible_between, visible_range,
)
from .dropout import keep_mask

ALIGNMENTS = CAUSAL_MODES


def sequence_bias(nq, nk, hq, *, causal, align, window, slopes, dtype):
    """The additive mask (Hq or 1, Nq, Nk) of one sequence: 0 or -inf, plus ALiBi's -slope * distance."""
    lo, hi, _ = visible_range(nq, nk, causal=causal, align=align, window=window)
    visible = visible_between(nq, nk, lo, hi)
    bias = np.where(visible, 0.0, -np.inf).astype(dtype)[None]  # (1, Nq, Nk)
    if slopes is not None:
        bias = bias + alibi_bias(np.asarray(slopes).reshape(hq), nq, nk, align, dtype)
    return bias


def _sequences(cu_seqlens_q, cu_seqlens_k):
    cu_q, cu_k = (np.asarray(c, np.int64) for c in (cu_seqlens_q, cu_seqlens_k))
    return [(slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])) for b in range(len(cu_q) - 1)]


def _slopes_of(alibi_slopes, b):
    if alibi_slopes is None:
        return None
    slopes = np.asarray(alibi_slopes)
    return slopes[b] if slopes.ndim == 2 else slopes


def _sequence_dropout(dropout_p, dropout_seed, b, hq, nq, nk):
    """attention()'s dropout arguments for sequence b."""
    if not dropout_p:
        return {}
    return dict(dropout_p=dropout_p, dropout_keep=keep_mask(dropout_seed, dropout_p, 1, hq, nq, nk, first_sequence=b)[0])


def varlen_attention(
    q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=False, align="bottom_right", scale=None, window=None,
    softcap=None, alibi_slopes=None, return_lse=False, dropout_p=0.0, dropout_seed=None, sinks=None,
):  # fmt: skip
    """Attention of every packed sequence on its own.

    Args:
        q: (Hq, total_q, D) queries of all sequences, one after another.
        k: (Hkv, total_k, D) keys; v: (Hkv, total_k, Dv) values.
        cu_seqlens_q, cu_seqlens_k: (B + 1,) integer offsets; sequence b is
            rows cu_seqlens_q[b]:cu_seqlens_q[b + 1] of q against
            cu_seqlens_k[b]:cu_seqlens_k[b + 1] of k and v.
        causal, align, window: see the module docstring.
        softcap, scale: as in attention().
        alibi_slopes: None, (Hq,) or (B, Hq).
        return_lse: also return lse (Hq, total_q).
        dropout_p, dropout_seed: dropout by reference.dropout's keep mask of the
            seed, sequence b being its sequence b.
        sinks: None or (Hq,) learned logits joining every row's softmax (see
            attention()); a row that sees no key gives 0 and lse = its sink.

    Returns:
        out (Hq, total_q, Dv) in q's dtype (rows of no sequence are 0), and lse
        (float32, float64 for float64; -inf for a row that sees no key).
    """
    ct = compute_dtype(q.dtype)
    hq, total_q = q.shape[0], q.shape[1]
    out = np.zeros((hq, total_q, v.shape[-1]), q.dtype)
    lse = np.full((hq, total_q), -np.inf, ct)
    for b, (rows, keys) in enumerate(_sequences(cu_seqlens_q, cu_seqlens_k)):
        nq, nk = rows.stop - rows.start, keys.stop - keys.start
        bias = sequence_bias(
            nq, nk, hq, causal=causal, align=align, window=window, slopes=_slopes_of(alibi_slopes, b), dtype=ct
        )  # fmt: skip
        out[:, rows], lse[:, rows] = attention(
            q[:, rows], k[:, keys], v[:, keys], mask=bias, scale=scale, softcap=softcap, return_lse=True,
            sinks=sinks, **_sequence_dropout(dropout_p, dropout_seed, b, hq, nq, nk),
        )  # fmt: skip
    return (out, lse) if return_lse else out


def varlen_attention_backward(
    q, k, v, out, d_out, lse, cu_seqlens_q, cu_seqlens_k, *, causal=False, align="bottom_right", scale=None,
    window=None, softcap=None, alibi_slopes=None, dropout_p=0.0, dropout_seed=None,
):  # fmt: skip
    """Gradients (dq, dk, dv) of varlen_attention, shaped like q, k and v (zero outside every sequence)."""
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    hq = q.shape[0]
    for b, (rows, keys) in enumerate(_sequences(cu_seqlens_q, cu_seqlens_k)):
        nq, nk = rows.stop - rows.start, keys.stop - keys.start
        bias = sequence_bias(
            nq, nk, hq, causal=causal, align=align, window=window, slopes=_slopes_of(alibi_slopes, b),
            dtype=compute_dtype(q.dtype),
        )  # fmt: skip
        dq[:, rows], dk[:, keys], dv[:, keys] = attention_backward(
            q[:, rows], k[:, keys], v[:, keys], out[:, rows], d_out[:, rows], lse[:, rows],
            mask=bias, scale=scale, softcap=softcap, **_sequence_dropout(dropout_p, dropout_seed, b, hq, nq, nk),
        )  # fmt: skip
    return dq, dk, dv
