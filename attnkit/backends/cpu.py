"""The Numba kernel on CPU data: host-side preparation for kernels/numba_attention.py.

Everything between a validated call and the kernel's plain arrays lives here:
folding dense inputs to (B, H, N, D) (views where the layout allows), the bf16
path (bf16 bits as uint16), the mask's 4-D form, and for packed sequences the
kernel's key layout (each sequence's keys at a multiple of SEGMENT_ALIGN) and
the GQA decode fold.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import sys

import numpy as np

from .. import _arrays, _layout
from .base import Backend, dropout_options, flash_refusal, kernel_options


_PRECISION_GETTER = []  # torch's getter, once torch is loaded


def float32_matmul_precision():
    """torch.get_float32_matmul_precision() when torch is loaded, else "highest"."""
    if not _PRECISION_GETTER:
        torch = sys.modules.get("torch")
        if torch is None:
            return "highest"
        # The C function torch's getter wraps: a planned call reads it on every call (0.61 -> 0.34 µs)
        _PRECISION_GETTER.append(getattr(torch._C, "_get_float32_matmul_precision", torch.get_float32_matmul_precision))
    return _PRECISION_GETTER[0]()


def cpu_product_path(dtype):
    """(path, why): how the Numba kernel multiplies tiles of this dtype ("float32", "bfloat16", ...)."""
    return _cpu_product_path(dtype, float32_matmul_precision() if dtype == "float32" else None)


@functools.lru_cache(maxsize=32)
def _cpu_product_path(dtype, precision):
    from ..kernels.cpu_blas import BLAS_NAME
    from ..kernels.microkernels import BF16_DETAIL, BF16_DOT, BF16_PRODUCTS, F32_DETAIL, F32_PRODUCTS
    from ..kernels.target import TARGET

    blas_name = "MKL" if BLAS_NAME == "mkl" else "SciPy's BLAS"
    if F32_PRODUCTS == "fma":
        blas = (f"float32 on the {TARGET.vector_isa} FMA micro-kernel, {TARGET.lanes} lanes "
                f"(the backward's dP through {blas_name} sgemm)")  # fmt: skip
    else:
        blas = f"float32 products through {blas_name} sgemm ({F32_DETAIL})"
    if dtype == "float64":
        return "float64", f"float64 products through {blas_name} dgemm"
    if dtype == "float16":
        return "float32", f"{blas} (float16 converted to float32 at the boundary: no bf16 rounding)"
    if dtype == "bfloat16":
        if BF16_PRODUCTS != "fp32":  # VDPBF16PS, or widened to float32 in the micro-kernel
            return "bf16", BF16_DETAIL
        return "float32", f"{blas}; {BF16_DETAIL}"
    if precision == "medium" and BF16_DOT:
        return "bf16", f'torch.get_float32_matmul_precision() is "medium": {BF16_DETAIL}'
    return "float32", f"{blas} (float32 matmul precision {precision!r})"


@functools.cache
def _kernels(name):
    """attnkit.kernels.<name>, imported on first use (it imports Numba), then held: an import
    statement costs ~2 us, which every training call would pay twice."""
    return importlib.import_module(f"..kernels.{name}", __package__)


@functools.lru_cache(maxsize=64)
def _kernel_units(dtype, bf16, kernel):
    """The compiled units (kernels/warmup.py) that calls of this dtype name, with these products,
    run for this kernel ("forward", "decode", "backward", "decode_backward")."""
    ((kernel_dtype, bf16_products),) = _kernels("warmup").warmup_variants(
        [dtype], float32_bf16=bf16 and dtype == "float32")
    return ((np.dtype(kernel_dtype).name, bf16_products, kernel),)


def _decode_shaped(spec, dropout):
    """Whether the call runs the decode kernels (numba_attention.runs_decode; dropout: a bool)."""
    dense = not spec.packed and not spec.alibi and not dropout
    return _kernels("numba_attention").runs_decode(spec.nq, spec.nk, spec.hq // spec.hkv, dense)


def _forward_units(spec, bf16, dropout):
    return _kernel_units(spec.dtype, bf16, "decode" if _decode_shaped(spec, dropout) else "forward")


def _backward_units(spec, bf16, dropout):
    return _kernel_units(spec.dtype, bf16, "decode_backward" if _decode_shaped(spec, dropout) else "backward")


def _host(x, spec, bf16):
    """x as the kernel's NumPy operand: bf16 bits (uint16) when bf16, float64 kept, else float32."""
    if bf16 and spec.dtype == "bfloat16":
        return _arrays.bf16_bits(x)
    if spec.dtype == "float16":
        return _kernels("bf16").float16_to_float32(_arrays.to_numpy(x))
    return _arrays.to_numpy(x).astype(np.float64 if spec.dtype == "float64" else np.float32, copy=False)


