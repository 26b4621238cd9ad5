"""Tile products for the CPU kernel: AVX-512 micro-kernels (bf16 pairs, float32 FMAs), callable from Numba.

Why our own: the issue that asked for this (bf16 at AMX speed) assumed MKL's
`cblas_gemm_bf16bf16f32`, which torch's libtorch_cpu exports. On the project's
machines of 2026-12-02 (AMD EPYC, Zen 5: avx512_bf16, no AMX) that MKL runs its
generic path. One thread, on the forward's tile products (`python -m
attnkit.bench.cpu_parts`, bench/results/cpu-parts.txt):

  MKL sgemm ~88-91, MKL's bf16 GEMM 105-138 (on 128x512x64 ... 128x64x512),
  this module's bf16 micro-kernel 420-426 and float32 micro-kernel 198-215 GFLOP/s

while torch's own bf16 matmul (oneDNN, which dispatches on CPU flags, not the
vendor) reached 700-744 GFLOP/s on two threads (the bf16 roofline of the records
in bench/results/cpu-bf16/). oneDNN's GEMM is not exported, so
this module emits the instruction oneDNN uses, VDPBF16PS, directly as LLVM IR:
each one multiplies 16 pairs of bf16 numbers and adds both products into 16
float32 lanes (64 FLOPs). The float32 micro-kernel is the same register block
with fused multiply-adds on 16 floats (B then holds plain rows, no pairs).

Layout. C (M, N) float32 += A (M, K) @ B (K, N), where
- A is bf16 (stored as uint16), row-major, K even (rows padded with a zero);
- B is "pair-packed": Bp[p, n, t] = B[2p + t, n], so one 64-byte load gives 16
  columns times one pair of the reduction axis (the instruction's operand);
- C rows are padded to a multiple of 16 columns, so no load or store needs a mask.
A row of A contributes a broadcast pair (A[m, 2p], A[m, 2p+1]).

The micro-kernel holds a 6 x (16 * NR) block of C in 6 * NR registers (NR <= 4:
24 accumulators, 4 B vectors, 1 broadcast of the 32 AVX-512 registers).

Versions (one thread, the 2-core Zen 5 VM):
  v1  6 x 64 register block, B panels of 64 columns, rows of A streamed over
      each panel, B loaded once per pair and reused by 6 rows: on the
      forward's two products per tile (Q block 128, key block 512) 402
      GFLOP/s at D=64 and 446 at D=128, against MKL sgemm's 96 on the same
      calls (`python -m attnkit.bench.cpu_parts`, bench/results/cpu-parts.txt);
      363-424 on single 128 x 512 x 64 ... 128 x 128 x 512 calls.

bf16 <-> float32: float32 -> bf16 rounds to nearest even (LLVM's fptrunc to
bfloat: VCVTNEPS2BF16 with AVX-512 BF16); bf16 -> float32 is exact (a shift).
"""

from __future__ import annotations

import os

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .jit import jit

__all__ = [
    "BF16_PRODUCTS",
    "BF16_DETAIL",
    "F32_PRODUCTS",
    "F32_DETAIL",
    "MR",
    "PANEL",
    "bf16_bits",
    "bf16_of",
    "bf16_to_float32",
    "bf16_to_f32",
    "f32_to_bf16",
    "gemm",
    "gemm_f32",
    "pack_pairs",
    "padded",
]

MR = 6  # rows of C per micro-kernel call
NR = 4  # 16-lane vectors of C per row per call
PANEL = 16 * NR  # columns per micro-kernel call
LANES = 16

def _choose_path(variable, fast, slow, cpu_flag, flag_name, fast_detail, slow_detail):
    """(path, why) for one micro-kernel: `fast` where the CPU has cpu_flag, else `slow`.

    The environment variable forces either: auto (default), fast (an error on a
    CPU without the flag) or slow.
    """
    choices = ("auto", fast, slow)
    choice = os.environ.get(variable, "auto").strip().lower() or "auto"
    if choice not in choices:
        raise ValueError(f"{variable} must be one of {', '.join(choices)}; got {choice!r}")
    if choice == slow:
        return slow, f"{variable}={slow}: {slow_detail}"
    if not llvm.get_host_cpu_features().get(cpu_flag, False):
        if choice == fast:
            raise ValueError(f"{variable}={fast}, but this CPU has no {flag_name}")
        return slow, f"this CPU has no {flag_name}: {slow_detail}"
    return fast, fast_detail


def _choose():
    """Whether bf16 data runs on the bf16 micro-kernel ("dpbf16") or in float32 ("fp32")."""
    return _choose_path(
        "ATTNKIT_CPU_BF16", "dpbf16", "fp32", "avx512bf16", "AVX-512 BF16 (avx512_bf16)",
        "bf16 products on AVX-512 BF16 (VDPBF16PS) with float32 accumulation",
        "bf16 runs in float32 (converted at the boundary)",
    )  # fmt: skip


