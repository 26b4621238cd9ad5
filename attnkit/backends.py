"""Backends and the choice between them.

A backend computes attention for validated input. It says whether it can run
on this machine at all (unavailable_reason) and whether it can run one
particular call (unsupported_reason); backend="auto" takes the first one in
AUTO_ORDER for the data's device that can, and reports what it skipped and
why (attnkit.explain, the "attnkit" logger, and a warning when the fallback is
the slow reference).
"""

from __future__ import annotations

import functools
import logging
import sys
import warnings
from dataclasses import dataclass, field

import numpy as np

from . import _arrays, _layout
from .op_codes import operator_options
from .reference import attention as reference_attention
from .reference import attention_backward as reference_attention_backward

log = logging.getLogger("attnkit")


class AttnkitFallbackWarning(UserWarning):
    """backend='auto' fell back to the NumPy reference, which is far slower."""


@dataclass(frozen=True)
class Request:
    """What a call asks for beyond the output itself."""

    return_weights: bool = False
    dropout: bool = False
    grad: bool = False


class Backend:
    """One way of computing attention. Subclasses override what they need."""

    name = ""

    def unavailable_reason(self):
        """None if the backend can run on this machine, else why not."""
        return None

    def unsupported_reason(self, spec, request):
        """None if the backend can run this call, else why not."""
        return None

    def forward(self, q, k, v, mask, spec, *, return_weights=False, dropout_p=0.0, dropout_keep=None):
        """Returns (out, lse, weights or None) in q's array type and device."""
        raise NotImplementedError

    def backward(self, q, k, v, mask, out, d_out, lse, spec, *, dropout_p=0.0, dropout_keep=None):
        """Returns (dq, dk, dv) in the array type, device and dtype of q, k, v."""
        raise NotImplementedError

    def warmup(self):
        """Compile whatever the backend compiles lazily (nothing by default)."""

    def product_path(self, spec):
        """A line on how this backend multiplies the call's tiles, or None."""
        return None


def _options(spec):
    """The spec's attention options as keyword arguments for the reference and the kernels."""
    return dict(causal=spec.causal, scale=spec.scale, window=spec.window, softcap=spec.softcap)


class ReferenceBackend(Backend):
    """The NumPy specification. Runs anything, anywhere, through host memory."""

    name = "reference"

    def forward(self, q, k, v, mask, spec, *, return_weights=False, dropout_p=0.0, dropout_keep=None):
        out, lse, weights = reference_attention(
            *map(_arrays.to_numpy, (q, k, v)),
            mask=_arrays.to_numpy(mask),
            return_lse=True,
            return_weights=True,
            dropout_p=dropout_p,
            dropout_keep=_arrays.to_numpy(dropout_keep),
            **_options(spec),
        )
        weights = _arrays.like(weights, q) if return_weights else None
        return _arrays.like(out, q), _arrays.like(lse, q, keep_dtype=True), weights

    def backward(self, q, k, v, mask, out, d_out, lse, spec, *, dropout_p=0.0, dropout_keep=None):
        grads = reference_attention_backward(
            *map(_arrays.to_numpy, (q, k, v, out, d_out, lse)),
            mask=_arrays.to_numpy(mask),
            dropout_p=dropout_p,
            dropout_keep=_arrays.to_numpy(dropout_keep),
            **_options(spec),
        )
        return tuple(_arrays.like(g, x) for g, x in zip(grads, (q, k, v)))


def float32_matmul_precision():
    """torch.get_float32_matmul_precision() when torch is loaded, else "highest"."""
    torch = sys.modules.get("torch")
    return torch.get_float32_matmul_precision() if torch is not None else "highest"


def cpu_product_path(dtype):
    """(path, why): how the Numba kernel multiplies tiles of this dtype ("float32", "bfloat16", ...)."""
    return _cpu_product_path(dtype, float32_matmul_precision() if dtype == "float32" else None)


@functools.lru_cache(maxsize=32)
def _cpu_product_path(dtype, precision):
    from .kernels.microkernels import BF16_DETAIL, BF16_DOT, BF16_PRODUCTS, F32_DETAIL, F32_PRODUCTS
    from .kernels.cpu_blas import BLAS_NAME
    from .kernels.target import TARGET

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


