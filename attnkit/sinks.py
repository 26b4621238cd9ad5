"""The gradient of learned attention sinks (gpt-oss): one extra logit per query head in every row's
softmax denominator, which carries no value.

The kernels join the sinks in the forward (each sink starts its rows' running max and sum, so out
and lse include it). The backward needs nothing new: the kernels' backward, given that out and lse,
rebuilds the sink-normalised probabilities and delta = rowsum(dO * out), and dsink = -sum over
rows of p_sink * delta with p_sink = exp(sink - lse): O(rows) work, here, the same on every device
and backend. The specification is reference.attention(sinks=).
"""

from __future__ import annotations


def sink_gradient(out, d_out, lse, sinks, d_lse=None):
    """dsinks (Hq,) from the sink-joined out / lse and the gradient reaching out (and lse, where a
    caller differentiates it: d lse / d sink = p_sink)."""
    import torch

    compute = lse.dtype  # float32, float64 for float64 inputs
    delta = (d_out.to(compute) * out.to(compute)).sum(-1)  # (..., Hq, Nq) or (Hq, total)
    if d_lse is not None:
        delta = delta - d_lse.to(compute)
    per_row = -torch.exp(sinks.detach().to(compute)[:, None] - lse) * delta  # -p_sink * delta
    # rows first, then the batch: a reshape would have to infer a size from no rows (Nq = 0)
    return per_row.sum(dim=-1).reshape(-1, sinks.shape[0]).sum(dim=0).to(sinks.dtype)
