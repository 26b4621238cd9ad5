"""A source checkout's root on sys.path: its kernels/, reference/ and bench/ folders (attnkit.kernels
and the rest, through setup.cfg's package_dir) would shadow the PyPI packages of those names there.

`python -m attnkit.bench.<name>` or `python -m pytest` run from the checkout's root put that root on
sys.path; transformers imports Hugging Face's `kernels` package, and found the checkout's folder
(the models benchmark and the gpt-oss tests died on an ImportError). attnkit's own modules resolve
through the attnkit package (the editable install's finder), never through the root.
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent  # a checkout's root when attnkit/ sits in one


def _is_checkout(root):
    return (root / "kernels" / "numba_attention.py").is_file() and (root / "attnkit" / "__init__.py").is_file()


def _names(entry, root):
    try:
        return Path(entry or ".").resolve() == root
    except OSError:
        return False


def without_checkout_root(path, root=_ROOT):
    """sys.path-like `path` without the entries naming `root` (the current folder among them), when
    `root` is an attnkit source checkout; else `path` unchanged."""
    if not _is_checkout(root):
        return list(path)
    return [entry for entry in path if not _names(entry, root)]


def drop_checkout_root():
    """Take the checkout's root off sys.path (nothing happens in an installed attnkit)."""
    sys.path[:] = without_checkout_root(sys.path)
