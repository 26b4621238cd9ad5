"""NumPy arrays and torch tensors: telling them apart and moving between them.

torch is imported only when a tensor is actually seen, so NumPy users never pay
for importing it.
"""

from __future__ import annotations

import sys

import numpy as np


def is_tensor(x):
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def holds_no_data(x):
    """True for a meta tensor or a FakeTensorMode fake one: shapes and dtypes, no values."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(x, torch.Tensor):
        return False
    if x.is_meta:
        return True
    if type(x) is torch.Tensor:  # fake tensors are a subclass: a plain tensor is decided here (~0.2 µs, not 2)
        return False
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(x)


def family(x):
    """'numpy', 'torch', or None for anything else."""
    if isinstance(x, np.ndarray):
        return "numpy"
    if is_tensor(x):
        return "torch"
    return None


def type_name(x):
    """A short name for error messages: numpy.ndarray, torch.Tensor, list, ..."""
    if family(x) == "numpy":
        return "numpy.ndarray"
    if family(x) == "torch":
        return "torch.Tensor"
    return type(x).__name__


def dtype_name(x):
    """'float32', 'bfloat16', ... for arrays and tensors alike."""
    return str(x.dtype).removeprefix("torch.")


def device_name(x):
    return str(x.device) if family(x) == "torch" else "cpu"


def to_numpy(x):
    """A NumPy view or copy of x. bfloat16 (which NumPy lacks) becomes float32."""
    if x is None or isinstance(x, np.ndarray):
        return x
    import torch

    x = x.detach()
    if x.dtype == torch.bfloat16:
        x = x.float()
    return (x if x.device.type == "cpu" else x.cpu()).numpy()


def bf16_bits(x):
    """The bf16 tensor x's bits as a NumPy uint16 view (no copy, strides kept)."""
    import torch

    return x.detach().view(torch.int16).cpu().numpy().view(np.uint16)


def like(result, reference, keep_dtype=False):
    """Convert a NumPy result to the array type and device of `reference`.

    The result takes `reference`'s dtype, unless keep_dtype is True (lse, say,
    stays float32 whatever the inputs were). A uint16 result for a bfloat16
    reference is taken as bf16 bits.
    """
    if isinstance(reference, np.ndarray):
        return result if keep_dtype else result.astype(reference.dtype, copy=False)
    import torch

    if result.dtype == np.uint16 and reference.dtype == torch.bfloat16 and not keep_dtype:
        # bf16 bits from a kernel: the same memory, read as bf16
        return torch.from_numpy(np.ascontiguousarray(result).view(np.int16)).view(torch.bfloat16).to(reference.device)
    tensor = torch.from_numpy(np.ascontiguousarray(result))
    if reference.device.type == "cpu" and (keep_dtype or tensor.dtype == reference.dtype):
        return tensor  # already what the caller gets (no .to() call: small calls feel it)
    return tensor.to(device=reference.device, dtype=None if keep_dtype else reference.dtype)
