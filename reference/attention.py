"""Attention, specified in NumPy.

This module is the definition every attnkit backend is tested against. It
materialises the whole score matrix, so it is exact and easy to read but needs
memory that grows as Nq * Nk; the kernels compute the same numbers in tiles.

Shapes (torch's scaled_dot_product_attention layout):

    q    (..., Hq,  Nq, D)        ... are leading (batch) axes; they broadcast
    k    (..., Hkv, Nk, D)        Hq must be a multiple of Hkv (GQA / MQA):
    v    (..., Hkv, Nk, Dv)       query head h reads kv head h // (Hq // Hkv)
    mask broadcastable to (..., Hq, Nq, Nk)
    out  (..., Hq,  Nq, Dv)
    lse  (..., Hq,  Nq)

The score of query i against key j is built in this order:

    s   = scale * q_i . k_j                      scaled dot product
    s   = softcap * tanh(s / softcap)            if softcap is given
    s   = s + mask_ij                            if mask is additive (float)
    s   = -inf where key j is not visible        causal, window, boolean mask

    p_ij = exp(s_ij - lse_i),  lse_i = log(sum_j exp(s_ij))
    out_i = sum_j p_ij v_j

A row whose keys are all invisible has out = 0, lse = -inf, weights = 0 and
zero gradients: never NaN.

Inputs here are assumed valid (attnkit.attention validates user input before
calling any backend). float16 is computed in float32 and returned as float16;
float64 stays float64 throughout.
"""

from __future__ import annotations

import math

import numpy as np

CAUSAL_MODES = ("top_left", "bottom_right")


def resolve_causal(causal):
    """Map the user's `causal` argument to None, "top_left" or "bottom_right".

    True means "top_left" (torch's is_causal: query i sees keys j <= i);
    "bottom_right" aligns the last query with the last key (flash-attn's
    convention, what a KV cache needs): query i sees keys j <= i + Nk - Nq.
    """
    if causal is None or isinstance(causal, (bool, np.bool_)):
        return "top_left" if causal else None
    if isinstance(causal, str) and causal in CAUSAL_MODES:
        return causal
    raise ValueError(
        f"causal must be False, True, 'top_left' or 'bottom_right'; got {causal!r}"
    )


def resolve_scale(scale, head_dim):
    """The softmax scale: `scale` itself, or 1/sqrt(head_dim) when it is None."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def compute_dtype(dtype):
    """float64 stays float64; everything else accumulates in float32."""
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def visible_range(nq, nk, *, causal=False, align="top_left", window=None):
    """The one visibility rule of attnkit: (lo, hi, diagonal) with query i seeing key j iff lo <= j - i <= hi.

    Query i sits at key position i + diagonal, diagonal = Nk - Nq aligned
    "bottom_right" (the last query on the last key) and 0 aligned "top_left".
    causal (a bool) hides keys past that position (hi = diagonal); window =
    (left, right) keeps diagonal - left <= j - i <= diagonal + right. A side
    that nothing limits is None. nq and nk may be ints or arrays (one entry
    per packed sequence). Dense calls take their alignment from causal
    (visible_keys); packed calls name it (attnkit.reference.varlen). The
    Numba planner and the Triton launcher read their offsets from here too.
    """
    diagonal = nk - nq if align == "bottom_right" else 0 * nk  # an int, or an array like nk
    lo = hi = None
    if causal:
        hi = diagonal
    if window is not None:
        left, right = window
        if left is not None:
            lo = diagonal - left
        if right is not None:
            hi = diagonal + right if hi is None else np.minimum(hi, diagonal + right)
    return lo, hi, diagonal


def dense_alignment(causal):
    """A dense call's causal argument as (causal: bool, align) for visible_range."""
    causal = resolve_causal(causal)
    return causal is not None, causal or "top_left"


