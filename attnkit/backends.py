"""Backends and the choice between them.

A backend computes attention for validated input. It says whether it can run
on this machine at all (unavailable_reason) and whether it can run one
particular call (unsupported_reason); backend="auto" takes the first one in
AUTO_ORDER for the data's device that can, and reports what it skipped and
why (attnkit.explain, the "attnkit" logger, and a warning when the fallback is
the slow reference).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

from . import _arrays
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


def _options(spec):
    return dict(
        causal=spec.causal or False,
        scale=spec.scale,
        window=spec.window,
        softcap=spec.softcap,
    )


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


BACKENDS = {backend.name: backend for backend in (ReferenceBackend(),)}

# Fastest first, per device type; "auto" walks this list.
AUTO_ORDER = {
    "cpu": ("reference",),
    "cuda": ("reference",),
}


@dataclass
class Choice:
    """The backend a call runs on, and what was passed over on the way."""

    backend: Backend
    requested: str
    skipped: list = field(default_factory=list)  # [(name, reason)]

    def explain(self, spec):
        lines = [f"backend {self.backend.name!r} (asked for {self.requested!r}) for {spec.describe()}"]
        lines += [f"  skipped {name!r}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def _refusal(backend, spec, request):
    return backend.unavailable_reason() or backend.unsupported_reason(spec, request)


def choose_backend(spec, requested, request, warn=True):
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
            stacklevel=4,
        )
    log.debug("%s", choice.explain(spec))
    return choice


def backend_status():
    """{name: None if usable on this machine, else why not} for every backend."""
    return {name: backend.unavailable_reason() for name, backend in BACKENDS.items()}
