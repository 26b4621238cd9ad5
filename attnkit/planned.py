"""Planned calls: a repeated inference call as one lookup and one kernel entry.

The first call of a signature goes the whole way (validation, backend choice,
the layers of backends/cpu.py and flash_forward's planning). When it ran the
Numba kernel on a plain dense call (no mask, ALiBi or dropout; sinks allowed;
no gradient, CPU data in float32 / float64 / bf16, no broadcast batch axes), the
call's kernel-level plan (kernels.numba_attention.ForwardPlan) is remembered
under a cheap key: the entry point and its options, whether q, k, v were
tensors, the shapes, dtypes and strides of their NumPy views, the sinks' shape and dtype
(and torch's float32 matmul precision, which picks the products).
Each later call with that key does only what #24 asks of a hot path:

    NumPy views of q, k, v; the key and one dict lookup; the results'
    allocation and one kernel entry (ForwardPlan.serial for a tiny call,
    else ForwardPlan.run); the results wrapped as tensors when the inputs
    were tensors.

Anything the key does not cover is checked on the way and sends the call down
the full path: a tensor subclass, a tensor that requires grad, a device other
than the CPU, torch.compile tracing. A non-contiguous or read-only input is
copied, as the full path does. With the strides in the key, a key of
C-contiguous tensors vouches for its arrays, so its calls enter the plan's
serial function without checking them again.
On the full path a tiny call spent 80-90% of its time in Python around the
kernel; bench/results/tiny-calls.md measures what is left.
"""

from __future__ import annotations

import sys

import numpy as np

from .backends.cpu import _PRECISION_GETTER, float32_matmul_precision

_CALLS = {}
_MAX_CALLS = 1024
# (Tensor, is_compiling, from_numpy, bfloat16, bits, bits are uint16, dispatch modes) once torch is imported
_TORCH = []


def _torch_names():
    """torch's names a planned call uses, or None while torch is not imported, or while
    torch.compile traces a process's first call (dynamo cannot trace _bits_dtype's conversions)
    or a dispatch mode runs (FakeTensorMode's tensors would not convert, and the int16 route would
    be kept for good): such calls are not planned anyway."""
    if not _TORCH:
        torch = sys.modules.get("torch")
        if torch is None or torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
            return None
        bits = _bits_dtype(torch)
        _TORCH.append((torch.Tensor, torch.compiler.is_compiling, torch.from_numpy, torch.bfloat16, bits,
                       bits is getattr(torch, "uint16", None), torch._C._len_torch_dispatch_stack))  # fmt: skip
    return _TORCH[0]


def _bits_dtype(torch):
    """The torch dtype whose NumPy form is a bf16 tensor's bits as the kernels take them (uint16).

    torch.uint16 (torch 2.3 on) converts to and from NumPy's uint16 directly. Through int16 each
    conversion needs a NumPy view as well: a decode call's views are made right after a kernel has
    streamed K and V through the caches, where every call more runs from memory (bench/short_decode.py
    --layers). torch.int16 where uint16 does not convert (the calls then view the NumPy side)."""
    uint16 = getattr(torch, "uint16", None)
    try:
        bits = torch.zeros(1, dtype=torch.bfloat16).view(uint16).numpy()
        back = torch.from_numpy(bits).view(torch.bfloat16)
    except (TypeError, RuntimeError, AttributeError):
        return torch.int16
    return uint16 if bits.dtype == np.uint16 and back.dtype == torch.bfloat16 else torch.int16


_NDARRAY = np.ndarray
_FLOAT32 = np.dtype(np.float32)