BF16_PRODUCTS, BF16_DETAIL = _choose()


def _choose_f32():
    """Whether float32 products run on the FMA micro-kernel ("fma") or the BLAS ("blas")."""
    return _choose_path(
        "ATTNKIT_CPU_F32", "fma", "blas", "avx512f", "AVX-512 (avx512f)",
        "float32 products on attnkit's AVX-512 FMA micro-kernel", "float32 products through the BLAS",
    )  # fmt: skip


F32_PRODUCTS, F32_DETAIL = _choose_f32()


@jit(inline="always")
def padded(n, multiple):
    """n rounded up to a multiple of `multiple`."""
    return -(-n // multiple) * multiple


# ---------------------------------------------------------------------------
# IR helpers
# ---------------------------------------------------------------------------


class _BFloat(ir.Type):
    """LLVM's `bfloat` (llvmlite has no class for it)."""

    def _to_string(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, _BFloat)

    def __hash__(self):
        return hash("bfloat")


_F32 = ir.FloatType()
_I16, _I32, _I64 = ir.IntType(16), ir.IntType(32), ir.IntType(64)
_F32X16 = ir.VectorType(_F32, LANES)
_I32X16 = ir.VectorType(_I32, LANES)
_BF16X32 = ir.VectorType(_BFloat(), 2 * LANES)


def _dpbf16ps(builder, acc, a, b):
    function = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_F32X16, [_F32X16, _BF16X32, _BF16X32]),
        "llvm.x86.avx512bf16.dpbf16ps.512",
    )  # fmt: skip
    return builder.call(function, [acc, builder.bitcast(a, _BF16X32), builder.bitcast(b, _BF16X32)])


def _splat_i32(builder, value):
    lane0 = builder.insert_element(ir.Constant(_I32X16, ir.Undefined), value, ir.Constant(_I32, 0))
    zeros = ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES)
    return builder.shuffle_vector(lane0, ir.Constant(_I32X16, ir.Undefined), zeros)


def _splat_f32(builder, value):
    lane0 = builder.insert_element(ir.Constant(_F32X16, ir.Undefined), value, ir.Constant(_I32, 0))
    zeros = ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES)
    return builder.shuffle_vector(lane0, ir.Constant(_F32X16, ir.Undefined), zeros)


def _fma_f32x16(builder, a, b, c):
    function = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_F32X16, [_F32X16] * 3), "llvm.fma.v16f32"
    )
    return builder.call(function, [a, b, c])


class _Kind:
    """What differs between the two micro-kernels: the element of A and B, and the update.

    "bf16": A holds bf16 pairs (one i32 = A[m, 2p], A[m, 2p+1]), a B row p holds 16
    pairs per vector, update VDPBF16PS. "f32": A holds floats, a B row p holds 16
    floats per vector, update a fused multiply-add.
    """

    def __init__(self, name):
        self.name = name
        self.element = _I16 if name == "bf16" else _F32  # the pointer type of A and B
        self.a_unit = _I32 if name == "bf16" else _F32  # one step of the reduction in A
        self.b_step = 2 * LANES if name == "bf16" else LANES  # elements per B vector

    def update(self, builder, acc, a_unit, b_vector):
        if self.name == "bf16":
            return _dpbf16ps(builder, acc, _splat_i32(builder, a_unit), b_vector)
        return _fma_f32x16(builder, _splat_f32(builder, a_unit), b_vector, acc)

    @property
    def b_vector_type(self):
        return _I32X16 if self.name == "bf16" else _F32X16


