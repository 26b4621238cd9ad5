"""The Triton flash-attention kernels as torch operators: differentiable and torch.compile-traceable.

Two operators are registered in the `attnkit` namespace:

    torch.ops.attnkit.flash_attention_fwd(q, k, v, mask, scale, causal, window_left,
                                          window_right, softcap) -> (out, lse)
    torch.ops.attnkit.flash_attention_bwd(q, k, v, mask, out, d_out, lse, d_lse, scale,
                                          causal, window_left, window_right, softcap)
        -> (dq, dk, dv)

with causal coded 0 (none), 1 ("top_left"), 2 ("bottom_right") (attnkit.op_codes,
shared with the CPU operators of attnkit.cpu_ops). The forward
has an autograd formula (register_autograd) that calls the backward operator,
so gradients flow to q, k, v, through out and through lse as well.

On CUDA with torch >= 2.6 they are `torch.library.triton_op`s whose kernels
are launched through `wrap_triton`, so torch.compile sees the Triton kernels
themselves (no graph break, no opaque call). Under TRITON_INTERPRET=1, or on an
older torch, they are plain `torch.library.custom_op`s with a fake (meta)
implementation: still traceable by torch.compile as one opaque node.

`triton_attention(q, k, v, mask=None, *, scale, causal, window, softcap)` is
the friendly entry point; see its docstring.
"""

from __future__ import annotations

from typing import Optional

import torch

from .kernels import triton_attention as _kernels
from .op_codes import CAUSAL_CODES, CAUSAL_NAMES, window_of

__all__ = ["triton_attention", "flash_attention_fwd", "flash_attention_bwd", "USES_TRITON_OP"]

# triton_op + wrap_triton where they exist and a real GPU compiler runs the kernels;
# the interpreter's kernels cannot be traced through wrap_triton.
USES_TRITON_OP = hasattr(torch.library, "triton_op") and not _kernels.interpreting()


def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
         scale: float, causal: int, window_left: Optional[int], window_right: Optional[int],
         softcap: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    wrap = torch.library.wrap_triton if USES_TRITON_OP else None
    return _kernels.flash_forward(
        q, k, v, mask, scale=scale, causal=CAUSAL_NAMES[causal],
        window=window_of(window_left, window_right), softcap=softcap, _wrap=wrap,
    )


def _bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
         out: torch.Tensor, d_out: torch.Tensor, lse: torch.Tensor, d_lse: Optional[torch.Tensor],
         scale: float, causal: int, window_left: Optional[int], window_right: Optional[int],
         softcap: Optional[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    wrap = torch.library.wrap_triton if USES_TRITON_OP else None
    return _kernels.flash_backward(
        q, k, v, mask, out, d_out, lse, scale=scale, causal=CAUSAL_NAMES[causal],
        window=window_of(window_left, window_right), softcap=softcap, d_lse=d_lse, _wrap=wrap,
    )


def _fake_fwd(q, k, v, mask, scale, causal, window_left, window_right, softcap):
    b, hq, nq, _ = q.shape
    out = _kernels._empty_like_layout(q, (b, hq, nq, v.shape[3]))
    return out, q.new_empty((b, hq, nq), dtype=torch.float32)


def _fake_bwd(q, k, v, mask, out, d_out, lse, d_lse, scale, causal, window_left, window_right,
              softcap):
    return tuple(_kernels._empty_like_layout(x, tuple(x.shape)) for x in (q, k, v))


if USES_TRITON_OP:
    flash_attention_fwd = torch.library.triton_op("attnkit::flash_attention_fwd", mutates_args=())(_fwd)
    flash_attention_bwd = torch.library.triton_op("attnkit::flash_attention_bwd", mutates_args=())(_bwd)
else:
    flash_attention_fwd = torch.library.custom_op("attnkit::flash_attention_fwd", mutates_args=())(_fwd)
    flash_attention_bwd = torch.library.custom_op("attnkit::flash_attention_bwd", mutates_args=())(_bwd)
    flash_attention_fwd.register_fake(_fake_fwd)
    flash_attention_bwd.register_fake(_fake_bwd)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, scale, causal, window_left, window_right, softcap = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, mask, out, lse)
    ctx.options = (scale, causal, window_left, window_right, softcap)


def _backward(ctx, d_out, d_lse):
    q, k, v, mask, out, lse = ctx.saved_tensors
    if d_out is None:
        d_out = torch.zeros_like(out)
    dq, dk, dv = flash_attention_bwd(q, k, v, mask, out, d_out, lse, d_lse, *ctx.options)
    return dq, dk, dv, None, None, None, None, None, None


flash_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def triton_attention(q, k, v, mask=None, *, scale, causal=None, window=None, softcap=None):
    """Differentiable fused attention: returns (out (B, Hq, Nq, Dv), lse (B, Hq, Nq) float32).

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv): torch tensors on
    one CUDA device (CPU under TRITON_INTERPRET=1), one dtype (float16,
    bfloat16 or float32), any strides. mask: None, bool (True = attend) or
    additive float, broadcastable to (B, Hq, Nq, Nk), never differentiated.
    causal: None/False, True/"top_left" or "bottom_right". window: None or
    (left, right), None sides unlimited. softcap: None or a float > 0.
    Gradients flow to q, k and v through both out and lse.
    """
    if causal not in CAUSAL_CODES:
        raise ValueError(f"causal must be None, False, True, 'top_left' or 'bottom_right'; got {causal!r}")
    left, right = (None, None) if window is None else window
    return flash_attention_fwd(
        q, k, v, mask, float(scale), CAUSAL_CODES[causal],
        None if left is None else int(left), None if right is None else int(right),
        None if softcap is None else float(softcap),
    )
