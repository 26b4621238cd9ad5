"""attnkit's benchmarks (`attnkit bench`, `python -m attnkit.bench.<name>`).

They time kernels after a warm-up call, so in their processes a kernel not compiled yet is
compiled by that call (ATTNKIT_WHILE_COMPILING=wait) rather than stood in for by the NumPy
reference while helper processes compile it, which the timed calls would then measure.

`python -m attnkit.bench.<name>` run from a source checkout's root puts that root on sys.path,
where its kernels/, reference/ and bench/ folders (attnkit.kernels and the rest, through
setup.cfg's package_dir) would shadow the PyPI packages of those names: transformers imports
Hugging Face's `kernels`, and the models benchmark died on an ImportError. The root is taken off
sys.path here; attnkit's own modules resolve through the attnkit package.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("ATTNKIT_WHILE_COMPILING", "wait")


def _drop_checkout_root(path, root):
    """path without the entries that name the checkout root (the current folder among them)."""

    def names_root(entry):
        try:
            return Path(entry or ".").resolve() == root
        except OSError:
            return False

    return [entry for entry in path if not names_root(entry)]


_ROOT = Path(__file__).resolve().parent.parent  # a checkout's root when this is its bench/ folder
if (_ROOT / "kernels" / "numba_attention.py").is_file() and (_ROOT / "bench" / "__init__.py").is_file():
    sys.path[:] = _drop_checkout_root(sys.path, _ROOT)
