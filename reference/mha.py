"""Multi-head attention from token embeddings, in NumPy.

The layer around the attention kernel: project tokens to queries, keys and
values, split the projections into heads, attend, merge the heads and project
back. Weights use the mathematical convention y = x @ w (+ b), so w has shape
(in_features, out_features); torch.nn.Linear stores the transpose.
"""

from __future__ import annotations

import numpy as np

from .attention import attention


def _split_heads(x, num_heads):
    # (..., N, H*Dh) -> (..., H, N, Dh)
    *lead, n, width = x.shape
    return np.swapaxes(x.reshape(*lead, n, num_heads, width // num_heads), -2, -3)


def _merge_heads(x):
    # (..., H, N, Dh) -> (..., N, H*Dh)
    x = np.swapaxes(x, -2, -3)
    return x.reshape(x.shape[:-2] + (x.shape[-2] * x.shape[-1],))


def _project(x, w, b):
    y = x @ w
    return y if b is None else y + b


def multi_head_attention(
    x,
    w_q,
    w_k,
    w_v,
    w_o,
    num_heads,
    *,
    context=None,
    b_q=None,
    b_k=None,
    b_v=None,
    b_o=None,
    causal=False,
    mask=None,
    scale=None,
    window=None,
    softcap=None,
    return_weights=False,
):
    """Self-attention (context=None) or cross-attention over `context`.

    Shapes (E = model width, Dh = head width, Hkv = kv heads):
        x        (..., N, E)            the tokens that ask (queries)
        context  (..., M, Ec)           the tokens attended to; default x (M = N)
        w_q      (E, H * Dh)            b_q (H * Dh,)
        w_k      (Ec, Hkv * Dh)         b_k (Hkv * Dh,)
        w_v      (Ec, Hkv * Dv)         b_v (Hkv * Dv,)
        w_o      (H * Dv, Eo)           b_o (Eo,)
        mask     broadcastable to (..., H, N, M)
    Hkv is read from w_k's width, so fewer kv heads than query heads (GQA)
    needs no extra argument.

    Returns:
        y (..., N, Eo), and the per-head attention weights (..., H, N, M)
        when return_weights is True.
    """
    context = x if context is None else context
    if w_q.shape[1] % num_heads:
        raise ValueError(
            f"w_q has {w_q.shape[1]} output features, which num_heads={num_heads} does not divide"
        )
    head_dim = w_q.shape[1] // num_heads
    if w_k.shape[1] % head_dim:
        raise ValueError(
            f"w_k has {w_k.shape[1]} output features; expected a multiple of the head width {head_dim}"
        )
    kv_heads = w_k.shape[1] // head_dim
    if w_v.shape[1] % kv_heads:
        raise ValueError(
            f"w_v has {w_v.shape[1]} output features; expected a multiple of the {kv_heads} kv heads"
        )

    q = _split_heads(_project(x, w_q, b_q), num_heads)  # (..., H, N, Dh)
    k = _split_heads(_project(context, w_k, b_k), kv_heads)  # (..., Hkv, M, Dh)
    v = _split_heads(_project(context, w_v, b_v), kv_heads)  # (..., Hkv, M, Dv)
    out, weights = attention(
        q, k, v, causal=causal, mask=mask, scale=scale, window=window, softcap=softcap,
        return_weights=True,
    )  # (..., H, N, Dv), (..., H, N, M)
    y = _project(_merge_heads(out), w_o, b_o)  # (..., N, Eo)
    return (y, weights) if return_weights else y
