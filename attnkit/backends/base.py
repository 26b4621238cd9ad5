"""What every backend is: the interface the dispatcher (attnkit.backends) and autograd call.

A backend computes attention for a validated AttentionSpec, dense or packed
(spec.packed: q (Hq, total_q, D) with spec.cu_q / spec.cu_k), on the arrays the
caller gave, and returns results in their array type and device. It never
checks user input (validation did) and never chooses another backend.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass


class AttnkitFallbackWarning(UserWarning):
    """backend='auto' fell back to the NumPy reference, which is far slower."""


@dataclass(frozen=True)
class Request:
    """What a call asks for beyond the output itself."""

    return_weights: bool = False
    dropout: bool = False
    grad: bool = False


class Backend:
    """One way of computing attention. Subclasses override what they need.

    forward / backward take q, k, v as validated (dense (..., H, N, D), or packed
    (H, total, D)), the mask (dense calls) or None, the spec, and the ALiBi slopes
    ((Hq,) or (S, Hq), S the batch entries or packed sequences) when spec.alibi.
    """

    name = ""

    def unavailable_reason(self):
        """None if the backend can run on this machine, else why not."""
        return None

    def unsupported_reason(self, spec, request):
        """None if the backend can run this call, else why not."""
        return None

    def forward(self, q, k, v, mask, spec, *, alibi=None, return_weights=False, dropout=None, sinks=None):
        """Returns (out, lse, weights or None) in q's array type and device.

        dropout: None or an attnkit.dropout.Dropout (probability and seed); the
        weights returned, like lse, are those before dropout. sinks: None or
        (Hq,) logits joined into every row's softmax (lse includes them).
        """
        raise NotImplementedError

    def backward(self, q, k, v, mask, out, d_out, lse, spec, *, alibi=None, dropout=None):
        """Returns (dq, dk, dv) in the array type, device and dtype of q, k, v (dropout's mask
        regenerated from its seed; out and lse include any sinks, so the backward needs no more)."""
        raise NotImplementedError

    def compiled_for(self, spec, request):
        """Whether the call runs without compiling anything first (True by default: nothing to compile)."""
        return True

    def compile_in_background(self, spec, request, *, start=True):
        """Have what the call needs compiled elsewhere (helper processes) while this process goes on;
        True when that is under way. start=False: only say whether it could. False by default."""
        return False

    def preparing_backward(self, spec, dropout=None):
        """A context manager around a forward that a backward will follow: a backend that compiles
        lazily may prepare the backward meanwhile (nothing by default)."""
        return contextlib.nullcontext()

    def warmup(self, dtypes, *, backward=True, decode=True, processes=None):
        """Compile whatever the backend compiles lazily for calls of these dtypes (nothing by default),
        in up to `processes` processes at once where it can."""

    def product_path(self, spec):
        """A line on how this backend multiplies the call's tiles, or None."""
        return None


def kernel_options(spec):
    """The spec's attention options as keyword arguments for the kernels (dense and packed alike)."""
    return dict(causal=spec.causal, align=spec.align, scale=spec.scale, window=spec.window, softcap=spec.softcap)


def dropout_options(dropout):
    """The kernels' dropout keyword arguments (dropout_p, dropout_seed) for a Dropout or None; every
    kernel draws attnkit.reference.dropout's mask, a batch entry or packed sequence being a sequence."""
    return {} if dropout is None else dict(dropout_p=dropout.p, dropout_seed=dropout.seed)


def flash_refusal(request):
    """Why a flash kernel (which never forms the weight matrix) cannot run the request, or None."""
    if request.return_weights:
        return "return_weights needs the whole weight matrix, which a flash kernel never forms"
    return None
