"""`jit`: numba.njit with the on-disk cache where one can be written."""

from __future__ import annotations

from numba import njit

__all__ = ["jit"]


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