def _slopes(alibi, spec):
    """ALiBi slopes as the kernel's (S or 1, Hq) float64, or None."""
    return None if alibi is None else np.asarray(_arrays.to_numpy(alibi), np.float64).reshape(-1, spec.hq)


# ---------------------------------------------------------------------------
# Packed sequences: the kernel's key layout and segment table
# ---------------------------------------------------------------------------


def _key_layout(lengths_k):
    """(starts, total): where each sequence's keys go in the kernel's key axis (see
    kernels.cpu.plan._segment_table: starts a multiple of 16, 16 free between)."""
    from ..kernels.cpu.plan import SEGMENT_ALIGN

    room = (lengths_k + 2 * SEGMENT_ALIGN - 1) // SEGMENT_ALIGN * SEGMENT_ALIGN
    starts = (np.cumsum(room) - room).astype(np.int64)  # one per sequence (none for none)
    return starts, int(room.sum())


def _spread_keys(x, cu_k, starts, total):
    """(H, total_k, X) keys as the kernel's (1, H, total, X): sequence b's rows moved to starts[b]."""
    out = np.zeros((1, x.shape[0], total, x.shape[2]), x.dtype)
    for b in range(len(starts)):
        n = cu_k[b + 1] - cu_k[b]
        out[0, :, starts[b] : starts[b] + n] = x[:, cu_k[b] : cu_k[b + 1]]
    return out


def _gather_keys(x, cu_k, starts):
    """The inverse of _spread_keys: (1, H, total, X) -> (H, total_k, X)."""
    parts = [x[0, :, starts[b] : starts[b] + cu_k[b + 1] - cu_k[b]] for b in range(len(starts))]
    return np.concatenate(parts, axis=1) if parts else x[0, :, :0]


def _segments(spec, starts):
    """The kernel's (S, 5) segment rows (b, qs, Nq, ks, Nk)."""
    lengths_q, lengths_k = spec.lengths_q, spec.lengths_k
    return np.column_stack([np.zeros_like(lengths_q), spec.cu_q[:-1], lengths_q, starts, lengths_k]).astype(np.int64)


def _foldable_decode(spec):
    """Whether every sequence has one query and the GQA group can become its rows.

    One query against a sequence's keys (bottom-right: it sees all of them) is
    the same for every head of a group; the group's Hq / Hkv queries then run
    as Hq / Hkv rows of one kv head, so each key tile is read once per group
    and feeds several rows of the micro-kernel (flash-attn folds decode the same way).
    """
    return (
        spec.hq > spec.hkv and len(spec.cu_q) > 1 and np.all(spec.lengths_q == 1) and spec.window is None
        and not spec.alibi and spec.causal in (None, "bottom_right")
    )  # fmt: skip