def visible_keys(nq, nk, causal=None, window=None, align=None):
    """Which keys each query may see, from causal alignment and the window (visible_range).

    align (where the queries sit among the keys) defaults to causal's alignment.
    Returns a boolean array (Nq, Nk), True where query i may attend to key j,
    or None when every key is visible.
    """
    hides, default_align = dense_alignment(causal)
    align = align or default_align
    if not hides and window is None:
        return None
    lo, hi, _ = visible_range(nq, nk, causal=hides, align=align, window=window)
    return visible_between(nq, nk, lo, hi)


def visible_between(nq, nk, lo, hi):
    """(Nq, Nk) booleans: lo <= j - i <= hi, None sides unlimited."""
    distance = np.arange(nk)[None, :] - np.arange(nq)[:, None]  # (Nq, Nk) j - i
    visible = np.ones((nq, nk), dtype=bool)
    if lo is not None:
        visible &= distance >= lo
    if hi is not None:
        visible &= distance <= hi
    return visible


def _expand_kv_heads(x, hq):
    """Repeat kv heads so head h of the result is kv head h // (Hq // Hkv)."""
    # (..., Hkv, Nk, X) -> (..., Hq, Nk, X), repeat_interleave (not tile)
    return np.repeat(x, hq // x.shape[-3], axis=-3)


def key_positions(nq, nk, align):
    """(Nq, Nk) position - j: how far each key sits from each query's position."""
    offset = nk - nq if align == "bottom_right" else 0
    return (np.arange(nq)[:, None] + offset) - np.arange(nk)[None, :]


def alibi_bias(slopes, nq, nk, align, dtype):
    """ALiBi's -slope * |position - j|: (..., Hq, Nq, Nk) from slopes (..., Hq)."""
    distance = np.abs(key_positions(nq, nk, align)).astype(dtype)  # (Nq, Nk)
    return -np.asarray(slopes, dtype)[..., None, None] * distance


def _scores(q, k, *, causal, mask, scale, window, softcap, align=None, alibi_slopes=None):
    """Masked scaled scores, plus what the backward pass needs.

    Returns (s, visible, tanh_capped):
      s           (..., Hq, Nq, Nk)  scores with -inf where a key is invisible
      visible     bool broadcastable to s, or None when all keys are visible
      tanh_capped tanh(raw / softcap) (for the softcap derivative) or None
    """
    s = np.matmul(q, np.swapaxes(_expand_kv_heads(k, q.shape[-3]), -1, -2))
    s *= s.dtype.type(scale)  # (..., Hq, Nq, Nk)
    tanh_capped = None
    if softcap is not None:
        tanh_capped = np.tanh(s / softcap)
        s = softcap * tanh_capped
    visible = visible_keys(q.shape[-2], k.shape[-2], causal, window, align)
    if alibi_slopes is not None:
        s = s + alibi_bias(alibi_slopes, q.shape[-2], k.shape[-2], align or dense_alignment(causal)[1], s.dtype)
    if mask is not None:
        if mask.dtype == np.bool_:
            visible = mask if visible is None else (visible & mask)
        else:
            s = s + mask.astype(s.dtype)
    if visible is not None:
        s = np.where(visible, s, s.dtype.type(-np.inf))
    return s, visible, tanh_capped


def _dropout_factor(dropout_p, dropout_keep, dtype):
    """keep / (1 - p) as an array broadcastable to the weights, or None."""
    if not dropout_p:
        return None
    if dropout_keep is None:
        raise ValueError("dropout_p > 0 needs dropout_keep, the boolean mask of kept weights")
    rescale = 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)
    return np.asarray(dropout_keep, dtype=dtype) * dtype(rescale)