def _arrays(q, k, v):
    """(q, k, v) as NumPy arrays over the same memory (bf16 tensors' bits as uint16), and whether they
    were tensors; None when the call cannot be planned (it then takes the full path, which validates it).

    A tensor call is keyed by these arrays' shapes and dtypes: reading a tensor's shape or dtype cost
    ~0.3 µs each right after a kernel (torch's code and data no longer in the caches), numpy() is
    needed anyway, and it refuses what the key does not cover: a tensor off the CPU or that requires
    grad. Only q's dtype is read first, for bf16, which numpy() refuses by throwing a C++ exception
    (~30 µs). Tensor subclasses (parameters, fake and distributed tensors) and torch.compile tracing
    are never planned."""
    kind = type(q)
    if kind is _NDARRAY:
        return (q, k, v, False) if type(k) is kind and type(v) is kind else None
    names = _TORCH[0] if _TORCH else _torch_names()
    if names is None:
        return None
    tensor, is_compiling, _, bfloat16, bits, unsigned, dispatch_modes = names
    if kind is not tensor or type(k) is not kind or type(v) is not kind or is_compiling() or dispatch_modes():
        return None
    if q.dtype is not bfloat16:  # asked first: numpy() refusing bf16 throws a C++ exception (~30 µs)
        try:
            return q.numpy(), k.numpy(), v.numpy(), True
        except (RuntimeError, TypeError):  # requires grad, off the CPU, k or v in bf16
            return None
    if k.dtype is not bfloat16 or v.dtype is not bfloat16:
        return None
    if q.requires_grad or k.requires_grad or v.requires_grad:
        return None  # a view of the bits drops requires_grad, so its numpy() would not refuse it
    try:
        if unsigned:
            return q.view(bits).numpy(), k.view(bits).numpy(), v.view(bits).numpy(), True
        return tuple(x.view(bits).numpy().view(np.uint16) for x in (q, k, v)) + (True,)
    except (TypeError, RuntimeError):  # off the CPU
        return None


def _arrays_and_key(options, q, k, v, sinks):
    """(the call's _arrays, its key), or (None, None) when it cannot be planned. One function for
    what a planned call does before its lookup: a tiny call feels each call and tuple of Python
    (B1 H1 N1 D64: ~0.25 µs of ~8)."""
    arrays = _arrays(q, k, v)
    if arrays is None:
        return None, None
    q, k, v, tensors = arrays
    sinks_key = None
    if sinks is not None:
        if tensors:  # a module's parameter, usually: any tensor, but no gradient to record
            torch = sys.modules["torch"]
            if not isinstance(sinks, torch.Tensor) or sinks.requires_grad and torch.is_grad_enabled():
                return None, None
        elif type(sinks) is not _NDARRAY:
            return None, None
        sinks_key = (sinks.shape, sinks.dtype)
    dtype = q.dtype
    precision = None
    if dtype is _FLOAT32 or dtype == _FLOAT32:  # torch's C getter once it is known (~0.3 µs right after a kernel)
        precision = _PRECISION_GETTER[0]() if _PRECISION_GETTER else float32_matmul_precision()
    return arrays, (options, tensors, q.shape, k.shape, v.shape, dtype, k.dtype, v.dtype, q.strides, k.strides,
                    v.strides, precision, sinks_key)  # fmt: skip


def key(options, q, k, v, sinks=None):
    """The planned-call key of q, k, v (and sinks, or None) under an entry point's options, or None
    when the call cannot be planned (it then takes the full path, which validates it)."""
    return _arrays_and_key(options, q, k, v, sinks)[1]


def lookup(call_key):
    """The PlannedCall of a key (None: unknown, or no key)."""
    return None if call_key is None else _CALLS.get(call_key)


def attend(options, q, k, v, with_lse, sinks=None):
    """(key, result) of a call under an entry point's options: result is what PlannedCall.run gives
    when the key has a plan that takes the call, else None (the caller then takes the full path, and
    remembers the key's plan after it)."""
    arrays, call_key = _arrays_and_key(options, q, k, v, sinks)
    if call_key is None:
        return None, None
    try:
        call = _CALLS.get(call_key)
    except TypeError:  # an unhashable option (a window given as a list, say): the full path
        return None, None
    return call_key, None if call is None else call.run(arrays, with_lse, sinks)


