"""Planned calls: a repeated inference call as one lookup and one kernel entry.

The first call of a signature goes the whole way (validation, backend choice,
the layers of backends/cpu.py and flash_forward's planning). When it ran the
Numba kernel on a plain dense call (no mask, ALiBi or dropout; sinks allowed;
no gradient, CPU data in float32 / float64 / bf16, no broadcast batch axes), the
call's kernel-level plan (kernels.numba_attention.ForwardPlan) is remembered
under a cheap key: the entry point and its options, the three shapes and
dtypes, the sinks' shape and dtype (and torch's float32 matmul precision,
which picks the products).
Each later call with that key does only what #24 asks of a hot path:

    the key and one dict lookup; NumPy views of q, k, v; the results'
    allocation and one kernel entry (ForwardPlan.run); the results wrapped as
    tensors when the inputs were tensors.

Anything the key does not cover is checked on the way and sends the call down
the full path: a tensor subclass, a tensor that requires grad, a device other
than the CPU, torch.compile tracing. Strides are not in the key: a
non-contiguous or read-only input is copied, as the full path does.
On the full path a tiny call spent 80-90% of its time in Python around the
kernel; bench/results/tiny-calls.md measures what is left.
"""

from __future__ import annotations

import sys

import numpy as np

from .backends.cpu import float32_matmul_precision

_CALLS = {}
_MAX_CALLS = 1024
_TORCH = []  # (torch, torch.bfloat16, torch.int16) once a tensor call was planned


def _torch_names():
    if not _TORCH:
        import torch

        _TORCH.append((torch, torch.bfloat16, torch.int16))
    return _TORCH[0]


def key(options, q, k, v, sinks=None):
    """The planned-call key of q, k, v (and sinks, or None) under an entry point's options, or None
    when the call cannot be planned (it then takes the full path, which validates it)."""
    kind = type(q)
    if kind is np.ndarray:
        if type(k) is not np.ndarray or type(v) is not np.ndarray:
            return None
        if sinks is not None and type(sinks) is not np.ndarray:
            return None
        precision = float32_matmul_precision() if q.dtype == np.float32 else None
        sinks_key = None if sinks is None else (sinks.shape, sinks.dtype)
        return (options, q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, precision, sinks_key)
    torch = sys.modules.get("torch")
    if torch is None or kind is not torch.Tensor or type(k) is not kind or type(v) is not kind:
        return None  # not tensors, or subclasses (parameters, fake and distributed tensors)
    if torch.compiler.is_compiling():
        return None
    sinks_key = None
    if sinks is not None:  # a module's parameter, usually: any tensor, but no gradient to record
        if not isinstance(sinks, torch.Tensor) or sinks.requires_grad and torch.is_grad_enabled():
            return None
        sinks_key = (sinks.shape, sinks.dtype)
    # Not in the key: the device and requires_grad. Tensor.numpy() refuses a tensor off the CPU
    # or one that requires grad, and run() then returns None: the full path takes the call.
    precision = float32_matmul_precision() if q.dtype == torch.float32 else None
    return (options, q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, precision, sinks_key)


def lookup(call_key):
    """The PlannedCall of a key (None: unknown, or no key)."""
    return None if call_key is None else _CALLS.get(call_key)


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
    from .kernels.numba_attention import dense_forward_plan

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
    _CALLS[call_key] = PlannedCall(plan, spec.kind == "torch", shapes, tuple(spec.batch) + (spec.hq, spec.nq),
                                   spec.dtype == "bfloat16")  # fmt: skip


class PlannedCall:
    """run(q, k, v) -> (out, lse) of a planned signature, in the inputs' array type."""

    __slots__ = ("plan", "tensors", "shapes", "rows", "bits", "folded", "last_sinks")

    def __init__(self, plan, tensors, shapes, rows, bits):
        self.plan, self.tensors, self.shapes, self.rows, self.bits = plan, tensors, shapes, rows, bits
        self.folded = len(rows) != 3  # leading axes other than one batch axis: reshaped views
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
        if array.dtype == _torch_names()[1]:
            array = array.float()  # a copy: not kept, its values would not follow the tensor
            return array.numpy()
        array = array.numpy()
        self.last_sinks = (sinks, sinks.data_ptr(), array)
        return array

    def run(self, q, k, v, with_lse=True, sinks=None):
        """(out, lse), or out alone when not with_lse; None when a tensor is off the CPU or requires
        grad (the caller then takes the full path). sinks: the (Hq,) logits the plan was made with."""
        if self.tensors:
            try:
                if self.bits:  # bf16 bits as uint16: the same memory
                    int16 = _torch_names()[2]
                    q, k, v = (x.view(int16).numpy().view(np.uint16) for x in (q, k, v))
                else:
                    q, k, v = q.numpy(), k.numpy(), v.numpy()
                if sinks is not None:
                    sinks = self._sinks_array(sinks)
            except (TypeError, RuntimeError):  # "can't convert cuda:0 ...", "... requires grad"
                return None
        if self.folded:
            q, k, v = (x.reshape(shape) for x, shape in zip((q, k, v), self.shapes))
        out, lse = self.plan.run(q, k, v, sinks=sinks)
        if self.folded:
            out, lse = out.reshape(self.rows + out.shape[-1:]), lse.reshape(self.rows)
        if self.tensors:
            torch, bfloat16, _ = _torch_names()
            out = torch.from_numpy(out.view(np.int16)).view(bfloat16) if self.bits else torch.from_numpy(out)
            if not with_lse:
                return out
            lse = torch.from_numpy(lse)
        return (out, lse) if with_lse else out


def clear():
    """Forget every planned call (attnkit.api.clear_plans calls it)."""
    _CALLS.clear()


def count():
    return len(_CALLS)


__all__ = ["PlannedCall", "clear", "count", "key", "lookup", "remember"]
