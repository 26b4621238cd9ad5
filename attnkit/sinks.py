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


def with_sinks(out, lse, sinks, weights=None):
    """(out', lse', weights'): the attention of out / lse / weights with each head's sink joined.

    lse is (..., Hq, Nq), or (Hq, total) for packed calls: sinks[:, None] lines up with both.
    A row that saw no key (lse -inf) keeps out 0: the sink holds all of its weight.
    """
    if _arrays.family(out) == "torch":
        import torch

        joined = torch.logaddexp(lse, sinks.detach().to(lse.dtype)[:, None])
        shrink = torch.exp(lse - joined)[..., None]
        scaled = [None if x is None else x * shrink.to(x.dtype) for x in (out, weights)]
    else:
        joined = np.logaddexp(lse, np.asarray(sinks, lse.dtype)[:, None])
        shrink = np.exp(lse - joined)[..., None]
        scaled = [None if x is None else (x * shrink).astype(x.dtype) for x in (out, weights)]
    return scaled[0], joined, scaled[1]


def sink_gradient(out, d_out, lse, sinks):
    """dsinks (Hq,) from the sink-joined out / lse and the gradient reaching out."""
    import torch

    compute = lse.dtype  # float32, float64 for float64 inputs
    delta = (d_out.to(compute) * out.to(compute)).sum(-1)  # (..., Hq, Nq) or (Hq, total)
    per_row = -torch.exp(sinks.detach().to(compute)[:, None] - lse) * delta  # -p_sink * delta
    return per_row.reshape(-1, sinks.shape[0], per_row.shape[-1]).sum(dim=(0, 2)).to(sinks.dtype)