def remember(call_key, spec, choice, q, k, v, grad):
    """Plan the call that just ran on the full path under call_key, when it qualifies. The caller
    gives a key only to calls without mask, ALiBi, dropout or returned weights."""
    if call_key is None or call_key in _CALLS or choice is None or choice.backend.name != "numba" or grad:
        return
    if spec.packed or spec.squeeze or spec.device != "cpu" or spec.dtype not in ("float32", "float64", "bfloat16"):
        return
    if not all(tuple(x.shape[:-3]) == tuple(spec.batch) for x in (q, k, v)):
        return  # leading axes that broadcast: the full path expands them
    from .backends.cpu import cpu_product_path
    from .kernels.numba_attention import dense_forward_plan, enterable

    bf16 = cpu_product_path(spec.dtype)[0] == "bf16"
    if spec.dtype == "bfloat16" and not bf16:
        return  # bf16 converted to float32 on this target: the full path converts
    kernel_dtype = np.dtype(np.uint16 if spec.dtype == "bfloat16" else spec.dtype)
    batch = int(np.prod(spec.batch))
    shapes = [(batch,) + tuple(x.shape[-3:]) for x in (q, k, v)]
    window = None if spec.window is None else tuple(spec.window)
    plan = dense_forward_plan(
        *shapes, kernel_dtype, bf16, spec.scale, spec.causal, window, spec.softcap, spec.align, None,
        spec.sinks,
    )  # fmt: skip
    if len(_CALLS) >= _MAX_CALLS:
        _CALLS.clear()
    # The key holds the views' shapes, dtypes and strides: what these arrays are, every call of the key's are.
    arrays = _arrays(q, k, v)
    contiguous_tensors = arrays is not None and arrays[3] and enterable(*arrays[:3], kernel_dtype)
    _CALLS[call_key] = PlannedCall(plan, shapes, tuple(spec.batch) + (spec.hq, spec.nq), spec.dtype == "bfloat16",
                                   contiguous_tensors)  # fmt: skip


class PlannedCall:
    """run(arrays) -> (out, lse) of a planned signature, in the inputs' array type."""

    __slots__ = ("plan", "shapes", "rows", "bits", "folded", "last_sinks", "contiguous_tensors")

    def __init__(self, plan, shapes, rows, bits, contiguous_tensors=False):
        self.plan, self.shapes, self.rows, self.bits = plan, shapes, rows, bits
        self.folded = len(rows) != 3  # leading axes other than one batch axis: reshaped views
        # tensors' views that the key vouches for (remember): the serial function takes them unchecked
        self.contiguous_tensors = contiguous_tensors
        self.last_sinks = (None, 0, None)  # (tensor, its data pointer, its NumPy form)

    def _sinks_array(self, sinks):
        """The sinks tensor as NumPy (detached; bf16 as float32; never moved off its device).

        A model passes the same parameter on every call: its view is kept while the tensor is the
        same object over the same memory (an in-place update shows through the view; a new
        storage, `param.data = ...`, has another address while the old one is still held here).
        """
        tensor, address, array = self.last_sinks
        if tensor is sinks and address == sinks.data_ptr():
            return array
        array = sinks.detach()
        if array.dtype == _TORCH[0][3]:  # bfloat16
            array = array.float()  # a copy: not kept, its values would not follow the tensor
            return array.numpy()
        array = array.numpy()
        self.last_sinks = (sinks, sinks.data_ptr(), array)
        return array

    def run(self, arrays, with_lse=True, sinks=None):
        """(out, lse), or out alone when not with_lse, in the inputs' type; None when the caller must
        take the full path. arrays: _arrays() of the call's q, k, v; sinks: the (Hq,) logits the plan
        was made with."""
        q, k, v, tensors = arrays
        if sinks is not None and tensors:
            try:
                sinks = self._sinks_array(sinks)
            except (TypeError, RuntimeError):  # "can't convert cuda:0 ..."
                return None
        if self.folded:
            q, k, v = (x.reshape(shape) for x, shape in zip((q, k, v), self.shapes))
        serial = self.plan.serial  # a tiny call's or a decode's one function, when the plan has it
        if serial is not None and sinks is None and self.contiguous_tensors:
            result = serial(q, k, v, with_lse)  # skips plan.run's layer and its checks of the arrays
        else:
            result = None  # plan.run checks the arrays (NumPy inputs: read-only or unaligned ones too)
        out, lse = self.plan.run(q, k, v, sinks=sinks) if result is None else result
        if self.folded:
            out, lse = out.reshape(self.rows + out.shape[-1:]), lse.reshape(self.rows)
        if tensors:
            _, _, from_numpy, bfloat16, _, unsigned, _ = _TORCH[0]
            if self.bits:  # uint16 bits back as bf16 (through int16 where torch has no uint16 from NumPy)
                out = from_numpy(out if unsigned else out.view(np.int16)).view(bfloat16)
            else:
                out = from_numpy(out)
            if not with_lse:
                return out
            lse = from_numpy(lse)
        return (out, lse) if with_lse else out


def clear():
    """Forget every planned call (attnkit.api.clear_plans calls it)."""
    _CALLS.clear()


def count():
    return len(_CALLS)


__all__ = ["PlannedCall", "attend", "clear", "count", "key", "lookup", "remember"]
