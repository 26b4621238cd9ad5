"""Learned attention sinks (gpt-oss) on top of any backend: one extra logit per query head in every
row's softmax denominator, which carries no value.

With lse the log-sum-exp over the keys, the sink joins it as lse' = logaddexp(lse, sink), and every
weight, so the output, shrinks by exp(lse - lse'): exact, O(rows) work, the same on every device and
backend. The backward needs nothing new: the kernels' backward, given out' and lse', rebuilds the
sink-normalised probabilities and delta = rowsum(dO * out'), and dsink = -sum over rows of
p_sink * delta with p_sink = exp(sink - lse'). The specification is reference.attention(sinks=).
"""

from __future__ import annotations

import numpy as np

from . import _arrays


def _per_row(sinks, lse):
    """The sinks (Hq,) shaped to broadcast against lse (..., Hq, Nq) or packed (Hq, total)."""
    return sinks.reshape(sinks.shape + (1,))


def with_sinks(out, lse, sinks, weights=None):
    """(out', lse', weights'): the attention of out / lse / weights with each head's sink joined."""
    if _arrays.family(out) == "torch":
        import torch

        sink = _per_row(sinks.detach().to(lse.dtype), lse)
        joined = torch.logaddexp(lse, sink)
        shrink = torch.exp(lse - joined)  # 0 where no key was visible: the sink holds every weight
    else:
        sink = _per_row(np.asarray(sinks, lse.dtype), lse)
        joined = np.logaddexp(lse, sink)
        shrink = np.exp(lse - joined)
    out = out * shrink[..., None].to(out.dtype) if _arrays.family(out) == "torch" else \
        (out * shrink[..., None]).astype(out.dtype)  # fmt: skip
    if weights is not None:
        weights = weights * (shrink[..., None].to(weights.dtype) if _arrays.family(out) == "torch"
                             else shrink[..., None].astype(weights.dtype))  # fmt: skip
    return out, joined, weights


def sink_gradient(out, d_out, lse, sinks):
    """dsinks (Hq,) from the sink-joined out / lse and the gradient reaching out."""
    import torch

    compute = lse.dtype  # float32, float64 for float64 inputs
    delta = (d_out.to(compute) * out.to(compute)).sum(-1)  # (..., Hq, Nq) or (Hq, total)
    p_sink = torch.exp(_per_row(sinks.detach().to(compute), lse) - lse)
    per_head = -(p_sink * delta)
    return per_head.reshape(-1, sinks.shape[0], per_head.shape[-1]).sum(dim=(0, 2)).to(sinks.dtype)
