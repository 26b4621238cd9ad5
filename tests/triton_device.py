"""Where the tests run the Triton kernels: on a CUDA device, else on CPU tensors under the Triton
interpreter (TRITON_INTERPRET=1, set in conftest.py before triton is imported)."""

from __future__ import annotations

import pytest


def triton_device():
    """(device, why not): "cuda" or "cpu" where the Triton kernels can run here, else None and the reason."""
    torch = pytest.importorskip("torch")
    try:
        from attnkit.kernels import triton_attention
    except Exception as error:  # no triton
        return None, f"triton cannot be imported ({type(error).__name__}: {error})"
    if torch.cuda.is_available():
        return "cuda", None
    if triton_attention.interpreting():
        return "cpu", None
    return None, "no CUDA device and TRITON_INTERPRET=1 was not set before triton was imported"


def device_or_skip_module():
    """triton_device()'s device, skipping the calling test module when there is none."""
    device, why_not = triton_device()
    if device is None:
        pytest.skip(why_not, allow_module_level=True)
    return device
