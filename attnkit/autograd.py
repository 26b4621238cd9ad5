"""torch autograd for any backend: its forward, then its backward from the saved lse."""

from __future__ import annotations

import torch

from .sinks import sink_gradient


class AttentionFunction(torch.autograd.Function):
    """Differentiable attention over q, k, v, the sinks and an additive mask (ALiBi slopes and lse
    are not differentiated).

    forward(q, k, v, mask, alibi, sinks, dropout, backend, spec, return_weights)
    returns (out, lse) or (out, lse, weights) from backend.forward, the sinks joined (attnkit.sinks),
    for dense calls (q (..., Hq, Nq, D)) and packed ones (q (Hq, total_q, D), spec.packed) alike.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, alibi, sinks, dropout, backend, spec, return_weights):
        with backend.preparing_backward(spec, dropout):
            out, lse, weights = backend.forward(
                q, k, v, mask, spec, alibi=alibi, return_weights=return_weights, dropout=dropout, sinks=sinks
            )
        ctx.save_for_backward(q, k, v, mask, alibi, sinks, out, lse)
        ctx.backend, ctx.spec, ctx.dropout = backend, spec, dropout  # the backward redraws dropout's mask
        # One call: a second mark_non_differentiable would replace the first.
        if return_weights:
            ctx.mark_non_differentiable(lse, weights)
            return out, lse, weights
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, *unused):
        q, k, v, mask, alibi, sinks, out, lse = ctx.saved_tensors
        d_out = d_out.contiguous()
        # out and lse include the sinks, so the backends' backward is already the sinks' backward.
        dq, dk, dv = ctx.backend.backward(
            q, k, v, mask, out, d_out, lse, ctx.spec,
            alibi=alibi, dropout=ctx.dropout,
        )
        d_sinks = d_mask = None
        if sinks is not None and ctx.needs_input_grad[5]:
            d_sinks = sink_gradient(out, d_out, lse, sinks)
        if ctx.needs_input_grad[3]:  # an additive mask that requires grad (a learned position bias)
            from .backends import BACKENDS

            d_mask = BACKENDS["reference"].mask_gradient(q, k, v, mask, out, d_out, lse, ctx.spec, alibi=alibi,
                                                         dropout=ctx.dropout)  # fmt: skip
        return dq, dk, dv, d_mask, None, d_sinks, None, None, None, None

