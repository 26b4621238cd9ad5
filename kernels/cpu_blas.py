"""The BLAS behind the CPU kernel's tile products, callable from Numba.

`np.dot` inside `@njit` always goes to SciPy's OpenBLAS. On the tile shapes of
flash attention (a 256 x 64 block times a 64 x 512 block, and similar) one
OpenBLAS thread reaches ~85-115 GFLOP/s on the project's AVX-512 Xeon, while
Intel MKL, which torch's x86 wheels carry inside libtorch_cpu, reaches
~125-140 GFLOP/s on the same calls (measured inside a Numba loop, one thread).
torch is already a dependency, so its MKL costs nothing to install.

This module finds a Fortran-interface `sgemm`/`dgemm` at import time and
registers it with LLVM under fixed names (`attnkit_sgemm`, `attnkit_dgemm`),
so kernels compiled with `cache=True` reference a name, never an address, and
their cache stays valid across processes:

- "mkl": `sgemm_`/`dgemm_` exported by torch's libtorch_cpu (x86-64 wheels),
  with `mkl_set_num_threads_local` to keep each worker's calls on its own
  thread;
- "openblas": SciPy's `scipy.linalg.cython_blas.sgemm`/`dgemm` (the library
  `np.dot` uses), everywhere else: on AArch64 Linux, on macOS (OpenBLAS, or
  Accelerate in recent SciPy wheels) and on Windows (torch_cpu.dll exports no
  sgemm). Its thread count is process-wide, so the caller pins it with
  threadpoolctl; BLAS_DETAIL says what the library is and whether it can be
  pinned.

ATTNKIT_CPU_BLAS=openblas (or mkl) forces the choice; the default, "auto",
takes MKL when torch has it. Both take 32-bit integers (LP64).

`matmul(a, b, c, alpha, beta)` computes c = alpha a @ b + beta c for 2-D
arrays whose rows or columns are contiguous (so `k_block.T` goes in without a
copy), with c's rows contiguous. With beta = 1 a product accumulates in place.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import sys

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import cfunc, types
from numba.core import cgutils
from numba.extending import intrinsic

from .jit import jit

__all__ = ["BLAS_NAME", "BLAS_DETAIL", "matmul", "set_threads_local", "uses_process_threads"]

_SYMBOLS = {"sgemm": "attnkit_sgemm", "dgemm": "attnkit_dgemm", "threads": "attnkit_blas_set_threads_local"}
_CHOICES = ("auto", "mkl", "openblas")


def _torch_library_path():
    """Path of torch's libtorch_cpu without importing torch (importing it costs ~1 s)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return None
    name = {"darwin": "libtorch_cpu.dylib", "win32": "torch_cpu.dll"}.get(sys.platform, "libtorch_cpu.so")
    path = os.path.join(os.path.dirname(spec.origin), "lib", name)
    return path if os.path.exists(path) else None


def _address(function):
    return ctypes.cast(function, ctypes.c_void_p).value


def _load_torch_global_deps(library_path):
    """Load torch's libtorch_global_deps with RTLD_GLOBAL, as `import torch` does first.

    Why: it puts torch's OpenMP runtime (its libgomp.so.1) in the process's global scope, so Numba's
    OpenMP layer, loaded later, binds to that one runtime. Without it, libtorch_cpu loaded here before
    torch is imported brings torch's libgomp in locally, Numba's layer loads the system's next to it,
    and the two thread teams spin against each other on the same cores once torch runs too: attnkit
    and torch SDPA fp32 B1 H8 N256 took ~4.0 ms each, taking turns on 2 cores, against 1.0-1.2 ms
    in a process that imported torch first (bench/results/busy-machine.md).
    """
    path = os.path.join(os.path.dirname(library_path), "libtorch_global_deps.so")
    if sys.platform.startswith("linux") and os.path.exists(path):
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:  # the order is an optimisation: libtorch_cpu loads without it
            pass