def attention(
    q, k, v, *, causal=False, mask=None, scale=None, window=None, softcap=None, return_lse=False,
    return_weights=False, dropout_p=0.0, dropout_keep=None, align=None, alibi_slopes=None, sinks=None,
):  # fmt: skip
    """softmax(scale * q k^T, masked) v, materialising the score matrix.

    Args:
        q: (..., Hq, Nq, D) queries.
        k: (..., Hkv, Nk, D) keys; Hq % Hkv == 0.
        v: (..., Hkv, Nk, Dv) values.
        causal: False, True (= "top_left") or "bottom_right"; see visible_keys.
        mask: boolean (True = may attend) or additive float, broadcastable to
            (..., Hq, Nq, Nk).
        scale: multiplies q.k; default 1/sqrt(D). Any finite float.
        window: (left, right) sliding window around each query's position
            (after causal alignment); None on a side means unlimited.
        softcap: if given, scores become softcap * tanh(scores / softcap)
            before the mask is applied.
        return_lse: also return the natural-log log-sum-exp of each row,
            (..., Hq, Nq), float32 (float64 for float64 inputs); -inf for a
            row with no visible key.
        return_weights: also return the attention weights (..., Hq, Nq, Nk)
            in q's dtype.
        dropout_p, dropout_keep: dropout on the weights as torch does it:
            weights * keep / (1 - p), keep a boolean array broadcastable to
            (..., Hq, Nq, Nk). lse and the returned weights are before dropout.
        align: where query i sits among the keys, for the window and ALiBi:
            "top_left" (position i) or "bottom_right" (i + Nk - Nq); default
            causal's alignment, "top_left" without causal.
        alibi_slopes: None, or slopes (..., Hq) broadcasting to the batch:
            scores get -slope * |position - j| after the softcap.
        sinks: None, or one logit per query head (Hq,) (gpt-oss's learned
            attention sinks): an extra score in every row's softmax that
            carries no value, so out = sum_j p_j v_j with the p_j summing to
            1 - p_sink; lse includes it. A row that sees no key puts all its
            weight on the sink (out 0, lse = the sink).

    Returns:
        out (..., Hq, Nq, Dv) in q's dtype, followed by lse and then weights
        when asked for (a tuple whenever more than `out` is returned).

    Inputs with fewer than three axes are read as a single head.
    """
    squeeze = q.ndim < 3 and k.ndim < 3 and v.ndim < 3
    q, k, v = (x.reshape((1,) * (3 - x.ndim) + x.shape) if x.ndim < 3 else x for x in (q, k, v))
    ct = compute_dtype(q.dtype)
    scale = resolve_scale(scale, q.shape[-1])
    qc, kc, vc = q.astype(ct), k.astype(ct), v.astype(ct)

    batch = np.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    hq, nq, nk, dv = q.shape[-3], q.shape[-2], k.shape[-2], v.shape[-1]

    if nk == 0 and sinks is None:
        # No keys at all: every row is fully masked.
        out = np.zeros(batch + (hq, nq, dv), dtype=ct)
        lse = np.full(batch + (hq, nq), -np.inf, dtype=ct)
        weights = np.zeros(batch + (hq, nq, 0), dtype=ct)
    else:
        s, _, _ = _scores(
            qc, kc, causal=causal, mask=mask, scale=scale, window=window, softcap=softcap, align=align,
            alibi_slopes=alibi_slopes,
        )  # (..., Hq, Nq, Nk)
        s = np.broadcast_to(s, batch + s.shape[-3:])
        if sinks is not None:  # the sink as one more key, last, whose value is zero
            sink_column = np.broadcast_to(np.asarray(sinks, ct)[:, None, None], batch + (hq, nq, 1))
            s = np.concatenate([s, sink_column], axis=-1)  # (..., Hq, Nq, Nk + 1)
        row_max = s.max(axis=-1, keepdims=True)  # (..., Hq, Nq, 1)
        # A fully masked row has max -inf; shifting it by 0 keeps exp(-inf) = 0.
        row_max = np.where(row_max == -np.inf, ct(0), row_max)
        p = np.exp(s - row_max)  # (..., Hq, Nq, Nk)
        row_sum = p.sum(axis=-1, keepdims=True)  # (..., Hq, Nq, 1)
        with np.errstate(divide="ignore"):
            lse = (row_max + np.log(row_sum))[..., 0]  # log(0) = -inf on empty rows
        # Divide only where the sum is non-zero (NaN sums still divide, so NaN
        # inputs stay visible instead of being zeroed).
        weights = np.divide(p, row_sum, out=np.zeros_like(p), where=row_sum != 0)
        if sinks is not None:
            weights = weights[..., :nk]  # the sink's share goes nowhere
        drop = _dropout_factor(dropout_p, dropout_keep, ct)
        kept = weights if drop is None else weights * drop
        out = np.matmul(kept, _expand_kv_heads(vc, hq))  # (..., Hq, Nq, Dv)

    out_dtype = q.dtype
    results = [out.astype(out_dtype, copy=False)]
    if return_lse:
        results.append(lse.astype(ct, copy=False))
    if return_weights:
        results.append(weights.astype(out_dtype, copy=False))
    if squeeze:
        results = [r[0] for r in results]
    return results[0] if len(results) == 1 else tuple(results)


