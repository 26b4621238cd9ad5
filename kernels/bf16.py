"""bf16 on the CPU: conversions between float32 and bf16 bits (uint16), in LLVM IR, Numba and NumPy;
and float16 widened to float32 (float16 runs in float32: float16_to_float32 at the boundary).

f32_to_bf16_ir emits the conversion for a target (one instruction where it has
one, integer round-to-nearest-even elsewhere: no __truncsfbf2 call); the Numba
functions (f32_to_bf16, bf16_to_f32, bf16_of) use it inside the kernels; the
NumPy ones (bf16_bits, bf16_to_float32) convert at the boundary and in tests.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from .jit import OVERLOAD_OPTIONS, jit
from .target import TARGET

_F32 = ir.FloatType()
_I16, _I32 = ir.IntType(16), ir.IntType(32)


class _BFloat(ir.Type):
    """LLVM's `bfloat` (llvmlite has no class for it)."""

    def _to_string(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, _BFloat)

    def __hash__(self):
        return hash("bfloat")



def f32_to_bf16_ir(builder, x, native):
    """IR: float32 x -> bf16 bits (i16), round to nearest even, NaN kept quiet; a vector of float32
    gives a vector of i16.

    native: the target's conversion instruction (fptrunc to bfloat); else
    integer arithmetic, which every target runs.
    """
    lanes = x.type.count if isinstance(x.type, ir.VectorType) else None  # a vector of float32, lane-wise
    kind = (lambda t: ir.VectorType(t, lanes)) if lanes else (lambda t: t)
    constant = (lambda v: ir.Constant(kind(_I32), [v] * lanes)) if lanes else (lambda v: ir.Constant(_I32, v))
    if native:
        return builder.bitcast(builder.fptrunc(x, kind(_BFloat())), kind(_I16))
    bits = builder.bitcast(x, kind(_I32))
    lower_bit = builder.and_(builder.lshr(bits, constant(16)), constant(1))
    rounded = builder.lshr(builder.add(builder.add(bits, constant(0x7FFF)), lower_bit), constant(16))
    quiet = builder.or_(builder.lshr(bits, constant(16)), constant(0x40))
    is_nan = builder.fcmp_unordered("uno", x, x)
    return builder.trunc(builder.select(is_nan, quiet, rounded), kind(_I16))


@intrinsic
def _f32_to_bf16(typingctx, x):
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return f32_to_bf16_ir(builder, args[0], TARGET.bf16_convert)

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


@overload(bf16_of, jit_options=OVERLOAD_OPTIONS)
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


@intrinsic
def _f16_to_f32(typingctx, bits):
    """float16 bits (uint16) -> float32, exactly, in integer arithmetic and one float subtraction
    (every target runs it; LLVM's fpext from half would call a runtime function where the target
    has no conversion instruction). Subnormals are renormalised by subtracting 2^-14."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        def const(value):
            return ir.Constant(_I32, value)

        h = builder.zext(args[0], _I32)
        body = builder.shl(builder.and_(h, const(0x7FFF)), const(13))  # exponent and mantissa, float32's place
        exponent = builder.and_(body, const(0x7C00 << 13))
        normal = builder.add(body, const((127 - 15) << 23))
        special = builder.add(normal, const((128 - 16) << 23))  # infinity, NaN: exponent all ones
        tiny = builder.fsub(builder.bitcast(builder.add(normal, const(1 << 23)), _F32), ir.Constant(_F32, 2.0**-14))
        is_special = builder.icmp_unsigned("==", exponent, const(0x7C00 << 13))
        is_tiny = builder.icmp_unsigned("==", exponent, const(0))
        bits32 = builder.select(is_special, special, builder.select(is_tiny, builder.bitcast(tiny, _I32), normal))
        bits32 = builder.or_(bits32, builder.shl(builder.and_(h, const(0x8000)), const(16)))
        return builder.bitcast(bits32, _F32)

    return types.float32(types.uint16), codegen


@jit()
def _widen_half(bits, out):
    for i in range(bits.shape[0]):
        out[i] = _f16_to_f32(bits[i])


def float16_to_float32(x):
    """A float16 array as float32 (NumPy's own conversion takes ~2 ns an element on AVX2 machines;
    this loop vectorises)."""
    x = np.ascontiguousarray(x, dtype=np.float16)
    out = np.empty(x.shape, np.float32)
    _widen_half(x.reshape(-1).view(np.uint16), out.reshape(-1))
    return out