def _torch_mkl():
    """{"sgemm", "dgemm", "threads"} addresses from torch's bundled MKL, or None."""
    path = _torch_library_path()
    if path is None:
        return None
    try:
        _load_torch_global_deps(path)
        library = ctypes.CDLL(path)
        # MKL's lower-case names with a trailing underscore are the Fortran interface.
        return {
            "sgemm": _address(library.sgemm_),
            "dgemm": _address(library.dgemm_),
            "threads": _address(library.mkl_set_num_threads_local),  # takes int*, returns the old value
        }
    except (OSError, AttributeError):  # no such library here, or a build without MKL
        return None


def _scipy_blas():
    """{"sgemm", "dgemm"} addresses from SciPy's cython_blas (always present: scipy is a dependency)."""
    import scipy.linalg.cython_blas as cython_blas

    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    addresses = {}
    for routine in ("sgemm", "dgemm"):
        capsule = cython_blas.__pyx_capi__[routine]
        addresses[routine] = get_pointer(capsule, get_name(capsule))
    return addresses


def _scipy_blas_detail():
    """What SciPy's BLAS is here (OpenBLAS on Linux and Windows wheels; Accelerate on recent
    macOS wheels), and whether threadpoolctl can pin its threads, which the kernel relies on."""
    try:
        from threadpoolctl import threadpool_info

        found = [info for info in threadpool_info()
                 if info.get("user_api") == "blas" and "scipy" in info.get("filepath", "").lower()]  # fmt: skip
    except Exception as error:  # threadpoolctl missing or failing on this platform
        return f"SciPy's BLAS (scipy.linalg.cython_blas; its threads cannot be pinned: {error})"
    if not found:
        return ("SciPy's BLAS (scipy.linalg.cython_blas; threadpoolctl finds no library of SciPy's it can "
                "pin, e.g. Accelerate: it may start threads of its own inside the kernel's workers)")  # fmt: skip
    info = found[0]
    return (f"SciPy's BLAS ({info.get('internal_api', 'unknown')} {info.get('version') or ''}".rstrip()
            + ", pinned to one thread per worker through threadpoolctl)")


@functools.cache  # the compiled code lives as long as the object it returns
def _no_thread_setting():
    """A C function that sets no thread count (the OpenBLAS path: threads are pinned by the
    caller instead). Compiled only on that path: a compilation at import costs every process."""

    @cfunc(types.int32(types.CPointer(types.int32)))
    def no_thread_setting(_):
        return 0

    return no_thread_setting