def sum_to_shape(x, shape):
    """Sum a broadcast gradient back down to the shape of the input it came from."""
    extra = x.ndim - len(shape)
    x = x.sum(axis=tuple(range(extra))) if extra else x
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(axis=axes, keepdims=True) if axes else x


def attention_backward(
    q, k, v, out, d_out, lse, *, causal=False, mask=None, scale=None, window=None, softcap=None, dropout_p=0.0,
    dropout_keep=None, align=None, alibi_slopes=None, sinks=None,
):  # fmt: skip
    """Gradients of attention() with respect to q, k and v (and the sinks, when given).

    FlashAttention-2's formulation, written densely: the probabilities are
    rebuilt from the saved lse, and delta_i = sum_c dO_ic O_ic replaces the
    softmax Jacobian's row sum.

    Args:
        q, k, v, and the keyword arguments: exactly as given to attention().
        out: (..., Hq, Nq, Dv) the forward output.
        d_out: (..., Hq, Nq, Dv) gradient of the loss with respect to out.
        lse: (..., Hq, Nq) the forward's log-sum-exp.

    Returns:
        (dq, dk, dv) with the shapes and dtypes of q, k and v, then dsinks
        (Hq,) when sinks are given: -sum over rows of p_sink * delta, since the
        sink's score moves every row's normaliser and carries no value.
        Gradients from query heads that share a kv head, and from broadcast
        leading axes, are summed. Rows with no visible key contribute nothing
        to dq, dk, dv.
    """
    return _gradients(
        q, k, v, out, d_out, lse, causal=causal, mask=mask, scale=scale, window=window, softcap=softcap,
        dropout_p=dropout_p, dropout_keep=dropout_keep, align=align, alibi_slopes=alibi_slopes, sinks=sinks,
    )  # fmt: skip


def attention_mask_gradient(
    q, k, v, out, d_out, lse, *, mask, causal=False, scale=None, window=None, softcap=None, dropout_p=0.0,
    dropout_keep=None, align=None, alibi_slopes=None,
):  # fmt: skip
    """The gradient of attention() with respect to an additive (float) mask, with the mask's shape
    and dtype: the mask is added to the scores after the softcap, so its gradient is the scores'
    gradient p * (dp - delta) of attention_backward, summed over the axes the mask broadcasts.
    Arguments as for attention_backward."""
    if mask is None or np.asarray(mask).dtype == np.bool_:
        raise ValueError("attention_mask_gradient needs an additive (float) mask; a boolean one has no gradient")
    return _gradients(
        q, k, v, out, d_out, lse, causal=causal, mask=mask, scale=scale, window=window, softcap=softcap,
        dropout_p=dropout_p, dropout_keep=dropout_keep, align=align, alibi_slopes=alibi_slopes, of_mask=True,
    )  # fmt: skip


