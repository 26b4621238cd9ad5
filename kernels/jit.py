"""`jit`: numba.njit with the on-disk cache where one can be written.

Numba's cache checks only the source file of the function it loads: a kernel
in numba_attention.py compiled against an older simd.py or cpu_blas.py would
be loaded as it was (this once hid a wrong exp2 from the tests). So at import,
when the kernel sources differ from the ones the cache in kernels/__pycache__
was built from, that cache is discarded (discard_stale_cache).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from numba import njit

__all__ = ["discard_stale_cache", "jit"]

_STAMP = "attnkit-kernel-sources.sha256"


def discard_stale_cache(folder=Path(__file__).parent):
    """Delete folder/__pycache__/*.nbi, *.nbc unless they were built from folder/*.py as they are now.

    Returns True when something was discarded. Does nothing where the folder
    cannot be written (a read-only install has no cache there anyway).
    """
    folder = Path(folder)
    digest = hashlib.sha256()
    for source in sorted(folder.glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    cache, stamp = folder / "__pycache__", folder / "__pycache__" / _STAMP
    try:
        if stamp.read_text(encoding="ascii") == digest.hexdigest():
            return False
    except OSError:
        pass  # no stamp yet
    try:
        stale = list(cache.glob("*.nb[ic]"))
        for path in stale:
            path.unlink(missing_ok=True)
        cache.mkdir(exist_ok=True)
        stamp.write_text(digest.hexdigest(), encoding="ascii")
    except OSError:
        return False
    return bool(stale)


discard_stale_cache()


def jit(**options):
    """njit(cache=True, **options), falling back to no cache where none can be written.

    Numba raises RuntimeError at decoration time when neither the package
    directory nor the user cache directory is writable (read-only installs);
    the function then compiles in memory on first use.
    """

    def decorate(func):
        try:
            return njit(cache=True, **options)(func)
        except RuntimeError:
            return njit(cache=False, **options)(func)

    return decorate