def _build_micro_kernel(nr, kind):
    """IR body of C[m rows, 16 nr cols] (+)= A[m rows, steps] @ B[steps, 16 nr].

    Arguments: a, lda (elements), b, ldb (elements per row of B, a row being
    one reduction step: a bf16 pair or a float), c (float*), ldc (elements),
    m (1..MR), steps (pairs for bf16, elements for f32), accumulate (0 or 1).
    Rows of A and C past m are read from row m - 1 and never stored.
    """

    def build(builder, args):
        a, lda, b, ldb, c, ldc, m, steps, accumulate = args
        one = ir.Constant(_I64, 1)
        last_row = builder.sub(m, one)
        rows = [builder.select(builder.icmp_signed("<", ir.Constant(_I64, r), m), ir.Constant(_I64, r), last_row)
                for r in range(MR)]
        a_rows = [builder.bitcast(builder.gep(a, [builder.mul(rows[r], lda)]), kind.a_unit.as_pointer())
                  for r in range(MR)]
        c_rows = [builder.gep(c, [builder.mul(rows[r], ldc)]) for r in range(MR)]
        keep = builder.icmp_signed("!=", accumulate, ir.Constant(_I64, 0))
        zero = ir.Constant(_F32X16, [0.0] * LANES)
        slots = []
        for r in range(MR):
            row_slots = []
            for v in range(nr):
                pointer = builder.bitcast(builder.gep(c_rows[r], [ir.Constant(_I64, v * LANES)]), _F32X16.as_pointer())
                start = builder.select(keep, builder.load(pointer, align=4), zero)
                row_slots.append(cgutils.alloca_once_value(builder, start))
            slots.append(row_slots)
        with cgutils.for_range(builder, steps) as loop:
            p = loop.index
            b_row = builder.gep(b, [builder.mul(p, ldb)])
            b_vectors = [
                builder.load(builder.bitcast(builder.gep(b_row, [ir.Constant(_I64, kind.b_step * v)]),
                                             kind.b_vector_type.as_pointer()), align=4)
                for v in range(nr)
            ]  # fmt: skip
            for r in range(MR):
                a_unit = builder.load(builder.gep(a_rows[r], [p]), align=4)
                for v in range(nr):
                    slot = slots[r][v]
                    builder.store(kind.update(builder, builder.load(slot), a_unit, b_vectors[v]), slot)
        for r in range(MR):
            with builder.if_then(builder.icmp_signed("<", ir.Constant(_I64, r), m)):
                for v in range(nr):
                    pointer = builder.bitcast(builder.gep(c_rows[r], [ir.Constant(_I64, v * LANES)]),
                                              _F32X16.as_pointer())
                    builder.store(builder.load(slots[r][v]), pointer, align=4)
        return ir.Constant(_I32, 0)

    return build


def _define(module, name, argument_types, build):
    function = cgutils.get_or_insert_function(module, ir.FunctionType(_I32, argument_types), name)
    if function.is_declaration:
        function.linkage = "internal"
        builder = ir.IRBuilder(function.append_basic_block("entry"))
        builder.ret(build(builder, function.args))
    return function


def _micro_kernel_intrinsic(nr, kind):
    @intrinsic
    def micro_kernel(typingctx, a, lda, b, ldb, c, ldc, m, steps, accumulate):
        if not all(x == types.intp for x in (a, lda, b, ldb, c, ldc, m, steps, accumulate)):
            return None

        def codegen(context, builder, signature, args):
            element_p, f32p = kind.element.as_pointer(), _F32.as_pointer()
            function = _define(
                builder.module, f"attnkit_{kind.name}_micro_{MR}x{nr}",
                [element_p, _I64, element_p, _I64, f32p, _I64, _I64, _I64, _I64], _build_micro_kernel(nr, kind),
            )  # fmt: skip
            a_, lda_, b_, ldb_, c_, ldc_, m_, k_, acc_ = args
            builder.call(function, [builder.inttoptr(a_, element_p), lda_, builder.inttoptr(b_, element_p), ldb_,
                                    builder.inttoptr(c_, f32p), ldc_, m_, k_, acc_])  # fmt: skip
            return context.get_dummy_value()

        return types.void(*(types.intp,) * 9), codegen

    return micro_kernel


_MICRO_1, _MICRO_2, _MICRO_3, _MICRO_4 = (_micro_kernel_intrinsic(nr, _Kind("bf16")) for nr in (1, 2, 3, 4))
_F32_MICRO_1, _F32_MICRO_2, _F32_MICRO_3, _F32_MICRO_4 = (_micro_kernel_intrinsic(nr, _Kind("f32")) for nr in (1, 2, 3, 4))


@intrinsic
def _f32_to_bf16(typingctx, x):
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], _BFloat()), _I16)

    return types.uint16(types.float32), codegen


@intrinsic
def _bf16_to_f32(typingctx, bits):
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        wide = builder.shl(builder.zext(args[0], _I32), ir.Constant(_I32, 16))
        return builder.bitcast(wide, _F32)

    return types.float32(types.uint16), codegen


@jit(inline="always")
def f32_to_bf16(x):
    """float32 -> bf16 bits (uint16), round to nearest even; NaN stays NaN."""
    return _f32_to_bf16(np.float32(x))


@jit(inline="always")
def bf16_to_f32(bits):
    """bf16 bits (uint16) -> float32, exactly."""
    return _bf16_to_f32(bits)


def bf16_of(value):
    """bf16 bits of a stored element: unchanged when it is uint16 (bf16 bits) already, else rounded."""


@overload(bf16_of, jit_options={"inline": "always"})
def _bf16_of_overload(value):
    if value == types.uint16:
        return lambda value: value
    return lambda value: f32_to_bf16(np.float32(value))