def _gradients(
    q, k, v, out, d_out, lse, *, causal, mask, scale, window, softcap, dropout_p, dropout_keep, align,
    alibi_slopes, sinks=None, of_mask=False,
):  # fmt: skip
    """attention_backward's gradients, or with of_mask the mask's alone (dq, dk, dv not formed)."""
    shapes = (q.shape, k.shape, v.shape)
    q, k, v = (x.reshape((1,) * (3 - x.ndim) + x.shape) if x.ndim < 3 else x for x in (q, k, v))
    ct = compute_dtype(q.dtype)
    scale = resolve_scale(scale, q.shape[-1])
    qc, kc, vc = q.astype(ct), k.astype(ct), v.astype(ct)
    hq, hkv, nk = q.shape[-3], k.shape[-3], k.shape[-2]
    batch = np.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    lead = batch + (hq, q.shape[-2])
    out = np.asarray(out, dtype=ct).reshape(lead + (v.shape[-1],))  # (..., Hq, Nq, Dv)
    d_out = np.asarray(d_out, dtype=ct).reshape(out.shape)  # (..., Hq, Nq, Dv)
    lse = np.asarray(lse, dtype=ct).reshape(lead)  # (..., Hq, Nq)

    delta = np.sum(d_out * out, axis=-1, keepdims=True)  # (..., Hq, Nq, 1)
    d_sinks = None
    if sinks is not None:  # p_sink = exp(sink - lse); d(loss)/d(sink) = -p_sink * delta, summed over rows
        p_sink = np.exp(np.asarray(sinks, ct)[:, None] - lse)  # (..., Hq, Nq)
        d_sinks = -(p_sink * delta[..., 0]).sum(axis=-1).reshape(-1, hq).sum(axis=0)
        d_sinks = d_sinks.astype(np.asarray(sinks).dtype)
    extra = () if sinks is None else (d_sinks,)
    if nk == 0:
        if of_mask:
            return np.zeros(np.shape(mask), np.asarray(mask).dtype)
        grads = (np.zeros(shapes[0], ct), np.zeros(shapes[1], ct), np.zeros(shapes[2], ct))
        grads = tuple(g.astype(x.dtype) for g, x in zip(grads, (q, k, v)))
        return grads + extra

    s, _, tanh_capped = _scores(
        qc, kc, causal=causal, mask=mask, scale=scale, window=window, softcap=softcap, align=align,
        alibi_slopes=alibi_slopes,
    )  # (..., Hq, Nq, Nk)
    safe_lse = np.where(lse == -np.inf, ct(0), lse)[..., None]  # (..., Hq, Nq, 1)
    p = np.exp(s - safe_lse)  # weights; exactly 0 for invisible keys
    drop = _dropout_factor(dropout_p, dropout_keep, ct)

    v_rep = _expand_kv_heads(vc, hq)  # (..., Hq, Nk, Dv)
    dp = np.matmul(d_out, np.swapaxes(v_rep, -1, -2))  # (..., Hq, Nq, Nk)
    if drop is not None:
        dp = dp * drop
    ds = p * (dp - delta)  # gradient of the (capped, masked) scores
    if of_mask:  # the mask is added after the softcap: its gradient is this one
        return sum_to_shape(ds, np.shape(mask)).astype(np.asarray(mask).dtype)
    kept = p if drop is None else p * drop
    dv_rep = np.matmul(np.swapaxes(kept, -1, -2), d_out)  # (..., Hq, Nk, Dv)
    if tanh_capped is not None:
        ds = ds * (1 - tanh_capped * tanh_capped)
    ds = ds * ct(scale)  # now the gradient of q.k

    dq = np.matmul(ds, _expand_kv_heads(kc, hq))  # (..., Hq, Nq, D)
    dk_rep = np.matmul(np.swapaxes(ds, -1, -2), np.broadcast_to(qc, batch + qc.shape[-3:]))

    def fold_heads(g):
        # (..., Hq, Nk, X) -> (..., Hkv, Nk, X): sum the query heads of each group
        return g.reshape(g.shape[:-3] + (hkv, hq // hkv) + g.shape[-2:]).sum(axis=-3)

    dk, dv = fold_heads(dk_rep), fold_heads(dv_rep)
    grads = []
    for g, x, shape in zip((dq, dk, dv), (q, k, v), shapes):
        g = sum_to_shape(g, x.shape).reshape(shape)
        grads.append(np.ascontiguousarray(g.astype(x.dtype, copy=False)))
    return tuple(grads) + extra
