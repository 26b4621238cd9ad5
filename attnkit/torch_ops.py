"""attnkit's kernels as torch operators, both devices: differentiable and torch.compile-traceable.

    torch.ops.attnkit.numba_attention_fwd(q, k, v, mask, alibi, scale, causal, align, window_left,
                                          window_right, softcap, dropout_p=0.0, dropout_seed=0,
                                          sinks=None, seed=None, cu_seqlens_q=None,
                                          cu_seqlens_k=None) -> (out, lse)
    torch.ops.attnkit.numba_attention_bwd(q, k, v, mask, alibi, out, d_out, lse, scale, causal,
                                          align, window_left, window_right, softcap, dropout_p=0.0,
                                          dropout_seed=0, sinks=None, seed=None, cu_seqlens_q=None,
                                          cu_seqlens_k=None) -> (dq, dk, dv)
    torch.ops.attnkit.flash_attention_fwd(...)  the Triton kernels, same arguments
    torch.ops.attnkit.flash_attention_bwd(q, k, v, mask, alibi, out, d_out, lse, d_lse, ...)

Options are coded by attnkit.op_codes (one table for both devices): causal and
align 0 (none), 1 ("top_left"), 2 ("bottom_right"); dropout by its probability
and seed (attnkit.reference.dropout's mask); the CPU pair also takes the seed as a
0-d int64 tensor (`seed`, used instead of dropout_seed when given), which a
compiled graph draws from torch's generator on every call (an int would be a
constant of the graph: the same mask every step). sinks (Hq,) join the forward's
softmax; the backward takes them only to mirror the forward's arguments (out
and lse already include them). Each forward has an autograd formula
(register_autograd) calling its backward operator and giving the sinks their
gradient (attnkit.sinks); the Triton pair also carries the gradient that reaches
lse (d_lse), the CPU pair does not (lse is returned for callers that want it,
not differentiated, as in eager calls).

CPU (numba_*): q (..., Hq, Nq, D), k (..., Hkv, Nk, D), v (..., Hkv, Nk, Dv) with
broadcasting leading axes, as the public API takes them; or, with cu_seqlens_q and
cu_seqlens_k (int32 / int64 tensors), a packed call's q (Hq, total_q, D), k, v
(Hkv, total_k, D) as varlen_attention takes them, the offsets read and checked when
the operator runs (causal then means the alignment `align`). custom_ops with fake
implementations. Under torch.compile each call is one opaque node: nothing
inside it (NumPy, Numba, logging) is traced. Eager CPU calls do not go through
them (the dispatcher adds ~10 µs per call); attnkit.api routes a call here while
torch.compile traces it, for tensors without data (meta, fake: only the fake
implementations run), and while a torch dispatch mode is active (FlopCounterMode,
which counts them with FLOP_FORMULAS).

CUDA (flash_*): q (B, Hq, Nq, D), ...; on CUDA with torch >= 2.6 they are
`torch.library.triton_op`s launching through `wrap_triton`, so torch.compile
sees the Triton kernels themselves. Under TRITON_INTERPRET=1, or on an older
torch, they are custom_ops with a fake implementation. The CUDA backend always
calls them. `triton_attention(q, k, v, mask=None, *, scale, ...)` is the
friendly entry point.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ._arrays import holds_no_data
from .op_codes import CAUSAL_CODES, CAUSAL_NAMES, window_of
from .sinks import sink_gradient

__all__ = [
    "numba_attention_fwd", "numba_attention_bwd", "flash_attention_fwd", "flash_attention_bwd", "triton_attention",
    "USES_TRITON_OP",
]  # fmt: skip


def _kernel_options(scale, causal, align, window_left, window_right, softcap):
    """The operators' coded options as the launchers' keyword arguments."""
    return dict(scale=scale, causal=CAUSAL_NAMES[causal], align=CAUSAL_NAMES[align],
                window=window_of(window_left, window_right), softcap=softcap)  # fmt: skip


def _dropout(dropout_p, dropout_seed, seed=None):
    """The operators' dropout arguments as an attnkit.dropout.Dropout, or None (seed: the CPU
    operators' 0-d tensor, used instead of dropout_seed when given)."""
    from .dropout import Dropout

    return Dropout(dropout_p, dropout_seed if seed is None else int(seed)) if dropout_p > 0 else None


_SINKS_OPTION = 8  # the sinks' place among the options (after scale ... dropout_seed)