class NumbaBackend(Backend):
    """The tiled Numba kernel (kernels/numba_attention.py) on CPU data.

    Inputs are folded to (B, H, N, D) without a copy when their layout allows
    (torch CPU tensors are viewed, not copied). bfloat16 stays bf16 (its bits
    viewed as uint16) and runs its products on the bf16 micro-kernel where the
    CPU has AVX-512 BF16, as float32 does under torch's "medium" matmul
    precision; float16 (and bf16 elsewhere) runs in float32 and is cast back.
    """

    name = "numba"

    def unavailable_reason(self):
        try:
            from .kernels import numba_attention  # noqa: F401
        except Exception as error:  # ImportError, or numba failing to initialise
            return f"the Numba kernel cannot be imported ({type(error).__name__}: {error})"
        return None

    def unsupported_reason(self, spec, request):
        if spec.device != "cpu":
            return f"it runs on CPU data; these tensors are on {spec.device}"
        if request.return_weights:
            return "return_weights needs the whole weight matrix, which a flash kernel never forms"
        if request.dropout:
            return "dropout is not implemented in the Numba kernel"
        return None

    def product_path(self, spec):
        from .kernels.target import describe

        path, why = cpu_product_path(spec.dtype)
        return f"{path} products: {why}; compiled for {describe()}"

    def warmup(self):
        from .kernels.numba_attention import warmup

        warmup()

    @staticmethod
    def _fold(x, spec, bf16=False):
        """x as a C-contiguous (B, H, N, D) array in the kernel's dtype.

        float64 stays float64; bf16 tensors become their bits (uint16) when bf16 is
        True; everything else becomes float32.
        """
        if bf16 and spec.dtype == "bfloat16":
            return _layout.fold_batch(_arrays.bf16_bits(x), spec.batch)
        dtype = np.float64 if spec.dtype == "float64" else np.float32
        return _layout.fold_batch(_arrays.to_numpy(x).astype(dtype, copy=False), spec.batch)

    def forward(self, q, k, v, mask, spec, *, return_weights=False, dropout_p=0.0, dropout_keep=None):
        from .kernels.numba_attention import flash_forward

        bf16 = cpu_product_path(spec.dtype)[0] == "bf16"
        qn, kn, vn = (self._fold(x, spec, bf16) for x in (q, k, v))
        out, lse = flash_forward(
            qn, kn, vn, _layout.mask_4d(_arrays.to_numpy(mask), spec, np.float32 if bf16 else qn.dtype),
            **_options(spec), bf16_products=bf16,
        )  # (B, Hq, Nq, Dv), (B, Hq, Nq)
        out, lse = _layout.unfold_batch(out, spec.batch), _layout.unfold_batch(lse, spec.batch)
        return _arrays.like(out, q), _arrays.like(lse, q, keep_dtype=True), None

    def backward(self, q, k, v, mask, out, d_out, lse, spec, *, dropout_p=0.0, dropout_keep=None):
        from .kernels.microkernels import bf16_to_float32
        from .kernels.numba_attention import flash_backward

        bf16 = cpu_product_path(spec.dtype)[0] == "bf16"
        qn, kn, vn, on, don = (self._fold(x, spec, bf16) for x in (q, k, v, out, d_out))
        lse_n = np.ascontiguousarray(_arrays.to_numpy(lse).reshape((-1,) + lse.shape[-2:]))
        grads = flash_backward(
            qn, kn, vn, _layout.mask_4d(_arrays.to_numpy(mask), spec, np.float32 if bf16 else qn.dtype),
            on, don, lse_n, **_options(spec), bf16_products=bf16,
        )  # (B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Dv)
        results = []
        for g, x in zip(grads, (q, k, v)):
            g = _layout.unfold_batch(g, spec.batch)
            if g.dtype == np.uint16 and g.shape != tuple(x.shape):  # bf16 bits summed over broadcast axes
                g = bf16_to_float32(g)
            g = _layout.sum_to_shape(g, tuple(x.shape))
            results.append(_arrays.like(g, x))
        return tuple(results)


