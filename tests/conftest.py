"""Shared test set-up.

With no CUDA device the Triton kernels run on the CPU interpreter, which must
be switched on before triton compiles anything, so it is set here, before any
test module imports the kernels.
"""

import os

from attnkit._checkout import drop_checkout_root

# `python -m pytest` from the checkout's root puts the root on sys.path, where kernels/ would stand
# in for Hugging Face's `kernels` package that transformers imports.
drop_checkout_root()

# The suite checks the kernels: a call whose kernel is not compiled yet compiles it (as it did
# before the reference stood in for kernels compiling in helper processes). The tests of that
# stand-in (tests/test_first_calls.py) run their processes without this setting.
os.environ.setdefault("ATTNKIT_WHILE_COMPILING", "wait")

try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover - torch is a dependency
    pass