def _register_autograd(forward, backward, passes_d_lse):
    """forward's gradient through backward: (q, k, v, mask, alibi, *options) -> (out, lse).

    The backward needs only out and lse, which include the sinks; the sinks' own gradient comes
    from them too (attnkit.sinks.sink_gradient, plus what reaches lse where lse is differentiated).
    The other options get none. Tensors among the options (the sinks, a seed) are saved for the
    backward like the inputs.
    """

    def setup_context(ctx, inputs, output):
        q, k, v, mask, alibi, *options = inputs
        ctx.tensor_options = [i for i, option in enumerate(options) if isinstance(option, torch.Tensor)]
        ctx.save_for_backward(q, k, v, mask, alibi, *output, *(options[i] for i in ctx.tensor_options))
        ctx.options = [None if i in ctx.tensor_options else option for i, option in enumerate(options)]

    def differentiate(ctx, d_out, d_lse):
        q, k, v, mask, alibi, out, lse, *saved_options = ctx.saved_tensors
        options = list(ctx.options)
        for i, option in zip(ctx.tensor_options, saved_options):
            options[i] = option
        if d_out is None:
            d_out = torch.zeros_like(out)
        # First derivatives only: the gradients carry no graph of their own (a second
        # backward through them raises instead of returning something wrong).
        tensors = [x.detach() for x in (q, k, v)] + [mask, alibi, out.detach(), d_out.detach(), lse.detach()]
        if passes_d_lse:
            tensors.append(d_lse)
        dq, dk, dv = backward(*tensors, *options)
        grads = [None] * (2 + len(options))
        sinks = options[_SINKS_OPTION] if len(options) > _SINKS_OPTION else None
        if sinks is not None and ctx.needs_input_grad[5 + _SINKS_OPTION]:
            grads[2 + _SINKS_OPTION] = sink_gradient(out.detach(), d_out.detach(), lse.detach(), sinks,
                                                     d_lse if passes_d_lse else None)  # fmt: skip
        return (dq, dk, dv) + tuple(grads)

    forward.register_autograd(differentiate, setup_context=setup_context)


# ---------------------------------------------------------------------------
# CPU: the Numba kernel through attnkit.backends.cpu
# ---------------------------------------------------------------------------


def _cpu_spec(q, k, v, mask, alibi, scale, causal, align, window_left, window_right, softcap, cu_seqlens_q,
              cu_seqlens_k):  # fmt: skip
    """The validated spec of the operators' arguments: a packed call's when it has offsets."""
    from .validation import validate_attention, validate_packed

    options = _kernel_options(scale, causal, align, window_left, window_right, softcap)
    if cu_seqlens_q is None and cu_seqlens_k is None:
        return validate_attention(q, k, v, mask=mask, alibi_slopes=alibi, **options)
    options["causal"] = options["causal"] is not None  # packed calls: a bool, and the alignment apart
    return validate_packed(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes=alibi, **options)


@torch.library.custom_op("attnkit::numba_attention_fwd", mutates_args=())
def numba_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], alibi: Optional[torch.Tensor],
    scale: float, causal: int, align: int, window_left: Optional[int], window_right: Optional[int],
    softcap: Optional[float], dropout_p: float = 0.0, dropout_seed: int = 0, sinks: Optional[torch.Tensor] = None,
    seed: Optional[torch.Tensor] = None, cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    from .backends import BACKENDS

    spec = _cpu_spec(q, k, v, mask, alibi, scale, causal, align, window_left, window_right, softcap, cu_seqlens_q,
                     cu_seqlens_k)  # fmt: skip
    dropout = _dropout(dropout_p, dropout_seed, seed)
    out, lse, _ = BACKENDS["numba"].forward(q, k, v, mask, spec, alibi=alibi, dropout=dropout, sinks=sinks)
    return out, lse


@torch.library.custom_op("attnkit::numba_attention_bwd", mutates_args=())
def numba_attention_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], alibi: Optional[torch.Tensor],
    out: torch.Tensor, d_out: torch.Tensor, lse: torch.Tensor, scale: float, causal: int, align: int,
    window_left: Optional[int], window_right: Optional[int], softcap: Optional[float], dropout_p: float = 0.0,
    dropout_seed: int = 0, sinks: Optional[torch.Tensor] = None, seed: Optional[torch.Tensor] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    from .backends import BACKENDS

    spec = _cpu_spec(q, k, v, mask, alibi, scale, causal, align, window_left, window_right, softcap, cu_seqlens_q,
                     cu_seqlens_k)  # fmt: skip
    dropout = _dropout(dropout_p, dropout_seed, seed)
    return BACKENDS["numba"].backward(q, k, v, mask, out, d_out.contiguous(), lse, spec, alibi=alibi, dropout=dropout)


