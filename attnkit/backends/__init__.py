"""Backends and the choice between them.

A backend (base.Backend) computes attention for validated input, dense or
packed: reference.py (the NumPy specification, anywhere), cpu.py (the Numba
kernel), cuda.py (the Triton kernels). It says whether it can run on this
machine at all (unavailable_reason) and whether it can run one particular
call (unsupported_reason); backend="auto" takes the first one in AUTO_ORDER for
the data's device that can, and reports what it skipped and why
(attnkit.explain, the "attnkit" logger, and a warning when the fallback is the
slow reference).

A kernel not compiled yet (a new machine, a new version: 15-30 s of Numba
compilation) does not hold "auto" calls up: helper processes compile it
into the on-disk cache while the NumPy reference stands in for calls small
enough for it (reference.STAND_IN_BYTES); once it is ready, calls run on it.
ATTNKIT_WHILE_COMPILING=wait compiles in the calling process instead.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field

from .base import AttnkitFallbackWarning, Backend, Request
from .cpu import NumbaBackend, cpu_product_path, float32_matmul_precision
from .cuda import TritonBackend
from .reference import ReferenceBackend

__all__ = [
    "AUTO_ORDER", "AttnkitFallbackWarning", "BACKENDS", "Backend", "Choice", "Request", "backend_status",
    "choose_backend", "cpu_product_path", "float32_matmul_precision",
]  # fmt: skip

log = logging.getLogger("attnkit")


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


def check_backend_name(requested):
    """TypeError / ValueError unless requested is "auto" or a backend's name."""
    if not isinstance(requested, str):
        raise TypeError(f"backend must be a string; got {type(requested).__name__}")
    if requested != "auto" and requested not in BACKENDS:
        names = ", ".join(repr(n) for n in ("auto", *BACKENDS))
        raise ValueError(f"backend must be one of {names}; got {requested!r}")


def choose_backend(spec, requested, request, warn=True, stacklevel=4, start_compiling=True):
    """Pick the backend for one call; raise ValueError if a named one cannot run it.

    With warn=True an automatic fall-back to the reference raises an
    AttnkitFallbackWarning. start_compiling=False (attnkit.explain): say what
    the call would run on without starting any compilation.
    """
    check_backend_name(requested)
    if requested != "auto":
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
    if choice.backend.name != "reference":
        choice = _while_compiling(choice, spec, request, start_compiling)

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


WHILE_COMPILING = ("reference", "wait")


def while_compiling_policy():
    """ATTNKIT_WHILE_COMPILING: "reference" (the default: the reference stands in for a kernel that
    helper processes compile) or "wait" (the call compiles the kernel itself)."""
    policy = os.environ.get("ATTNKIT_WHILE_COMPILING", "reference")
    if policy not in WHILE_COMPILING:
        raise ValueError(f"ATTNKIT_WHILE_COMPILING must be one of {', '.join(WHILE_COMPILING)}; got {policy!r}")
    return policy


def _while_compiling(choice, spec, request, start):
    """The reference in the chosen backend's place while helpers compile what the call needs, when
    the call is small enough for it; else the choice as it was (the call compiles, or waits for a
    helper, where it runs)."""
    backend = choice.backend
    if backend.compiled_for(spec, request) or while_compiling_policy() == "wait":
        return choice
    reference = BACKENDS["reference"]
    if reference.stand_in_refusal(spec) is not None or not backend.compile_in_background(spec, request, start=start):
        return choice
    why = "not compiled for these calls yet: helper processes compile it, the reference stands in meanwhile"
    return Choice(reference, choice.requested, choice.skipped + [(backend.name, why)])


def backend_status():
    """{name: None if usable on this machine, else why not} for every backend."""
    return {name: backend.unavailable_reason() for name, backend in BACKENDS.items()}
