"""The Numba CPU kernel as torch operators, so that torch.compile traces attnkit on CPU tensors.

    torch.ops.attnkit.numba_attention_fwd(q, k, v, mask, scale, causal, window_left,
                                          window_right, softcap) -> (out, lse)
    torch.ops.attnkit.numba_attention_bwd(q, k, v, mask, out, d_out, lse, scale, causal,
                                          window_left, window_right, softcap) -> (dq, dk, dv)

Shapes are the public API's: q (..., Hq, Nq, D), k (..., Hkv, Nk, D), v (..., Hkv,
Nk, Dv) with broadcasting leading axes; out (..., Hq, Nq, Dv), lse (..., Hq, Nq)
float32 (float64 for float64 input); dq, dk, dv shaped like q, k, v. causal is
coded 0 (none), 1 ("top_left"), 2 ("bottom_right"): attnkit.op_codes, shared with
attnkit.triton_ops.

Both are `torch.library.custom_op`s with fake implementations (shapes and
dtypes only), and the forward has an autograd formula (register_autograd)
calling the backward operator. Under torch.compile each call is one opaque
node in the graph: nothing inside it (NumPy, Numba, logging) is traced.
Eager calls of attnkit do not go through them (the dispatcher adds ~10 µs per
call); attnkit.api routes a call here only while torch.compile traces it.
"""

from __future__ import annotations

from typing import Optional

import torch

from .backends import BACKENDS
from .op_codes import CAUSAL_NAMES, window_of
from .validation import validate_attention

__all__ = ["numba_attention_fwd", "numba_attention_bwd"]


def _spec(q, k, v, mask, scale, causal, window_left, window_right, softcap):
    return validate_attention(q, k, v, causal=CAUSAL_NAMES[causal], mask=mask, scale=scale,
                              window=window_of(window_left, window_right), softcap=softcap)  # fmt: skip


@torch.library.custom_op("attnkit::numba_attention_fwd", mutates_args=())
def numba_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
    causal: int, window_left: Optional[int], window_right: Optional[int], softcap: Optional[float],
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    spec = _spec(q, k, v, mask, scale, causal, window_left, window_right, softcap)
    out, lse, _ = BACKENDS["numba"].forward(q, k, v, mask, spec)
    return out, lse


@torch.library.custom_op("attnkit::numba_attention_bwd", mutates_args=())
def numba_attention_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], out: torch.Tensor,
    d_out: torch.Tensor, lse: torch.Tensor, scale: float, causal: int, window_left: Optional[int],
    window_right: Optional[int], softcap: Optional[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    spec = _spec(q, k, v, mask, scale, causal, window_left, window_right, softcap)
    return BACKENDS["numba"].backward(q, k, v, mask, out, d_out.contiguous(), lse, spec)


@numba_attention_fwd.register_fake
def _fake_fwd(q, k, v, mask, scale, causal, window_left, window_right, softcap):
    batch = torch.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    hq, nq = q.shape[-3], q.shape[-2]
    out = q.new_empty(tuple(batch) + (hq, nq, v.shape[-1]))
    lse = q.new_empty(tuple(batch) + (hq, nq), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    return out, lse


@numba_attention_bwd.register_fake
def _fake_bwd(q, k, v, mask, out, d_out, lse, scale, causal, window_left, window_right, softcap):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, *options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, mask, out, lse)
    ctx.options = options


def _backward(ctx, d_out, d_lse):
    # lse is an output for callers that want it (return_lse), not a differentiable one:
    # the eager path marks it non-differentiable too.
    q, k, v, mask, out, lse = ctx.saved_tensors
    if d_out is None:
        d_out = torch.zeros_like(out)
    # First derivatives only: the gradients carry no graph of their own (a second
    # backward through them raises instead of returning something wrong).
    dq, dk, dv = numba_attention_bwd(
        *(x.detach() for x in (q, k, v)), mask, out.detach(), d_out.detach(), lse.detach(), *ctx.options
    )
    return dq, dk, dv, None, None, None, None, None, None


numba_attention_fwd.register_autograd(_backward, setup_context=_setup_context)
