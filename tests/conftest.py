"""Shared test set-up.

With no CUDA device the Triton kernels run on the CPU interpreter, which must
be switched on before triton compiles anything, so it is set here, before any
test module imports the kernels.
"""

import os

try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover - torch is a dependency
    pass