class NumbaBackend(Backend):
    """The tiled Numba kernel (kernels/numba_attention.py) on CPU data.

    Dense inputs are folded to (B, H, N, D) without a copy when their layout
    allows (torch CPU tensors are viewed, not copied); packed ones are laid out
    per sequence (_key_layout). bfloat16 stays bf16 (its bits viewed as uint16)
    and runs its products on the bf16 micro-kernel where the target has one, as
    float32 does under torch's "medium" matmul precision; float16 (and bf16
    elsewhere) runs in float32 and is cast back.
    """

    name = "numba"

    def unavailable_reason(self):
        try:
            from ..kernels import numba_attention  # noqa: F401
        except Exception as error:  # ImportError, or numba failing to initialise
            return f"the Numba kernel cannot be imported ({type(error).__name__}: {error})"
        return None

    def unsupported_reason(self, spec, request):
        if spec.device != "cpu":
            return f"it runs on CPU data; these tensors are on {spec.device}"
        return flash_refusal(request)

    def product_path(self, spec):
        from ..kernels.target import describe

        path, why = cpu_product_path(spec.dtype)
        return f"{path} products: {why}; compiled for {describe()}"

    def warmup(self, dtypes, *, backward=True, decode=True, processes=None):
        # float32 calls run bf16 products under torch's "medium" precision: prepare what is set now.
        _kernels("warmup").warmup(dtypes, backward=backward, decode=decode, processes=processes,
                                float32_bf16=float32_matmul_precision() == "medium")  # fmt: skip

    def _units(self, spec, request):
        bf16 = cpu_product_path(spec.dtype)[0] == "bf16"
        units = _forward_units(spec, bf16, request.dropout)
        return units + _backward_units(spec, bf16, request.dropout) if request.grad else units

    def compiled_for(self, spec, request):
        return _kernels("warmup").units_ready(self._units(spec, request))

    def compile_in_background(self, spec, request, *, start=True):
        return _kernels("warmup").compile_in_background(self._units(spec, request), start=start)

    def preparing_backward(self, spec, dropout=None):
        # A cold cache: a helper process compiles the backward kernel while this one compiles the forward.
        (unit,) = _backward_units(spec, cpu_product_path(spec.dtype)[0] == "bf16", dropout is not None)
        return _kernels("warmup").compiling_ahead(unit)

    def forward(self, q, k, v, mask, spec, *, alibi=None, return_weights=False, dropout=None, sinks=None):
        bf16 = cpu_product_path(spec.dtype)[0] == "bf16"
        units = _forward_units(spec, bf16, dropout is not None)
        warm = _kernels("warmup")
        warm.wait_for_background(units)  # a helper compiling them: load its work rather than compile it too
        sinks = _arrays.to_numpy(sinks)
        if spec.packed:
            out, lse = self._packed_forward(q, k, v, spec, alibi, bf16, dropout, sinks)
        else:
            out, lse = self._dense_forward(q, k, v, mask, spec, alibi, bf16, dropout, sinks)
        warm.mark_ready(units)
        return _arrays.like(out, q), _arrays.like(lse, q, keep_dtype=True), None

    def backward(self, q, k, v, mask, out, d_out, lse, spec, *, alibi=None, dropout=None):
        bf16 = cpu_product_path(spec.dtype)[0] == "bf16"
        units = _backward_units(spec, bf16, dropout is not None)
        warm = _kernels("warmup")
        warm.wait_for_background(units)
        if spec.packed:
            grads = self._packed_backward(q, k, v, out, d_out, lse, spec, alibi, bf16, dropout)
        else:
            grads = self._dense_backward(q, k, v, mask, out, d_out, lse, spec, alibi, bf16, dropout)
        warm.mark_ready(units)
        return tuple(_arrays.like(g, x) for g, x in zip(grads, (q, k, v)))

    @staticmethod
    def _dense_forward(q, k, v, mask, spec, alibi, bf16, dropout, sinks):
        from ..kernels.numba_attention import flash_forward

        qn = _layout.fold_batch(_host(q, spec, bf16), spec.batch)
        # K and V in their own layout: a decode reads a cache's rows in place (flash-attn's (B, N, H, D))
        kn, vn = (_layout.fold_batch(_host(x, spec, bf16), spec.batch, contiguous=False) for x in (k, v))
        out, lse = flash_forward(
            qn, kn, vn, _layout.mask_4d(_arrays.to_numpy(mask), spec, np.float32 if bf16 else qn.dtype),
            **kernel_options(spec), bf16_products=bf16, alibi=_slopes(alibi, spec), **dropout_options(dropout),
            sinks=sinks,
        )  # (B, Hq, Nq, Dv), (B, Hq, Nq)
        return _layout.unfold_batch(out, spec.batch), _layout.unfold_batch(lse, spec.batch)

    @staticmethod
    def _dense_backward(q, k, v, mask, out, d_out, lse, spec, alibi, bf16, dropout):
        from ..kernels.microkernels import bf16_to_float32
        from ..kernels.numba_attention import flash_backward

        qn, kn, vn, on, don = (_layout.fold_batch(_host(x, spec, bf16), spec.batch) for x in (q, k, v, out, d_out))
        # (B, Hq, Nq): the batch counted, not inferred (-1 cannot be inferred when Nq is 0)
        lse_n = np.ascontiguousarray(_arrays.to_numpy(lse).reshape((math.prod(spec.batch),) + lse.shape[-2:]))
        grads = flash_backward(
            qn, kn, vn, _layout.mask_4d(_arrays.to_numpy(mask), spec, np.float32 if bf16 else qn.dtype),
            on, don, lse_n, **kernel_options(spec), bf16_products=bf16, alibi=_slopes(alibi, spec),
            **dropout_options(dropout),
        )  # (B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Dv)
        results = []
        for g, x in zip(grads, (q, k, v)):
            g = _layout.unfold_batch(g, spec.batch)
            if g.dtype == np.uint16 and g.shape != tuple(x.shape):  # bf16 bits summed over broadcast axes
                g = bf16_to_float32(g)
            results.append(_layout.sum_to_shape(g, tuple(x.shape)))
        return results

    @staticmethod
    def _packed_forward(q, k, v, spec, alibi, bf16, dropout, sinks):
        from ..kernels.numba_attention import flash_forward

        qn, kn, vn = (_host(x, spec, bf16) for x in (q, k, v))
        # Folding renumbers heads and rows: dropout's counter and the sinks' heads would move.
        folded = dropout is None and sinks is None and _foldable_decode(spec)
        if folded:  # (Hq, S, D) -> (Hkv, S * group, D): sequence b's rows are its group's queries
            group, batch = spec.hq // spec.hkv, len(spec.cu_q) - 1
            qn = qn.reshape(spec.hkv, group, batch, spec.d).transpose(0, 2, 1, 3).reshape(spec.hkv, batch * group, spec.d)
            spec = dataclasses.replace(spec, hq=spec.hkv, cu_q=spec.cu_q * group, causal=None)
        starts, total = _key_layout(spec.lengths_k)
        out, lse = flash_forward(
            qn[None], _spread_keys(kn, spec.cu_k, starts, total), _spread_keys(vn, spec.cu_k, starts, total), None,
            **kernel_options(spec), bf16_products=bf16, segments=_segments(spec, starts), alibi=_slopes(alibi, spec),
            **dropout_options(dropout), sinks=sinks,
        )  # fmt: skip
        out, lse = out[0], lse[0]
        if folded:  # back to (Hq, S, Dv) and (Hq, S)
            out = out.reshape(spec.hkv, batch, group, -1).transpose(0, 2, 1, 3).reshape(spec.hkv * group, batch, -1)
            lse = lse.reshape(spec.hkv, batch, group).transpose(0, 2, 1).reshape(spec.hkv * group, batch)
        return out, lse

    @staticmethod
    def _packed_backward(q, k, v, out, d_out, lse, spec, alibi, bf16, dropout):
        from ..kernels.numba_attention import flash_backward

        qn, kn, vn, on, don = (_host(x, spec, bf16) for x in (q, k, v, out, d_out))
        starts, total = _key_layout(spec.lengths_k)
        dq, dk, dv = flash_backward(
            qn[None], _spread_keys(kn, spec.cu_k, starts, total), _spread_keys(vn, spec.cu_k, starts, total), None,
            on[None], don[None], np.asarray(_arrays.to_numpy(lse))[None], **kernel_options(spec),
            bf16_products=bf16, segments=_segments(spec, starts), alibi=_slopes(alibi, spec),
            **dropout_options(dropout),
        )  # fmt: skip
        return dq[0], _gather_keys(dk, spec.cu_k, starts), _gather_keys(dv, spec.cu_k, starts)
