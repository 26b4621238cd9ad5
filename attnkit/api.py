"""The public functions: attention(), scaled_dot_product_attention(), explain().

Each call flows one way: validate the arguments, choose a backend, run it (under
torch autograd when a tensor requires grad), and hand back the input's array
type, device and dtype.
"""

from __future__ import annotations

import sys

import numpy as np

from . import _arrays, planned
from .backends import Request, backend_status, choose_backend
from .dropout import Dropout, draw_dropout, seed_tensor
from .op_codes import operator_options
from .validation import as_heads, dropout_probability, validate_attention, validate_packed


def _needs_grad(spec, q, k, v, sinks=None, mask=None):
    if spec.kind != "torch":
        return False
    import torch

    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, sinks, mask))


def _mask_needs_grad(mask):
    """An additive torch mask that requires grad, with grad enabled (a boolean one cannot)."""
    return _arrays.is_tensor(mask) and mask.requires_grad and sys.modules["torch"].is_grad_enabled()


def _compiling():
    """True while torch.compile (dynamo) traces the call."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.compiler.is_compiling()


def _traced(q):
    """True when a call on q goes through attnkit's torch operators (_attend_traced) rather than a
    backend: while torch.compile traces it, and for tensors that hold no data (meta tensors, and
    FakeTensorMode's fake ones: shape propagation, FLOP and memory estimates), which the operators'
    fake implementations answer with results of the right shapes and dtypes."""
    return _arrays.is_tensor(q) and (_compiling() or _arrays.holds_no_data(q))


def _dispatch_mode_active():
    """True while a torch dispatch mode is active (FlopCounterMode, a memory tracker, a debug log):
    such modes see torch operators only, so CPU kernel calls then go through attnkit's."""
    torch = sys.modules.get("torch")
    return torch is not None and torch._C._len_torch_dispatch_stack() > 0


def _attend_traced(q, k, v, mask, alibi, spec, backend, *, return_weights, dropout_p, dropout_seed, sinks,
                   offsets=None):  # fmt: skip
    """(out, lse) through attnkit's torch operators, for torch.compile: one graph node each.

    Backend choice, NumPy and Numba stay inside the operators, out of the trace. Dropout's seed is
    drawn inside the graph (a 0-d tensor from torch's generator: a fresh mask every call, repeated
    by torch.manual_seed); the operators' autograd gives the sinks their gradient. offsets: a
    packed call's (cu_seqlens_q, cu_seqlens_k) tensors, which the operator reads when it runs.
    Tensors without data (meta, fake) outside torch.compile take the CPU operators on any device:
    only their fake implementations run, which give every feature's shapes.
    """
    compiling = _compiling()
    where = "under torch.compile" if compiling else "on tensors without data (meta or fake)"
    instead = "outside the compiled region" if compiling else "on tensors that hold data"
    if return_weights:
        raise ValueError(f"return_weights needs the NumPy reference, which cannot run {where}; "
                         f"call attnkit {instead} for it")
    if _mask_needs_grad(mask):
        raise ValueError(f"the mask requires grad: its gradient is not available {where}; call attnkit {instead} "
                         "for it, or detach the mask")
    device_type = spec.device.split(":")[0] if compiling else "cpu"
    wanted = {"cpu": "numba", "cuda": "triton"}.get(device_type)
    from .backends import BACKENDS, check_backend_name

    check_backend_name(backend)  # without data any backend's results have the operators' shapes
    if compiling and backend not in ("auto", wanted):
        raise ValueError(
            f"under torch.compile attnkit runs {wanted!r} on {device_type} tensors; got backend={backend!r}"
        )
    if offsets is not None:
        for name, x in zip(("cu_seqlens_q", "cu_seqlens_k"), offsets):
            if not _arrays.is_tensor(x):
                raise TypeError(f"{where} {name} must be a torch.Tensor; got {_arrays.type_name(x)}")
    if not compiling and _dispatch_mode_active():  # (dynamo cannot trace the check)
        from .torch_ops import count_flops_in_active_modes

        count_flops_in_active_modes()
    if device_type == "cpu":
        from .torch_ops import numba_attention_fwd

        seed = seed_tensor(dropout_p, dropout_seed) if dropout_p > 0 else None
        options = operator_options(spec, Dropout(dropout_p, 0) if dropout_p > 0 else None)
        return numba_attention_fwd(q, k, v, mask, alibi, *options, sinks, seed, *(offsets or (None, None)))
    if offsets is not None:
        raise ValueError(
            "packed sequences (cu_seqlens) are traced by torch.compile on CPU tensors only so far; on CUDA "
            "tensors call attnkit outside the compiled region for them"
        )
    if dropout_p > 0 or sinks is not None:
        raise ValueError(
            "dropout and sinks are traced by torch.compile on CPU tensors only so far; on CUDA tensors "
            "call attnkit outside the compiled region for them"
        )
    out, lse, _ = BACKENDS["triton"].forward(q, k, v, mask, spec, alibi=alibi)
    return out, lse


# Plans: what a call's validity and backend choice depend on, computed once per
# distinct signature (shapes, strides, dtypes, devices, grad, mask layout,
# options) and reused. Small calls spend most of their time on exactly this.
_PLANS = {}
_MAX_PLANS = 1024


def _signature(x):
    """What validation and the backend choice read of an input (never its values)."""
    if x is None:
        return None
    if isinstance(x, np.ndarray):
        return (np.ndarray, x.shape, x.strides, x.dtype)
    if _arrays.is_tensor(x):
        return (type(x), x.shape, x.stride(), x.dtype, x.device, x.requires_grad)
    return False  # not an array: no plan, validation reports it


def _plan_key(q, k, v, mask, options, alibi=None, sinks=None):
    """The plan cache key of a call, or None when the call must not use a plan."""
    signatures = tuple(_signature(x) for x in (q, k, v, mask, alibi, sinks))
    if False in signatures or _traced(q):
        return None
    torch = sys.modules.get("torch")
    grad_mode = torch.is_grad_enabled() if torch is not None else False
    key = signatures + (grad_mode, options)
    try:
        hash(key)
    except TypeError:  # an option given as a list, say: validated on every call instead
        return None
    return key


def cached_plans():
    """How many call signatures have a plan in the cache (at most 1,024; then it starts over)."""
    return len(_PLANS)


def clear_plans():
    """Empty the plan caches: every next call validates and chooses its backend afresh."""
    _PLANS.clear()
    planned.clear()


def _planned(key, make):
    """(spec, choice) for the plan key, made by make() on first sight.

    Only plans whose choice is a fused kernel are kept: a fall-back to the
    reference warns on every call, as it should.
    """
    plan = _PLANS.get(key) if key is not None else None
    if plan is None:
        plan = make()
        if key is not None and plan[1] is not None and plan[1].backend.name != "reference":
            if len(_PLANS) >= _MAX_PLANS:
                _PLANS.clear()
            _PLANS[key] = plan
    return plan


def _torch_offsets(offsets):
    """A validated spec's host offsets as the int64 tensor attnkit's CPU operator reads."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(offsets, np.int64))


def run_attention(backend, spec, q, k, v, mask=None, alibi=None, sinks=None, *, grad, dropout=None,
                  return_weights=False):  # fmt: skip
    """(out, lse, weights or None) of one validated call, dense or packed: under the autograd
    Function when grad (torch is imported only then), else the backend's forward (which joins the sinks).
    dropout: None or an attnkit.dropout.Dropout. While a torch dispatch mode is active, a Numba call
    on tensors runs as attnkit's torch operator (its own autograd), which the mode sees and
    FlopCounterMode counts."""
    if spec.kind == "torch" and _dispatch_mode_active():
        from .torch_ops import count_flops_in_active_modes, numba_attention_fwd

        count_flops_in_active_modes()  # (the Triton backend calls its operators on every call)
        if backend.name == "numba" and not return_weights and not _mask_needs_grad(mask):
            # (the operator's autograd gives a mask no gradient)
            offsets = (_torch_offsets(spec.cu_q), _torch_offsets(spec.cu_k)) if spec.packed else (None, None)
            options = operator_options(spec, dropout)
            out, lse = numba_attention_fwd(q, k, v, mask, alibi, *options, sinks, None, *offsets)
            return out, lse, None
    if grad:
        from .autograd import AttentionFunction

        results = AttentionFunction.apply(q, k, v, mask, alibi, sinks, dropout, backend, spec, return_weights)
        return results[0], results[1], results[2] if return_weights else None
    return backend.forward(q, k, v, mask, spec, alibi=alibi, return_weights=return_weights, dropout=dropout, sinks=sinks)


def _attend(q, k, v, mask, spec, backend, *, return_lse, return_weights, dropout_p=0.0, dropout_seed=None,
            choice=None, alibi=None, sinks=None):  # fmt: skip
    q, k, v = as_heads(q), as_heads(k), as_heads(v)  # (..., H, N, D)
    if _traced(q):
        out, lse = _attend_traced(q, k, v, mask, alibi, spec, backend, return_weights=return_weights,
                                  dropout_p=dropout_p, dropout_seed=dropout_seed, sinks=sinks)  # fmt: skip
        results = [out] + [lse] * return_lse
        if spec.squeeze:
            results = [r[0] for r in results]
        return results[0] if len(results) == 1 else tuple(results)
    grad = _needs_grad(spec, q, k, v, sinks, mask)
    if choice is None:
        choice = _choose(spec, backend, q, k, v, return_weights, dropout_p, mask)
    out, lse, weights = run_attention(
        choice.backend, spec, q, k, v, mask, alibi, sinks, grad=grad,
        dropout=draw_dropout(dropout_p, dropout_seed, spec.kind), return_weights=return_weights,
    )  # fmt: skip
    results = [out] + [lse] * return_lse + [weights] * return_weights
    if spec.squeeze:  # every input was (N, D): drop the one-head axis again
        results = [r[0] for r in results]
    return results[0] if len(results) == 1 else tuple(results)


def _choose(spec, backend, q, k, v, return_weights, dropout_p, mask=None):
    if _traced(q):
        return None  # traced calls go through attnkit's torch operators (_attend_traced)
    grad = _needs_grad(spec, q, k, v, None, mask)
    request = Request(return_weights=return_weights, dropout=dropout_p > 0, grad=grad)
    return choose_backend(spec, backend, request, stacklevel=5)


def attention(
    q, k, v, *, causal=False, mask=None, scale=None, window=None, softcap=None, alibi_slopes=None, align=None,
    sinks=None, dropout_p=0.0, dropout_seed=None, return_lse=False, return_weights=False, backend="auto",
):  # fmt: skip
    """Exact attention, softmax(scale * q k^T + masks) v, on the best backend.

    Args:
        q: (..., Hq, Nq, D) queries, a NumPy array or a torch tensor.
        k: (..., Hkv, Nk, D) keys; Hq must be a multiple of Hkv (GQA/MQA:
            query head h reads kv head h // (Hq // Hkv)).
        v: (..., Hkv, Nk, Dv) values. Leading axes of q, k, v broadcast.
            A two-axis input (N, D) is one head.
        causal: False; True or "top_left" (query i sees keys j <= i, torch's
            is_causal); "bottom_right" (query i sees j <= i + Nk - Nq, the
            last query sees the last key, as with a KV cache).
        mask: boolean (True = may attend) or additive float, broadcastable to
            (..., Hq, Nq, Nk); same array type and device as q. An additive
            torch mask that requires grad gets its gradient.
        scale: factor on q.k, default 1/sqrt(D); any finite float.
        window: (left, right): query at key position p sees keys
            p - left <= j <= p + right (p includes the causal alignment);
            None on a side is unlimited.
        softcap: scores become softcap * tanh(scores / softcap) before masks.
        alibi_slopes: None, (Hq,) or (B, Hq) with B the batch entries (all
            leading axes): scores get -slope * |p - j| after the softcap.
        align: where query i sits among the keys when causal is False, for
            the window and ALiBi: "top_left" (p = i, the default) or
            "bottom_right" (p = i + Nk - Nq, flash-attn's convention). With
            causal it must be causal's alignment or None.
        sinks: None, or one learned logit per query head (Hq,) (gpt-oss's
            attention sinks) that joins every row's softmax and carries no
            value; differentiable (torch).
        dropout_p: drop each weight with this probability and scale the kept
            ones by 1 / (1 - dropout_p), as torch's dropout does (on every
            call: there is no training flag). lse and the returned weights are
            those before dropout.
        dropout_seed: what decides which weights are dropped (the keep mask
            is attnkit.reference.dropout.keep_mask of the seed): None draws a
            seed from torch's default generator (NumPy's global one for
            arrays), so torch.manual_seed repeats a run; or an int in
            [0, 2**63), a torch.Generator or a numpy.random.Generator.
        return_lse: also return log-sum-exp per row, (..., Hq, Nq), float32
            (float64 for float64 input), -inf for a row that sees no key.
        return_weights: also return the attention weights (..., Hq, Nq, Nk).
        backend: "auto" (fastest that supports the call) or a name from
            attnkit.available_backends().

    Returns:
        out (..., Hq, Nq, Dv) with q's type, device and dtype; a tuple
        (out, lse), (out, weights) or (out, lse, weights) when asked for.
        A row that sees no key gives 0 (and lse -inf), never NaN.

    Raises:
        TypeError, ValueError: naming the argument, for any invalid input.
    """
    call_key = None
    if mask is None and alibi_slopes is None and not return_weights and type(dropout_p) is float and dropout_p == 0.0:
        call_key, result = planned.attend(
            ("attention", causal, type(causal), scale, type(scale), window, softcap, type(softcap), align, backend),
            q, k, v, return_lse, sinks,
        )  # fmt: skip
        if result is not None:
            return result
    dropout_p = dropout_probability(dropout_p)
    options = ("attention", causal, type(causal), scale, type(scale), window, softcap, type(softcap), align,
               return_weights, dropout_p > 0, backend)  # fmt: skip

    def make():
        spec = validate_attention(
            q, k, v, causal=causal, mask=mask, scale=scale, window=window, softcap=softcap,
            alibi_slopes=alibi_slopes, align=align, sinks=sinks,
        )
        return spec, _choose(spec, backend, q, k, v, return_weights, dropout_p, mask)

    spec, choice = _planned(_plan_key(q, k, v, mask, options, alibi_slopes, sinks), make)
    result = _attend(
        q, k, v, mask, spec, backend, return_lse=return_lse, return_weights=return_weights, choice=choice,
        alibi=alibi_slopes, sinks=sinks, dropout_p=dropout_p, dropout_seed=dropout_seed,
    )
    if call_key is not None:
        planned.remember(call_key, spec, choice, q, k, v, _needs_grad(spec, q, k, v, sinks))
    return result


def _check_sdpa_flags(is_causal, enable_gqa):
    if not isinstance(is_causal, (bool, np.bool_)):
        raise TypeError(f"is_causal must be a bool; got {type(is_causal).__name__}")
    if not isinstance(enable_gqa, (bool, np.bool_)):
        raise TypeError(f"enable_gqa must be a bool; got {type(enable_gqa).__name__}")


# sdpa's planned-call options for its defaults (scale None, backend "auto"), by (is_causal, enable_gqa)
_SDPA_OPTIONS = {(causal, gqa): ("sdpa", causal, None, type(None), gqa, "auto")
                 for causal in (False, True) for gqa in (False, True)}  # fmt: skip


def scaled_dot_product_attention(
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    *,
    sinks=None,
    dropout_seed=None,
    backend="auto",
):
    """A drop-in for torch.nn.functional.scaled_dot_product_attention.

    Same arguments and semantics as torch's: query (..., Hq, L, E), key
    (..., Hkv, S, E), value (..., Hkv, S, Ev) -> (..., Hq, L, Ev); is_causal
    is top-left aligned; attn_mask is boolean (True = attend) or additive;
    dropout_p drops attention weights and rescales the kept ones by
    1 / (1 - dropout_p) (on every call: torch's function has no training flag
    either); enable_gqa lets Hq be a multiple of Hkv. Without enable_gqa the
    head axes must match or one of them be 1 (broadcast, as torch does).
    NumPy arrays work as well as tensors. `sinks` (a logit per query head,
    as attention()'s), `dropout_seed` (as attention()'s) and `backend` are
    attnkit's own extras.
    """
    plain_flags = type(is_causal) is bool and type(enable_gqa) is bool  # what the check passes at once
    if not plain_flags:
        _check_sdpa_flags(is_causal, enable_gqa)
    call_key = None
    if attn_mask is None and type(dropout_p) is float and dropout_p == 0.0:
        if plain_flags and scale is None and backend == "auto":
            options = _SDPA_OPTIONS[is_causal, enable_gqa]  # prebuilt: a tiny call feels every tuple
        else:
            options = ("sdpa", bool(is_causal), scale, type(scale), bool(enable_gqa), backend)
        call_key, out = planned.attend(options, query, key, value, False, sinks)
        if out is not None:
            return out
    dropout_p = dropout_probability(dropout_p)
    if is_causal and attn_mask is not None:
        raise ValueError(
            "attn_mask and is_causal=True were both given; as in torch, pass one: "
            "a causal mask can be folded into attn_mask"
        )

    if not enable_gqa:
        expanded = _broadcast_query_heads(query, key, value)
        if expanded is not query:
            call_key, query = None, expanded  # the planned call does not expand
    options = ("sdpa", bool(is_causal), scale, type(scale), dropout_p > 0, backend)

    def make():
        spec = validate_attention(
            query, key, value, causal=bool(is_causal), mask=attn_mask, scale=scale,
            window=None, softcap=None, sinks=sinks,
        )
        return spec, _choose(spec, backend, query, key, value, False, dropout_p, attn_mask)

    spec, choice = _planned(_plan_key(query, key, value, attn_mask, options, sinks=sinks), make)
    out = _attend(
        query, key, value, attn_mask, spec, backend,
        return_lse=False, return_weights=False, dropout_p=dropout_p, dropout_seed=dropout_seed, choice=choice,
        sinks=sinks,
    )
    if call_key is not None:
        planned.remember(call_key, spec, choice, query, key, value, _needs_grad(spec, query, key, value, sinks))
    return out


def _broadcast_query_heads(query, key, value):
    """Without enable_gqa torch broadcasts the head axis like a batch axis.

    A single kv head already reads as GQA with Hkv = 1; a single query head
    against several kv heads is expanded (a view) so the spec's Hq % Hkv rule
    holds. Any other mismatch is an error, as in torch.
    """
    shapes = [getattr(x, "shape", None) for x in (query, key, value)]
    if any(s is None or len(s) < 3 for s in shapes):
        return query  # too few axes for a head axis; validation reports anything wrong
    hq, hkv = shapes[0][-3], shapes[1][-3]
    if hq == hkv or hkv == 1:
        return query
    if hq == 1:
        target = tuple(shapes[0][:-3]) + (hkv,) + tuple(shapes[0][-2:])
        if _arrays.family(query) == "torch":
            return query.expand(target)
        if _arrays.family(query) == "numpy":
            return np.broadcast_to(query, target)
        return query
    raise ValueError(
        f"query has {hq} heads and key has {hkv}; without enable_gqa=True the head "
        f"counts must match or one be 1 (got query {tuple(shapes[0])}, key {tuple(shapes[1])})"
    )


def attention_forward(
    q, k, v, *, causal=False, mask=None, scale=None, window=None, softcap=None, alibi_slopes=None, align=None,
    backend="auto",
):  # fmt: skip
    """The kernel-level forward: (out, lse) with no autograd, for code that builds its own
    backward (ring attention, say).

    Arguments as for attention(); q (..., Hq, Nq, D), k (..., Hkv, Nk, D), v
    (..., Hkv, Nk, Dv). Returns out (..., Hq, Nq, Dv) in q's dtype and lse
    (..., Hq, Nq) float32 (float64 for float64), -inf for rows that see no key.
    Runs on the backend attention() would pick ("numba" on the CPU, "triton"
    on CUDA, or the one named).
    """
    spec = validate_attention(q, k, v, causal=causal, mask=mask, scale=scale, window=window, softcap=softcap,
                              alibi_slopes=alibi_slopes, align=align)  # fmt: skip
    qh, kh, vh = as_heads(q), as_heads(k), as_heads(v)
    if _arrays.holds_no_data(q):  # meta or fake tensors: the operator's fake implementation gives the shapes
        out, lse = _attend_traced(qh, kh, vh, mask, alibi_slopes, spec, backend, return_weights=False, dropout_p=0.0,
                                  dropout_seed=None, sinks=None)  # fmt: skip
    else:
        choice = choose_backend(spec, backend, Request(), stacklevel=3)
        out, lse, _ = choice.backend.forward(qh, kh, vh, mask, spec, alibi=alibi_slopes)
    return (out[0], lse[0]) if spec.squeeze else (out, lse)


def attention_backward(
    q, k, v, out, d_out, lse, *, causal=False, mask=None, scale=None, window=None, softcap=None, alibi_slopes=None,
    align=None, backend="auto",
):  # fmt: skip
    """The kernel-level backward: (dq, dk, dv) of attention_forward from its out and lse.

    out (..., Hq, Nq, Dv), d_out like out, lse (..., Hq, Nq). They need not be
    this call's own: with the out and lse of attention over more keys (all of a
    ring's blocks), the gradients are this block's share of that attention's,
    which is what ring attention sums (delta = rowsum(d_out * out) and the
    probabilities exp(s - lse) are taken from what is given).
    """
    spec = validate_attention(q, k, v, causal=causal, mask=mask, scale=scale, window=window, softcap=softcap,
                              alibi_slopes=alibi_slopes, align=align)  # fmt: skip
    if spec.squeeze:
        out, d_out, lse = out[None], d_out[None], lse[None]
    heads = as_heads(q), as_heads(k), as_heads(v)
    if _arrays.holds_no_data(q):  # meta or fake tensors: the operator's fake implementation gives the shapes
        from .torch_ops import numba_attention_bwd

        grads = numba_attention_bwd(*heads, mask, alibi_slopes, out, d_out, lse, *operator_options(spec))
    else:
        choice = choose_backend(spec, backend, Request(grad=True), stacklevel=3)
        grads = choice.backend.backward(*heads, mask, out, d_out, lse, spec, alibi=alibi_slopes)
    return tuple(g.reshape(x.shape) for g, x in zip(grads, (q, k, v)))


def explain(
    q, k, v, *, causal=False, mask=None, scale=None, window=None, softcap=None, alibi_slopes=None, align=None,
    sinks=None, dropout_p=0.0, dropout_seed=None, return_weights=False, backend="auto", cu_seqlens_q=None,
    cu_seqlens_k=None,
):  # fmt: skip
    """Which backend attention() would run these arguments on, and why (a string).

    dropout_seed is accepted so that attention()'s arguments can be passed as they are; it does not
    change the choice.

    With cu_seqlens_q and cu_seqlens_k, varlen_attention's arguments instead
    (q (Hq, total_q, D), ...; causal a bool, align default "bottom_right"):
    what varlen_attention and the flash-attn functions built on it would run.
    """
    packed = cu_seqlens_q is not None or cu_seqlens_k is not None
    if packed:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together (a packed call), or neither")
        if mask is not None or return_weights:
            raise ValueError("a packed call (cu_seqlens_q, cu_seqlens_k) takes no mask and returns no weights")
        spec = validate_packed(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, align=align or "bottom_right",
                               scale=scale, window=window, softcap=softcap, alibi_slopes=alibi_slopes,
                               sinks=sinks)  # fmt: skip
    else:
        spec = validate_attention(q, k, v, causal=causal, mask=mask, scale=scale, window=window, softcap=softcap,
                                  alibi_slopes=alibi_slopes, align=align, sinks=sinks)  # fmt: skip
    request = Request(return_weights=return_weights, dropout=dropout_probability(dropout_p) > 0,
                      grad=_needs_grad(spec, q, k, v, sinks, mask))  # fmt: skip
    return choose_backend(spec, backend, request, warn=False, start_compiling=False).explain(spec)


def available_backends():
    """{name: None if it can run on this machine, else the reason it cannot}."""
    return backend_status()


def warmup(dtypes=("float32", "bfloat16"), *, backward=True, decode=True, processes=None):
    """Compile every available JIT backend now for calls of these dtypes, so no later call pays for it.

    The Numba kernel compiles (or loads from its on-disk cache) on first use:
    seconds per kernel, once per process. warmup compiles the kernels calls of
    these dtypes run: small and large forwards, the backward (backward=False
    skips it) and the decode kernel (decode=False skips it). Causal alignment,
    windows, masks, softcap, ALiBi, dropout, sinks and packed sequences run in
    those same kernels, so afterwards no such call compiles in this process.
    dtypes: names among "float32", "bfloat16", "float16", "float64" (default:
    float32 and bfloat16, what models run; a float64 call compiles its kernels
    on first use unless named here). float32 is prepared for the products
    torch.get_float32_matmul_precision() selects now.
    processes: how many processes may compile at once (default: one per CPU, at
    most one per kernel; 1: this process alone). Helper processes start only
    when something has to be compiled, compile into the on-disk cache, and
    exit; this process then loads what they compiled.
    """
    from .backends import BACKENDS

    from .kernels.warmup import check_processes

    check_processes(processes)
    for backend in BACKENDS.values():
        if backend.unavailable_reason() is None:
            backend.warmup(tuple(dtypes), backward=backward, decode=decode, processes=processes)
