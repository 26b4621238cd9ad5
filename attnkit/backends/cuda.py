"""The Triton kernels on CUDA tensors: host-side preparation for kernels/triton_attention.py.

Dense calls fold their batch axes to one (a view when they already are one)
and run through attnkit.torch_ops's operators, which torch.compile traces;
packed calls hand the launcher their host offsets.
"""

from __future__ import annotations

import math

from .. import _layout
from ..op_codes import operator_options
from .base import Backend, dropout_options, flash_refusal, kernel_options


def _fold(x, spec):
    """(*batch, H, N, D) as (B, H, N, D): a view when the batch is one axis already."""
    x = x.expand(spec.batch + tuple(x.shape[-3:]))
    return x if len(spec.batch) == 1 else x.reshape((math.prod(spec.batch),) + tuple(x.shape[-3:]))


def _mask(mask, spec):
    if mask is None:
        return None
    mask = mask.reshape((1,) * (len(spec.batch) + 3 - mask.dim()) + tuple(mask.shape))
    if len(spec.batch) == 1:
        return mask  # 4-D, broadcast axes kept as size 1 (stride 0 in the kernel)
    return _fold(mask.expand(spec.batch + tuple(mask.shape[-3:])), spec)


class TritonBackend(Backend):
    """The fused Triton kernel (kernels/triton_attention.py) on CUDA tensors.

    Dense calls run through the torch.library operators of attnkit.torch_ops,
    so torch.compile traces them. On a machine without CUDA it is available
    only under TRITON_INTERPRET=1 (the CPU interpreter, for tests), and only
    when asked for by name.
    """

    name = "triton"

    def unavailable_reason(self):
        try:
            from ..kernels.triton_attention import interpreting
        except Exception as error:  # no triton, or triton failing to initialise
            return f"the Triton kernel cannot be imported ({type(error).__name__}: {error})"
        import torch

        if not torch.cuda.is_available() and not interpreting():
            return "no CUDA device (TRITON_INTERPRET=1 runs it on the CPU interpreter)"
        return None

    def unsupported_reason(self, spec, request):
        if spec.kind != "torch":
            return "it takes torch tensors"
        refusal = flash_refusal(request)
        if refusal:
            return refusal
        import torch

        from ..kernels.triton_attention import why_unsupported

        return why_unsupported(getattr(torch, spec.dtype), spec.d, spec.dv, spec.device)

    def forward(self, q, k, v, mask, spec, *, alibi=None, return_weights=False, dropout=None, sinks=None):
        sinks = None if sinks is None else sinks.detach()
        if spec.packed:
            from ..kernels.triton_attention import varlen_forward

            out, lse = varlen_forward(
                q, k, v, spec.cu_q, spec.cu_k, **kernel_options(spec), alibi=alibi, **dropout_options(dropout),
                sinks=sinks,
            )
            return out, lse, None
        from ..torch_ops import flash_attention_fwd

        out, lse = flash_attention_fwd(
            *(_fold(x, spec) for x in (q, k, v)), _mask(mask, spec), alibi, *operator_options(spec, dropout), sinks
        )  # (B, Hq, Nq, Dv), (B, Hq, Nq)
        return out.reshape(spec.out_shape), lse.reshape(spec.batch + (spec.hq, spec.nq)), None

    def backward(self, q, k, v, mask, out, d_out, lse, spec, *, alibi=None, dropout=None):
        if spec.packed:
            from ..kernels.triton_attention import varlen_backward

            return varlen_backward(q, k, v, out, d_out.contiguous(), lse, spec.cu_q, spec.cu_k,
                                   **kernel_options(spec), alibi=alibi, **dropout_options(dropout))  # fmt: skip
        from ..torch_ops import flash_attention_bwd

        folded = [_fold(x, spec) for x in (q, k, v, out, d_out)]
        lse = lse.reshape((-1, spec.hq, spec.nq))
        grads = flash_attention_bwd(
            *folded[:3], _mask(mask, spec), alibi, folded[3], folded[4], lse, None, *operator_options(spec, dropout)
        )  # (B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Dv)
        return tuple(  # sum_to_shape works on tensors too (torch takes axis=/keepdims=)
            _layout.sum_to_shape(g.reshape(spec.batch + tuple(g.shape[1:])), tuple(x.shape))
            for g, x in zip(grads, (q, k, v))
        )
