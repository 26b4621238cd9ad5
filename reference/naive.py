"""Attention as explicit Python loops: one query, one key, one number at a time.

For reading, not for running: it is the same mathematics as
reference.attention, with every loop written out so each step of the softmax
is visible. It takes minutes at N = 1000. Tests check it equals the vectorised
reference on small inputs.
"""

from __future__ import annotations

import math

import numpy as np

from .attention import compute_dtype, resolve_causal, resolve_scale


def key_is_visible(i, j, nq, nk, causal, window):
    """Whether query i may see key j, from causal alignment and the window alone."""
    position = i + (nk - nq if causal == "bottom_right" else 0)  # query i on the key axis
    if causal is not None and j > position:
        return False
    if window is not None:
        left, right = window
        if left is not None and j < position - left:
            return False
        if right is not None and j > position + right:
            return False
    return True


def naive_attention(
    q, k, v, *, causal=False, mask=None, scale=None, window=None, softcap=None, return_lse=False
):
    """Loop-by-loop attention. Arguments, shapes and results as in reference.attention.

    q (..., Hq, Nq, D), k (..., Hkv, Nk, D), v (..., Hkv, Nk, Dv),
    mask broadcastable to (..., Hq, Nq, Nk). Returns out (..., Hq, Nq, Dv),
    and lse (..., Hq, Nq) when return_lse is True.
    """
    causal = resolve_causal(causal)
    scale = resolve_scale(scale, q.shape[-1])
    ct = compute_dtype(q.dtype)

    batch = np.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    hq, nq, d = q.shape[-3:]
    hkv, nk, dv = v.shape[-3:]
    group = hq // hkv  # query heads per kv head
    q = np.broadcast_to(q, batch + q.shape[-3:])
    k = np.broadcast_to(k, batch + k.shape[-3:])
    v = np.broadcast_to(v, batch + v.shape[-3:])
    if mask is not None:
        mask = np.broadcast_to(mask, batch + (hq, nq, nk))

    out = np.zeros(batch + (hq, nq, dv), dtype=ct)
    lse = np.full(batch + (hq, nq), -np.inf, dtype=ct)
    for b in np.ndindex(*batch):
        for h in range(hq):
            kv_head = h // group  # GQA: consecutive query heads share a kv head
            for i in range(nq):
                # 1. one score per key; invisible keys get -inf
                scores = []
                for j in range(nk):
                    if not key_is_visible(i, j, nq, nk, causal, window):
                        scores.append(-math.inf)
                        continue
                    dot = 0.0
                    for c in range(d):
                        dot += float(q[b + (h, i, c)]) * float(k[b + (kv_head, j, c)])
                    s = scale * dot
                    if softcap is not None:
                        s = softcap * math.tanh(s / softcap)
                    if mask is not None:
                        m = mask[b + (h, i, j)]
                        if mask.dtype == np.bool_:
                            s = s if m else -math.inf
                        else:
                            s = s + float(m)
                    scores.append(s)

                # 2. softmax, shifted by the row's maximum so exp never overflows
                row_max = max(scores, default=-math.inf)
                if row_max == -math.inf:
                    continue  # no visible key: the output row stays 0, lse -inf
                exps = [math.exp(s - row_max) for s in scores]
                total = sum(exps)
                lse[b + (h, i)] = row_max + math.log(total)

                # 3. the weighted sum of the values
                for c in range(dv):
                    acc = 0.0
                    for j in range(nk):
                        acc += exps[j] / total * float(v[b + (kv_head, j, c)])
                    out[b + (h, i, c)] = acc

    out = out.astype(q.dtype)
    return (out, lse) if return_lse else out
