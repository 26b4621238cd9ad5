"""Attention computed by code attnkit did not write: torch, in float64.

- sdpa_math: torch's SDPA math backend (forward and, through autograd, backward).
  Causal alignment, windows and boolean masks are folded into one explicit
  mask built here with torch ops, independently of attnkit.reference.
- flex: torch's FlexAttention (eager), for softcap and the log-sum-exp.
- softcap_autograd: scores -> tanh cap -> masks -> softmax -> values as plain
  torch ops, so autograd supplies the softcap gradients (FlexAttention has no
  CPU backward).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def _t(x):
    return None if x is None else torch.as_tensor(np.array(x))  # a writable copy


def visibility(nq, nk, causal, window):
    """(Nq, Nk) bool: True where causal alignment and the window allow the key."""
    offset = nk - nq if causal == "bottom_right" else 0
    i = torch.arange(nq).unsqueeze(1) + offset
    j = torch.arange(nk).unsqueeze(0)
    allowed = torch.ones(nq, nk, dtype=torch.bool)
    if causal in (True, "top_left", "bottom_right"):
        allowed = allowed & (j <= i)
    if window is not None:
        left, right = window
        if left is not None:
            allowed = allowed & (j >= i - left)
        if right is not None:
            allowed = allowed & (j <= i + right)
    return allowed


def combined_mask(nq, nk, mask, causal, window):
    """One SDPA attn_mask: bool when `mask` is bool or absent, additive when it is float."""
    allowed = visibility(nq, nk, causal, window)
    if mask is None:
        return allowed
    mask = _t(mask)
    if mask.dtype == torch.bool:
        return mask & allowed
    return mask.to(torch.float64).masked_fill(~allowed, float("-inf"))


def sdpa_math(q, k, v, *, causal=False, mask=None, scale=None, window=None, requires_grad=False):
    """torch SDPA (math backend, float64). Returns (out, (q, k, v) leaf tensors)."""
    tq, tk, tv = (_t(x).to(torch.float64).requires_grad_(requires_grad) for x in (q, k, v))
    gqa = tq.shape[-3] != tk.shape[-3]
    kwargs = dict(scale=scale, enable_gqa=gqa)
    if mask is None and window is None and causal in (True, "top_left"):
        kwargs["is_causal"] = True  # torch's own top-left alignment
    elif mask is not None or window is not None or causal:
        kwargs["attn_mask"] = combined_mask(tq.shape[-2], tk.shape[-2], mask, causal, window)
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(tq, tk, tv, **kwargs)
    return out, (tq, tk, tv)


def _score_mod(mask, softcap):
    """FlexAttention score_mod: tanh cap, then the additive or boolean mask."""
    def mod(score, b, h, i, j):
        if softcap is not None:
            score = softcap * torch.tanh(score / softcap)
        if mask is not None:
            m = mask[b, h, i, j]
            score = score + m if mask.dtype != torch.bool else torch.where(m, score, -float("inf"))
        return score
    return mod


def flex(q, k, v, *, causal=False, mask=None, scale=None, window=None, softcap=None):
    """FlexAttention forward, float64. Returns (out, lse). Leading axes must be (B, H)."""
    from torch.nn.attention.flex_attention import flex_attention

    tq, tk, tv = (_t(x).to(torch.float64) for x in (q, k, v))
    b, hq, nq = tq.shape[0], tq.shape[1], tq.shape[2]
    nk = tk.shape[2]
    full = torch.zeros(b, hq, nq, nk, dtype=torch.float64)
    full = full.masked_fill(~visibility(nq, nk, causal, window), float("-inf"))
    if mask is not None:
        m = _t(mask).expand(b, hq, nq, nk)
        full = full.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else full + m
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, lse = flex_attention(
            tq, tk, tv, score_mod=_score_mod(full, softcap), scale=scale,
            enable_gqa=hq != tk.shape[1], return_lse=True,
        )
    return out, lse


def softcap_autograd(q, k, v, *, softcap, causal=False, mask=None, scale=None, window=None):
    """Plain torch ops in float64 with autograd. Returns (out, (q, k, v) leaves)."""
    tq, tk, tv = (_t(x).to(torch.float64).requires_grad_(True) for x in (q, k, v))
    group = tq.shape[-3] // tk.shape[-3]
    kr, vr = tk.repeat_interleave(group, dim=-3), tv.repeat_interleave(group, dim=-3)
    scale = 1 / tq.shape[-1] ** 0.5 if scale is None else scale
    s = tq @ kr.transpose(-1, -2) * scale
    s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~visibility(tq.shape[-2], tk.shape[-2], causal, window), float("-inf"))
    if mask is not None:
        m = _t(mask)
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.to(s.dtype)
    p = torch.ops.aten._safe_softmax(s, -1)  # torch's softmax with 0 for fully masked rows
    return p @ vr, (tq, tk, tv)