def bf16_to_float32(bits):
    """bf16 bits (uint16 array) as float32 values, exactly (NumPy)."""
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def bf16_bits(x):
    """A float array as bf16 bits (uint16), rounded to nearest even (NumPy; for tests and the boundary)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)  # quiet NaN, sign kept
    return rounded


# ---------------------------------------------------------------------------
# Products and packing, from Numba
# ---------------------------------------------------------------------------


@jit()
def _micro(nr, a, lda, b, ldb, c, ldc, m, kpairs, accumulate):
    if nr == 4:
        _MICRO_4(a, lda, b, ldb, c, ldc, m, kpairs, accumulate)
    elif nr == 3:
        _MICRO_3(a, lda, b, ldb, c, ldc, m, kpairs, accumulate)
    elif nr == 2:
        _MICRO_2(a, lda, b, ldb, c, ldc, m, kpairs, accumulate)
    else:
        _MICRO_1(a, lda, b, ldb, c, ldc, m, kpairs, accumulate)


@jit()
def _tiles(bf16, a, b, c, m, n, steps, accumulate):
    """C in blocks of MR rows x PANEL columns, each through the bf16 or float32 micro-kernel.

    Pointers advance in bytes: a row of A holds 2-byte (bf16) or 4-byte elements;
    a column of B is 4 bytes in both (a bf16 pair or a float).
    """
    if m == 0 or n == 0:
        return
    if steps == 0:
        if not accumulate:
            c[:m, :n] = 0
        return
    a_item = a.itemsize
    lda, ldb, ldc = a.strides[0] // a_item, b.strides[0] // b.itemsize, c.strides[0] // 4
    a_ptr, b_ptr, c_ptr = a.ctypes.data, b.ctypes.data, c.ctypes.data
    flag = 1 if accumulate else 0
    n_vectors = (n + LANES - 1) // LANES
    for v0 in range(0, n_vectors, NR):
        nr = min(NR, n_vectors - v0)
        col = v0 * LANES
        for r0 in range(0, m, MR):
            arguments = (a_ptr + a_item * r0 * lda, lda, b_ptr + 4 * col, ldb, c_ptr + 4 * (r0 * ldc + col), ldc,
                         min(MR, m - r0), steps, flag)
            if bf16:
                _micro(nr, *arguments)
            else:
                _f32_micro(nr, *arguments)


@jit()
def gemm(a, bp, c, m, n, kpairs, accumulate):
    """c[:m, :n] (+)= a[:m, :2 kpairs] @ B, B given pair-packed as bp.

    a: 2-D uint16 (bf16 bits), rows contiguous, at least 2 kpairs columns.
    bp: 2-D uint16 (kpairs rows, 2 x columns), rows contiguous: bp[p, 2 n + t] = B[2p + t, n];
        at least padded(n, 16) columns of B.
    c: 2-D float32, rows contiguous, at least padded(n, 16) columns (the padding is written).
    accumulate: add to c (True) or overwrite it (False).
    """
    _tiles(True, a, bp, c, m, n, kpairs, accumulate)


@jit()
def _f32_micro(nr, a, lda, b, ldb, c, ldc, m, k, accumulate):
    if nr == 4:
        _F32_MICRO_4(a, lda, b, ldb, c, ldc, m, k, accumulate)
    elif nr == 3:
        _F32_MICRO_3(a, lda, b, ldb, c, ldc, m, k, accumulate)
    elif nr == 2:
        _F32_MICRO_2(a, lda, b, ldb, c, ldc, m, k, accumulate)
    else:
        _F32_MICRO_1(a, lda, b, ldb, c, ldc, m, k, accumulate)


@jit()
def gemm_f32(a, b, c, m, n, k, accumulate):
    """c[:m, :n] (+)= a[:m, :k] @ b[:k, :n] in float32 with fused multiply-adds.

    a, b, c: 2-D float32 with contiguous rows; b and c at least padded(n, 16)
    columns wide (c's padding is written; b's is read and must be finite).
    accumulate: add to c (True) or overwrite it (False).
    """
    _tiles(False, a, b, c, m, n, k, accumulate)


@jit()
def pack_pairs(src, dst):
    """dst[p, 2 n + t] = src[2p + t, n] as bf16 bits, zero where 2p + t or n is past src.

    src (K, N) bf16 bits (uint16) or float32 (rounded), any strides; dst (ceil(K/2), >= 2 N) with contiguous rows.
    """
    k, n = src.shape
    for p in range(dst.shape[0]):
        row = dst[p]
        i0 = 2 * p
        if i0 + 1 < k:
            top, bottom = src[i0], src[i0 + 1]
            for j in range(n):
                row[2 * j] = bf16_of(top[j])
                row[2 * j + 1] = bf16_of(bottom[j])
        elif i0 < k:
            top = src[i0]
            for j in range(n):
                row[2 * j] = bf16_of(top[j])
                row[2 * j + 1] = 0
        else:
            for j in range(n):
                row[2 * j] = 0
                row[2 * j + 1] = 0
        for j in range(2 * n, row.shape[0]):
            row[j] = 0