@numba_attention_fwd.register_fake
def _numba_fake_fwd(q, k, v, mask, alibi, *options):
    batch = torch.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    hq, nq = q.shape[-3], q.shape[-2]
    out = q.new_empty(tuple(batch) + (hq, nq, v.shape[-1]))
    lse = q.new_empty(tuple(batch) + (hq, nq), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    return out, lse


@numba_attention_bwd.register_fake
def _numba_fake_bwd(q, k, v, *rest):
    # contiguous whatever the inputs' strides, as the kernel's results are (empty_like would keep a
    # transposed k's strides, and Inductor asserts them: transformers hands k in as such a view)
    return tuple(x.new_empty(x.shape) for x in (q, k, v))


_register_autograd(numba_attention_fwd, numba_attention_bwd, passes_d_lse=False)


# ---------------------------------------------------------------------------
# CUDA: the Triton kernels (kernels/triton_attention.py)
# ---------------------------------------------------------------------------


def _triton():
    from .kernels import triton_attention

    return triton_attention


def _uses_triton_op():
    """triton_op + wrap_triton where they exist and a real GPU compiler runs the kernels;
    the interpreter's kernels cannot be traced through wrap_triton. A CPU-only build of torch
    never launches the CUDA operators: custom_ops there, which import neither Triton nor
    Inductor (a triton_op imports torch._inductor: ~1 s of every first traced or
    tensor-without-data call). (Asking torch.cuda.is_available() instead would initialise CUDA
    in a process that may fork DataLoader workers.)"""
    if not hasattr(torch.library, "triton_op") or not torch.backends.cuda.is_built():
        return False
    try:
        return not _triton().interpreting()
    except ImportError:  # no triton: the CUDA operators are never launched
        return False


USES_TRITON_OP = _uses_triton_op()


def _flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
               alibi: Optional[torch.Tensor], scale: float, causal: int, align: int, window_left: Optional[int],
               window_right: Optional[int], softcap: Optional[float], dropout_p: float = 0.0,
               dropout_seed: int = 0, sinks: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    wrap = torch.library.wrap_triton if USES_TRITON_OP else None
    options = _kernel_options(scale, causal, align, window_left, window_right, softcap)
    return _triton().flash_forward(q, k, v, mask, alibi=alibi, **options, dropout_p=dropout_p,
                                   dropout_seed=dropout_seed, sinks=sinks, _wrap=wrap)  # fmt: skip


def _flash_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
               alibi: Optional[torch.Tensor], out: torch.Tensor, d_out: torch.Tensor, lse: torch.Tensor,
               d_lse: Optional[torch.Tensor], scale: float, causal: int, align: int, window_left: Optional[int],
               window_right: Optional[int], softcap: Optional[float], dropout_p: float = 0.0, dropout_seed: int = 0,
               sinks: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    wrap = torch.library.wrap_triton if USES_TRITON_OP else None
    options = _kernel_options(scale, causal, align, window_left, window_right, softcap)
    return _triton().flash_backward(q, k, v, mask, out, d_out, lse, alibi=alibi, d_lse=d_lse, **options,
                                    dropout_p=dropout_p, dropout_seed=dropout_seed, _wrap=wrap)  # fmt: skip


def _flash_fake_fwd(q, k, v, mask, alibi, *options):
    b, hq, nq, _ = q.shape
    out = _triton()._empty_like_layout(q, (b, hq, nq, v.shape[3]))
    return out, q.new_empty((b, hq, nq), dtype=torch.float32)


def _flash_fake_bwd(q, k, v, *rest):
    return tuple(_triton()._empty_like_layout(x, tuple(x.shape)) for x in (q, k, v))


if USES_TRITON_OP:
    flash_attention_fwd = torch.library.triton_op("attnkit::flash_attention_fwd", mutates_args=())(_flash_fwd)
    flash_attention_bwd = torch.library.triton_op("attnkit::flash_attention_bwd", mutates_args=())(_flash_bwd)
else:
    flash_attention_fwd = torch.library.custom_op("attnkit::flash_attention_fwd", mutates_args=())(_flash_fwd)
    flash_attention_bwd = torch.library.custom_op("attnkit::flash_attention_bwd", mutates_args=())(_flash_bwd)
    flash_attention_fwd.register_fake(_flash_fake_fwd)
    flash_attention_bwd.register_fake(_flash_fake_bwd)
_register_autograd(flash_attention_fwd, flash_attention_bwd, passes_d_lse=True)


# ---------------------------------------------------------------------------
# FLOPs for torch.utils.flop_counter.FlopCounterMode
# ---------------------------------------------------------------------------


def _score_count(q, k, cu_seqlens_q, cu_seqlens_k):
    """How many scores the call forms, times Hq: per batch entry Nq * Nk; a packed call's
    sequences each on their own. Offsets without data (fake, meta) give the most there could be,
    total_q * total_k (torch's count for its own varlen kernels takes the worst case too)."""
    if cu_seqlens_q is None:
        batch = torch.broadcast_shapes(q.shape[:-3], k.shape[:-3])
        return math.prod(batch) * q.shape[-3] * q.shape[-2] * k.shape[-2]
    if holds_no_data(cu_seqlens_q) or holds_no_data(cu_seqlens_k):
        return q.shape[0] * q.shape[1] * k.shape[1]
    lengths_q, lengths_k = (x.detach().cpu().to(torch.int64).diff() for x in (cu_seqlens_q, cu_seqlens_k))
    return q.shape[0] * int((lengths_q * lengths_k).sum())


def _forward_flops(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None):
    """torch's count for its SDPA kernels (torch.utils.flop_counter.sdpa_flop_count): the two
    products, 2 * D and 2 * Dv per score; masks, causality and windows do not reduce it."""
    return 2 * _score_count(q, k, cu_seqlens_q, cu_seqlens_k) * (q.shape[-1] + v.shape[-1])


def _backward_flops(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None):
    """torch's count for its SDPA backward: the scores again and dP (2 * D, 2 * Dv per score), then
    dV, dQ and dK (2 * Dv, 2 * D, 2 * D)."""
    return 2 * _score_count(q, k, cu_seqlens_q, cu_seqlens_k) * (3 * q.shape[-1] + 2 * v.shape[-1])


# Raw arguments, as the operators were called: the offsets are the forward's 16th and 17th
# arguments and the backward's 19th and 20th (the Triton pair takes none).
def _numba_forward_flops(q, k, v, *args, out_val=None, **kwargs):
    offsets = list(args[12:14]) + [None, None]
    return _forward_flops(q, k, v, kwargs.get("cu_seqlens_q", offsets[0]), kwargs.get("cu_seqlens_k", offsets[1]))


def _numba_backward_flops(q, k, v, *args, out_val=None, **kwargs):
    offsets = list(args[15:17]) + [None, None]
    return _backward_flops(q, k, v, kwargs.get("cu_seqlens_q", offsets[0]), kwargs.get("cu_seqlens_k", offsets[1]))


def _flash_forward_flops(q, k, v, *args, out_val=None, **kwargs):
    return _forward_flops(q, k, v)


def _flash_backward_flops(q, k, v, *args, out_val=None, **kwargs):
    return _backward_flops(q, k, v)


def _raw(formula):
    formula._get_raw = True  # what register_flop_formula(get_raw=True) marks: FlopCounterMode passes the tensors
    return formula


FLOP_FORMULAS = {
    torch.ops.attnkit.numba_attention_fwd: _raw(_numba_forward_flops),
    torch.ops.attnkit.numba_attention_bwd: _raw(_numba_backward_flops),
    torch.ops.attnkit.flash_attention_fwd: _raw(_flash_forward_flops),
    torch.ops.attnkit.flash_attention_bwd: _raw(_flash_backward_flops),
}


def count_flops_in_active_modes():
    """Give FlopCounterModes that are counting now attnkit's formulas. torch's registry
    (torch.utils.flop_counter.register_flop_formula) is copied by each FlopCounterMode when it is
    made, which is usually before attnkit's first call imports these operators; importing
    torch.utils.flop_counter here at import would cost ~0.16 s (it imports Triton). Called by the
    calls that go through the operators while a torch dispatch mode is active."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    for mode in _get_current_dispatch_mode_stack():
        registry = getattr(getattr(mode, "counter", None), "flop_registry", None)
        if isinstance(registry, dict):
            for packet, formula in FLOP_FORMULAS.items():
                registry.setdefault(packet, formula)


def triton_attention(q, k, v, mask=None, *, scale, causal=None, window=None, softcap=None, align=None, alibi=None):
    """Differentiable fused attention: returns (out (B, Hq, Nq, Dv), lse (B, Hq, Nq) float32).

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv): torch tensors on
    one CUDA device (CPU under TRITON_INTERPRET=1), one dtype (float16,
    bfloat16 or float32), any strides. mask: None, bool (True = attend) or
    additive float, broadcastable to (B, Hq, Nq, Nk), never differentiated.
    causal: None/False, True/"top_left" or "bottom_right". window: None or
    (left, right), None sides unlimited. softcap: None or a float > 0. align:
    where queries sit for the window and ALiBi (default causal's). alibi: None,
    (Hq,) or (B, Hq) slopes. Gradients flow to q, k and v through both out and lse.
    """
    for name, value in (("causal", causal), ("align", align)):
        if value not in CAUSAL_CODES:
            raise ValueError(f"{name} must be None, False, True, 'top_left' or 'bottom_right'; got {value!r}")
    left, right = (None, None) if window is None else window
    return flash_attention_fwd(
        q, k, v, mask, alibi, float(scale), CAUSAL_CODES[causal], CAUSAL_CODES[align or causal or "top_left"],
        None if left is None else int(left), None if right is None else int(right),
        None if softcap is None else float(softcap),
    )