def _bind():
    """Register the chosen BLAS with LLVM; returns (name, detail)."""
    choice = os.environ.get("ATTNKIT_CPU_BLAS", "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"ATTNKIT_CPU_BLAS must be one of {', '.join(_CHOICES)}; got {choice!r}")
    mkl = _torch_mkl() if choice in ("auto", "mkl") else None
    if choice == "mkl" and mkl is None:
        raise ValueError("ATTNKIT_CPU_BLAS=mkl, but torch's libtorch_cpu here exports no MKL sgemm_")
    if mkl is not None:
        addresses, name, detail = mkl, "mkl", f"Intel MKL inside torch ({_torch_library_path()})"
    else:
        addresses, name, detail = _scipy_blas(), "openblas", _scipy_blas_detail()
        addresses["threads"] = _no_thread_setting().address
    for key, symbol in _SYMBOLS.items():
        llvm.add_symbol(symbol, addresses[key])
    return name, detail


BLAS_NAME, BLAS_DETAIL = _bind()


def uses_process_threads():
    """True when the BLAS's thread count is process-wide (OpenBLAS): pin it with threadpoolctl."""
    return BLAS_NAME != "mkl"


# ---------------------------------------------------------------------------
# Calls from Numba
# ---------------------------------------------------------------------------


def _by_reference(builder, value):
    slot = cgutils.alloca_once(builder, value.type)
    builder.store(value, slot)
    return slot


@intrinsic
def _gemm(typingctx, trans_a, trans_b, m, n, k, alpha, a_ptr, lda, b_ptr, ldb, beta, c_ptr, ldc):
    """Column-major C(m, n) = alpha op(A) op(B) + beta C through attnkit_sgemm / attnkit_dgemm.

    trans_* are the characters 'N' or 'T' as int8; pointers are integers
    (array.ctypes.data); the float type of alpha picks sgemm or dgemm.
    """
    if alpha not in (types.float32, types.float64) or beta != alpha:
        return None
    real = alpha
    signature = types.void(
        types.int8, types.int8, types.int32, types.int32, types.int32, real, types.intp, types.int32,
        types.intp, types.int32, real, types.intp, types.int32,
    )  # fmt: skip

    def codegen(context, builder, sig, args):
        real_ir = context.get_value_type(real)
        real_ptr, int_ptr, char_ptr = real_ir.as_pointer(), ir.IntType(32).as_pointer(), ir.IntType(8).as_pointer()
        function_type = ir.FunctionType(
            ir.VoidType(),
            [char_ptr, char_ptr, int_ptr, int_ptr, int_ptr, real_ptr, real_ptr, int_ptr, real_ptr, int_ptr,
             real_ptr, real_ptr, int_ptr],
        )  # fmt: skip
        symbol = _SYMBOLS["sgemm" if real == types.float32 else "dgemm"]
        function = cgutils.get_or_insert_function(builder.module, function_type, symbol)
        ta, tb, m_, n_, k_, alpha_, a_, lda_, b_, ldb_, beta_, c_, ldc_ = args
        builder.call(function, [
            _by_reference(builder, ta), _by_reference(builder, tb), _by_reference(builder, m_),
            _by_reference(builder, n_), _by_reference(builder, k_), _by_reference(builder, alpha_),
            builder.inttoptr(a_, real_ptr), _by_reference(builder, lda_), builder.inttoptr(b_, real_ptr),
            _by_reference(builder, ldb_), _by_reference(builder, beta_), builder.inttoptr(c_, real_ptr),
            _by_reference(builder, ldc_),
        ])  # fmt: skip
        return context.get_dummy_value()

    return signature, codegen


@intrinsic
def _set_threads_local(typingctx, n):
    """MKL's per-thread thread count (0 = back to the global setting); returns the previous one."""
    if n != types.int32:
        return None

    def codegen(context, builder, sig, args):
        int32 = ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(int32, [int32.as_pointer()]), _SYMBOLS["threads"]
        )
        return builder.call(function, [_by_reference(builder, args[0])])

    return types.int32(types.int32), codegen


_NO_TRANSPOSE = np.int8(ord("N"))
_TRANSPOSE = np.int8(ord("T"))


@jit()
def set_threads_local(n):
    """Per-thread BLAS thread count for the calling thread (MKL only); returns the previous one."""
    return _set_threads_local(np.int32(n))


@jit()
def _operand(x):
    """(transpose flag, leading dimension) of a row-major operand with a unit stride somewhere."""
    item = x.itemsize
    if x.strides[1] == item or x.shape[1] <= 1:  # rows contiguous: row-major
        return _NO_TRANSPOSE, max(1, x.strides[0] // item, x.shape[1])
    if x.strides[0] == item or x.shape[0] <= 1:  # columns contiguous (a .T view)
        return _TRANSPOSE, max(1, x.strides[1] // item, x.shape[0])
    raise ValueError("matmul: an operand has no unit stride")


@jit()
def matmul(a, b, c, alpha, beta):
    """c = alpha * a @ b + beta * c. a (M, K), b (K, N), c (M, N) with contiguous rows.

    All three share one float dtype, as do the scalars alpha and beta. The BLAS
    is column-major, where a row-major matrix reads as its transpose, so it is
    asked for c^T = b^T a^T.
    """
    m, n = c.shape
    if m == 0 or n == 0:
        return
    if c.strides[1] != c.itemsize and n > 1:
        raise ValueError("matmul: c needs contiguous rows")
    trans_a, lda = _operand(a)
    trans_b, ldb = _operand(b)
    ldc = max(1, c.strides[0] // c.itemsize, n)
    _gemm(
        trans_b, trans_a, np.int32(n), np.int32(m), np.int32(a.shape[1]), alpha, b.ctypes.data,
        np.int32(ldb), a.ctypes.data, np.int32(lda), beta, c.ctypes.data, np.int32(ldc),
    )  # fmt: skip