class TritonBackend(Backend):
    """The fused Triton kernel (kernels/triton_attention.py) on CUDA tensors.

    Runs through the torch.library operators of attnkit.triton_ops, so
    torch.compile traces it. On a machine without CUDA it is available only
    under TRITON_INTERPRET=1 (the CPU interpreter, for tests), and only when
    asked for by name.
    """

    name = "triton"

    def unavailable_reason(self):
        try:
            from .kernels.triton_attention import interpreting
        except Exception as error:  # no triton, or triton failing to initialise
            return f"the Triton kernel cannot be imported ({type(error).__name__}: {error})"
        import torch

        if not torch.cuda.is_available() and not interpreting():
            return "no CUDA device (TRITON_INTERPRET=1 runs it on the CPU interpreter)"
        return None

    def unsupported_reason(self, spec, request):
        if spec.kind != "torch":
            return "it takes torch tensors"
        if request.return_weights:
            return "return_weights needs the whole weight matrix, which a flash kernel never forms"
        if request.dropout:
            return "dropout is not implemented in the Triton kernel"
        import torch

        from .kernels.triton_attention import why_unsupported

        return why_unsupported(getattr(torch, spec.dtype), spec.d, spec.dv, spec.device)

    @staticmethod
    def _fold(x, spec):
        """(*batch, H, N, D) as (B, H, N, D): a view when the batch is one axis already."""
        x = x.expand(spec.batch + tuple(x.shape[-3:]))
        return x if len(spec.batch) == 1 else x.reshape((-1,) + tuple(x.shape[-3:]))

    def _mask(self, mask, spec):
        if mask is None:
            return None
        mask = mask.reshape((1,) * (len(spec.batch) + 3 - mask.dim()) + tuple(mask.shape))
        if len(spec.batch) == 1:
            return mask  # 4-D, broadcast axes kept as size 1 (stride 0 in the kernel)
        return self._fold(mask.expand(spec.batch + tuple(mask.shape[-3:])), spec)

    def forward(self, q, k, v, mask, spec, *, return_weights=False, dropout_p=0.0, dropout_keep=None):
        from .triton_ops import flash_attention_fwd

        out, lse = flash_attention_fwd(
            *(self._fold(x, spec) for x in (q, k, v)), self._mask(mask, spec), *operator_options(spec)
        )  # (B, Hq, Nq, Dv), (B, Hq, Nq)
        return out.reshape(spec.out_shape), lse.reshape(spec.batch + (spec.hq, spec.nq)), None

    def backward(self, q, k, v, mask, out, d_out, lse, spec, *, dropout_p=0.0, dropout_keep=None):
        from .triton_ops import flash_attention_bwd

        folded = [self._fold(x, spec) for x in (q, k, v, out, d_out)]
        lse = lse.reshape((-1, spec.hq, spec.nq))
        grads = flash_attention_bwd(
            *folded[:3], self._mask(mask, spec), folded[3], folded[4], lse, None, *operator_options(spec)
        )  # (B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Dv)
        return tuple(  # sum_to_shape works on tensors too (torch takes axis=/keepdims=)
            _layout.sum_to_shape(g.reshape(spec.batch + tuple(g.shape[1:])), tuple(x.shape))
            for g, x in zip(grads, (q, k, v))
        )


BACKENDS = {
    backend.name: backend for backend in (ReferenceBackend(), NumbaBackend(), TritonBackend())
}

# Fastest first, per device type; "auto" walks this list.
AUTO_ORDER = {
    "cpu": ("numba", "reference"),
    "cuda": ("triton", "reference"),
}


@dataclass
class Choice:
    """The backend a call runs on, and what was passed over on the way."""

    backend: Backend
    requested: str
    skipped: list = field(default_factory=list)  # [(name, reason)]

    def explain(self, spec):
        lines = [f"backend {self.backend.name!r} (asked for {self.requested!r}) for {spec.describe()}"]
        path = self.backend.product_path(spec)
        if path:
            lines.append(f"  {path}")
        lines += [f"  skipped {name!r}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def _refusal(backend, spec, request):
    return backend.unavailable_reason() or backend.unsupported_reason(spec, request)


def choose_backend(spec, requested, request, warn=True, stacklevel=4):
    """Pick the backend for one call; raise ValueError if a named one cannot run it.

    With warn=True an automatic fall-back to the reference raises an
    AttnkitFallbackWarning.
    """
    if not isinstance(requested, str):
        raise TypeError(f"backend must be a string; got {type(requested).__name__}")
    if requested != "auto":
        if requested not in BACKENDS:
            names = ", ".join(repr(n) for n in ("auto", *BACKENDS))
            raise ValueError(f"backend must be one of {names}; got {requested!r}")
        backend = BACKENDS[requested]
        reason = _refusal(backend, spec, request)
        if reason:
            raise ValueError(f"backend {requested!r} cannot run this call: {reason}")
        return Choice(backend, requested)

    device_type = spec.device.split(":")[0]
    skipped = []
    for name in AUTO_ORDER.get(device_type, ("reference",)):
        reason = _refusal(BACKENDS[name], spec, request)
        if reason is None:
            choice = Choice(BACKENDS[name], requested, skipped)
            break
        skipped.append((name, reason))
    else:  # pragma: no cover - the reference never refuses
        raise RuntimeError("no backend can run this call")

    if warn and choice.backend.name == "reference" and (skipped or device_type != "cpu"):
        warnings.warn(
            "attnkit fell back to the NumPy reference, orders of magnitude slower than a "
            "fused kernel:\n" + choice.explain(spec),
            AttnkitFallbackWarning,
            stacklevel=stacklevel,
        )
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s", choice.explain(spec))
    return choice


def backend_status():
    """{name: None if usable on this machine, else why not} for every backend."""
    return {name: backend.unavailable_reason() for name, backend in BACKENDS.items()}
