"""Row operations of the CPU kernel's softmax, written as explicit LLVM vector code.

Numba's loops over a score row did not vectorise well: LLVM refuses a max
reduction without 'nnan', and the exp2 loop ran partly scalar. Measured on one
row of 512 float32 scores (2-core AVX-512 Xeon, tile 256 x 512, best of 5):

  row max, 8 hand-made lanes in Numba      0.34-0.43 ns/score
  row max, 'nnan' + max() in Numba         1.28 ns/score
  row max, this module (16-wide vectors)   0.13 ns/score
  exp2 + row sum in Numba                  0.62-0.70 ns/score
  exp2 + row sum, this module              0.43 ns/score (round = x - 0.5 through int and back)
                                           0.36 ns/score (round = llvm.rint, one instruction)

Then (2026-12-01, the variants compiled side by side in one process and timed
in turns, best of 15, since this machine's speed drifts by 2x between runs):

  row_max / exp2_affine as separate compiled functions  0.105 / 0.30 ns/score
  the same inlined into the caller (inline="always")     0.055 / 0.28 ns/score
    (a call passed the row as an array struct, with a reference-count
    increment and decrement: ~25 ns per call, per 512-score row)
  1, 2, 4, 8 independent accumulators, row max           0.061 0.057 0.057 0.056
  1, 2, 4, 8 independent accumulators, exp2 + sum        0.286 0.291 0.269 0.264
  -> inlined, 4 accumulators for both. `python -m attnkit.bench.cpu_parts`,
     three runs at a fast moment (bench/results/cpu-parts.txt): row max
     0.035-0.051, exp2 + sum 0.23-0.25 ns/score (0.04-0.07 and 0.27-0.39 in
     three runs at a slow one).

At D = 64 one score costs ~1.9 ns of GEMM (256 FLOPs at ~135 GFLOP/s), so
~1 ns of softmax per score was a third of the kernel's time.

Each function here is emitted once per LLVM module as an internal function
and called from Numba through an @intrinsic taking the row's data pointer:

- row_max(row, initial): max(initial, max(row)); NaN entries are ignored
  (an ordered compare fails on them), -inf is an ordinary value.
- exp2_affine(row, multiplier, shift): row[c] = 2**(row[c] * multiplier - shift)
  in place, returning the sum of the new row (summed in a fixed order, so the
  same input gives the same bits). 2**x = 2**n * 2**f with n = rint(x), f in
  [-0.5, 0.5]; 2**n from exponent bits, 2**f from a polynomial (degree 6 for
  float32, 12 for float64). Arguments below FLUSH_BELOW (-64 for float32,
  -512 for float64), -inf included, give exactly 0; NaN stays NaN. Valid for
  x <= 127, which holds in the kernel: the shift is the row's running max (or
  its lse), so a flushed weight is below 2**-64 of the row's largest, which
  is 1, and changes no float32 sum. Why not at the smallest normal exponent
  (-126), as before: weights down there made the P V products and the
  backward's dS products subnormal, and every FMA with a subnormal result
  takes a microcode assist on Intel cores. ALiBi's long-range biases do that
  to most of a row: fp32 forward + backward B2 H8 N1024 D64 with slopes
  0.1-1 took 144-147 ms against 83 ms with slopes of 0.01
  (docs/kernel-log.md v44).

float32 rows use <16 x float> vectors, float64 rows <8 x double>; on a CPU
without AVX-512 LLVM splits them into narrower registers. A scalar loop takes
the row's tail.
"""

from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .bf16 import f32_to_bf16_ir
from .jit import jit
from .target import TARGET

__all__ = [
    "FLUSH_BELOW", "cache_row", "contiguous_row", "exp2_affine", "exp2_affine_at",
    "exp2_affine_bits_at", "exp2_polynomial", "gradient_pairs", "prefetch", "row_max", "row_max_at", "wide_vectors",
]


def _exp2_polynomial(degree):
    """Coefficients (lowest degree first) of a Chebyshev fit of 2**f on [-0.5, 0.5]."""
    nodes = 0.5 * np.cos(np.linspace(0.0, np.pi, 4001))
    fit = np.polynomial.chebyshev.Chebyshev.fit(nodes, np.exp2(nodes), degree)
    return [float(c) for c in fit.convert(kind=np.polynomial.Polynomial).coef]


# exp2's arguments below these give 0 (module docstring): the weights stay far from subnormal.
FLUSH_BELOW = {np.dtype(np.float32): -64.0, np.dtype(np.float64): -512.0}

@functools.cache
def exp2_polynomial(dtype):
    """The coefficients exp2 evaluates for a float dtype (lowest degree first). Degree 6 is below
    float32 rounding (max relative error ~2e-7 on the polynomial, ~1.6e-6 end to end); degree 12 is
    at float64 rounding.

    Fitted when a kernel compiles, not at import: the fit's least squares run in NumPy's OpenBLAS,
    whose thread then spins for ~0.1 s, on a 2-core machine one core taken from the parallel
    kernels of a process that only loads them from the cache (its next calls 8 ms instead of 0.2)."""
    return _exp2_polynomial({np.dtype(np.float32): 6, np.dtype(np.float64): 12}[np.dtype(dtype)])


class _Real:
    """What the IR of one float type needs: vector width, integer twin, exponent layout."""

    def __init__(self, numba_type):
        single = numba_type == types.float32
        self.dtype = np.dtype(np.float32 if single else np.float64)
        self.scalar = ir.FloatType() if single else ir.DoubleType()
        self.width = 16 if single else 8  # one 512-bit register
        self.vector = ir.VectorType(self.scalar, self.width)
        self.int_scalar = ir.IntType(32 if single else 64)
        self.int_vector = ir.VectorType(self.int_scalar, self.width)
        self.bias, self.mantissa_bits = (127, 23) if single else (1023, 52)
        self.floor = FLUSH_BELOW[self.dtype]  # exp2 below this is 0 (module docstring)
        self.tag = "f32" if single else "f64"

    def constant(self, value, vector):
        if vector:
            return ir.Constant(self.vector, [value] * self.width)
        return ir.Constant(self.scalar, value)

    def int_constant(self, value, vector):
        if vector:
            return ir.Constant(self.int_vector, [value] * self.width)
        return ir.Constant(self.int_scalar, value)


def _fma(builder, real, vector, a, b, c):
    """a * b + c: fused where the target has FMA (llvm.fmuladd), a multiply and an add elsewhere
    (llvm.fma would become calls to libm's fmaf on a target without FMA)."""
    value_type = real.vector if vector else real.scalar
    name = f"llvm.fmuladd.v{real.width}{real.tag}" if vector else f"llvm.fmuladd.{real.tag}"
    function = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(value_type, [value_type] * 3), name
    )
    return builder.call(function, [a, b, c])


def _unary_intrinsic(builder, real, vector, name, x):
    value_type = real.vector if vector else real.scalar
    suffix = f"v{real.width}{real.tag}" if vector else real.tag
    function = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(value_type, [value_type]), f"llvm.{name}.{suffix}"
    )
    return builder.call(function, [x])


def _exp2_of(builder, real, vector, x, target=TARGET):
    """IR for 2**x, elementwise, for x <= 127 (the method is in the module docstring).

    Numba may put fast-math flags on this IR (it does when a fastmath caller
    compiles the function), so nothing here may rely on exact float
    arithmetic: rounding by adding and subtracting 1.5 * 2**23 would fold
    to x under 'reassoc'. llvm.rint (one vrndscale) is immune to that.
    """
    floor = real.constant(real.floor, vector)
    below = builder.fcmp_ordered("<", x, floor)  # -inf too; NaN compares false and stays NaN
    clamped = builder.select(below, floor, x)  # keeps the integer conversion in range
    n = _unary_intrinsic(builder, real, vector, "rint", clamped)  # round to nearest
    f = builder.fsub(clamped, n)  # [-0.5, 0.5]
    coefficients = exp2_polynomial(real.dtype)
    p = real.constant(coefficients[-1], vector)
    for c in reversed(coefficients[:-1]):
        p = _fma(builder, real, vector, p, f, real.constant(c, vector))
    if vector and target.arch == "x86_64" and target.lanes == 16:
        # AVX-512's VSCALEF: p * 2**n in one operation, exactly as the multiply below (a power of
        # two), where the integer route takes four on the one port that also runs the FMAs.
        name = f"llvm.x86.avx512.mask.scalef.{'ps' if real.tag == 'f32' else 'pd'}.512"
        mask_type = ir.IntType(real.width)
        function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
            real.vector, [real.vector, real.vector, real.vector, mask_type, ir.IntType(32)]), name)
        scaled = builder.call(function, [p, n, ir.Constant(real.vector, ir.Undefined), ir.Constant(mask_type, -1),
                                         ir.Constant(ir.IntType(32), 4)])  # all lanes, the current rounding
        return builder.select(below, real.constant(0.0, vector), scaled)
    int_type = real.int_vector if vector else real.int_scalar
    exponent = builder.add(builder.fptosi(n, int_type), real.int_constant(real.bias, vector))
    power = builder.bitcast(builder.shl(exponent, real.int_constant(real.mantissa_bits, vector)), x.type)
    return builder.select(below, real.constant(0.0, vector), builder.fmul(p, power))


def _element_pointer(builder, real, base, index, vector):
    pointer = builder.gep(base, [index])
    return builder.bitcast(pointer, real.vector.as_pointer()) if vector else pointer


def _horizontal(builder, real, vector_value, combine):
    """Fold the lanes of a vector left to right with combine(builder, a, b)."""
    total = builder.extract_element(vector_value, ir.Constant(ir.IntType(32), 0))
    for lane in range(1, real.width):
        total = combine(builder, total, builder.extract_element(vector_value, ir.Constant(ir.IntType(32), lane)))
    return total


def _row_loops(builder, real, n, body, unroll):
    """Call body(index, vector, lane_group) over [0, n).

    First `unroll` vectors per step (lane_group 0..unroll-1, so that each group
    can keep its own accumulator and the groups' dependency chains overlap),
    then single vectors (group 0), then one element at a time (vector False).
    """
    i64 = ir.IntType(64)
    width = ir.Constant(i64, real.width)
    step = ir.Constant(i64, real.width * unroll)
    n_steps = builder.udiv(n, step)
    with cgutils.for_range(builder, n_steps) as loop:
        start = builder.mul(loop.index, step)
        for group in range(unroll):
            body(builder.add(start, ir.Constant(i64, group * real.width)), True, group)
    done = builder.mul(n_steps, step)
    n_vectors = builder.udiv(builder.sub(n, done), width)
    with cgutils.for_range(builder, n_vectors) as loop:
        body(builder.add(done, builder.mul(loop.index, width)), True, 0)
    done = builder.add(done, builder.mul(n_vectors, width))
    with cgutils.for_range(builder, builder.sub(n, done)) as loop:
        body(builder.add(done, loop.index), False, 0)


def _fold_groups(builder, slots, combine):
    """The accumulators of the lane groups combined in a fixed order (same bits every run)."""
    total = builder.load(slots[0])
    for slot in slots[1:]:
        total = combine(builder, total, builder.load(slot))
    return total


def _define(module, name, return_type, argument_types, build):
    """The internal function `name` of module, its body built by build(builder, args) once."""
    function = cgutils.get_or_insert_function(module, ir.FunctionType(return_type, argument_types), name)
    if function.is_declaration:
        function.linkage = "internal"
        builder = ir.IRBuilder(function.append_basic_block("entry"))
        result = build(builder, function.args)
        builder.ret_void() if result is None else builder.ret(result)
    return function


def _splat(builder, real, value):
    """A vector with every lane equal to the scalar `value`."""
    lane0 = builder.insert_element(ir.Constant(real.vector, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    zeros = ir.Constant(ir.VectorType(ir.IntType(32), real.width), [0] * real.width)
    return builder.shuffle_vector(lane0, ir.Constant(real.vector, ir.Undefined), zeros)


# Independent accumulators per pass, so that consecutive vectors' chains overlap
# (the gain is small: 0.06 -> 0.057 ns/score for the max, 0.29 -> 0.27 for exp2).
_ACCUMULATORS = 4


def _max_of(builder, a, b):
    return builder.select(builder.fcmp_ordered(">", b, a), b, a)


def _build_row_max(real):
    def build(builder, args):
        base, n, initial = args
        best_vectors = [cgutils.alloca_once_value(builder, _splat(builder, real, initial))
                        for _ in range(_ACCUMULATORS)]
        best_scalar = cgutils.alloca_once_value(builder, initial)

        def body(index, vector, group):
            value = builder.load(_element_pointer(builder, real, base, index, vector), align=real.dtype.itemsize)
            slot = best_vectors[group] if vector else best_scalar
            builder.store(_max_of(builder, builder.load(slot), value), slot)

        _row_loops(builder, real, n, body, _ACCUMULATORS)
        lanes = _horizontal(builder, real, _fold_groups(builder, best_vectors, _max_of), _max_of)
        return _max_of(builder, lanes, builder.load(best_scalar))

    return build


def _build_exp2_affine(real, bits=False, target=TARGET):
    """exp2_affine's body; with bits, each new value is also stored rounded to bf16 at bits_base
    (same index): the P V operand of a bf16 tile, written while the value is in a register."""

    def build(builder, args):
        base, n, multiplier, shift = args[:4]
        total_vectors = [cgutils.alloca_once_value(builder, real.constant(0.0, True))
                         for _ in range(_ACCUMULATORS)]
        total_scalar = cgutils.alloca_once_value(builder, real.constant(0.0, False))
        m_vector, s_vector = _splat(builder, real, multiplier), _splat(builder, real, shift)

        def body(index, vector, group):
            pointer = _element_pointer(builder, real, base, index, vector)
            value = builder.load(pointer, align=real.dtype.itemsize)
            m, s = (m_vector, s_vector) if vector else (multiplier, shift)
            y = _exp2_of(builder, real, vector, _fma(builder, real, vector, value, m, builder.fneg(s)), target)
            builder.store(y, pointer, align=real.dtype.itemsize)
            if bits:
                element = builder.gep(args[4], [index])
                destination = builder.bitcast(element, ir.VectorType(ir.IntType(16), real.width).as_pointer()) \
                    if vector else element
                builder.store(f32_to_bf16_ir(builder, y, target.bf16_convert), destination, align=2)
            slot = total_vectors[group] if vector else total_scalar
            builder.store(builder.fadd(builder.load(slot), y), slot)

        _row_loops(builder, real, n, body, _ACCUMULATORS)
        add = lambda b, x, y: b.fadd(x, y)  # noqa: E731
        lanes = _horizontal(builder, real, _fold_groups(builder, total_vectors, add), add)
        return builder.fadd(lanes, builder.load(total_scalar))

    return build


def _build_gradient_pairs(real, target=TARGET, dropout=False):
    """The body of gradient_pairs' IR function: per column c < n of rows r0, r1 of P and dP,
    dS = P (dP - delta) scale (in that order, as the kernels' float loops compute it), then P and
    dS rounded to bf16 and stored interleaved, p_pairs[2c + t] / ds_pairs[2c + t] of row r_t, and
    dS also by rows. With dropout, rows r0, r1 of its factors Z (two more arguments) scale dP
    first, dS = P (dP Z - delta) scale, and the P stored is P Z (the weights the forward used)."""
    i16 = ir.IntType(16)
    interleave = ir.Constant(ir.VectorType(ir.IntType(32), 2 * real.width),
                             [lane for c in range(real.width) for lane in (c, c + real.width)])  # fmt: skip

    def build(builder, args):
        p0, p1, dp0, dp1, n, delta0, delta1, scale, p_pairs, ds_pairs, rows0, rows1, *keep = args
        splats = [_splat(builder, real, x) for x in (delta0, delta1, scale)]

        def body(index, vector, group):
            d0, d1, s = splats if vector else (delta0, delta1, scale)

            def load(base):
                return builder.load(_element_pointer(builder, real, base, index, vector), align=4)

            def bits(x):
                return f32_to_bf16_ir(builder, x, target.bf16_convert)

            a0, a1 = load(p0), load(p1)
            e0, e1 = load(dp0), load(dp1)
            if dropout:
                z0, z1 = load(keep[0]), load(keep[1])
                e0, e1 = builder.fmul(e0, z0), builder.fmul(e1, z1)
            g0 = builder.fmul(builder.fmul(a0, builder.fsub(e0, d0)), s)
            g1 = builder.fmul(builder.fmul(a1, builder.fsub(e1, d1)), s)
            if dropout:
                a0, a1 = builder.fmul(a0, z0), builder.fmul(a1, z1)
            pb0, pb1, gb0, gb1 = bits(a0), bits(a1), bits(g0), bits(g1)
            pair_index = builder.mul(index, ir.Constant(ir.IntType(64), 2))
            if vector:
                pairs_type = ir.VectorType(i16, 2 * real.width).as_pointer()
                for first, second, base in ((pb0, pb1, p_pairs), (gb0, gb1, ds_pairs)):
                    destination = builder.bitcast(builder.gep(base, [pair_index]), pairs_type)
                    builder.store(builder.shuffle_vector(first, second, interleave), destination, align=2)
                row_type = ir.VectorType(i16, real.width).as_pointer()
                for value, base in ((gb0, rows0), (gb1, rows1)):
                    builder.store(value, builder.bitcast(builder.gep(base, [index]), row_type), align=2)
            else:
                second = builder.add(pair_index, ir.Constant(ir.IntType(64), 1))
                for first_value, second_value, base in ((pb0, pb1, p_pairs), (gb0, gb1, ds_pairs)):
                    builder.store(first_value, builder.gep(base, [pair_index]))
                    builder.store(second_value, builder.gep(base, [second]))
                builder.store(gb0, builder.gep(rows0, [index]))
                builder.store(gb1, builder.gep(rows1, [index]))

        _row_loops(builder, real, n, body, 1)
        return None

    return build


def _gradient_pairs_function(module, target=TARGET, dropout=False):
    real, i16p = _Real(types.float32), ir.IntType(16).as_pointer()
    f32p = real.scalar.as_pointer()
    return _define(module, "attnkit_gradient_pairs_dropout_f32" if dropout else "attnkit_gradient_pairs_f32",
                   ir.VoidType(), [f32p] * 4 + [ir.IntType(64)] + [real.scalar] * 3 + [i16p] * 4 + [f32p] * (2 * dropout),
                   _build_gradient_pairs(real, target, dropout))  # fmt: skip


def _check_real(*arguments):
    return all(a in (types.float32, types.float64) for a in arguments) and len(set(arguments)) == 1


def _row_array(row):
    """The _Real of a 1-D float32/float64 array type, or None."""
    if isinstance(row, types.Array) and row.ndim == 1 and _check_real(row.dtype):
        return _Real(row.dtype)
    return None


def _row_max_function(module, real):
    return _define(module, f"attnkit_row_max_{real.tag}", real.scalar,
                   [real.scalar.as_pointer(), ir.IntType(64), real.scalar], _build_row_max(real))  # fmt: skip


def _exp2_affine_function(module, real, target=TARGET):
    return _define(module, f"attnkit_exp2_affine_{real.tag}", real.scalar,
                   [real.scalar.as_pointer(), ir.IntType(64), real.scalar, real.scalar],
                   _build_exp2_affine(real, target=target))  # fmt: skip


def _exp2_affine_bits_function(module, real):
    return _define(module, f"attnkit_exp2_affine_bits_{real.tag}", real.scalar,
                   [real.scalar.as_pointer(), ir.IntType(64), real.scalar, real.scalar, ir.IntType(16).as_pointer()],
                   _build_exp2_affine(real, bits=True))  # fmt: skip


def define_row_functions(module, dtype=types.float32, target=TARGET):
    """row_max and exp2_affine of `dtype` as IR functions in module, for `target` (a target.Target;
    also what tests/test_targets.py cross-compiles for other CPUs). Returns their names."""
    real = _Real(dtype)
    return [_row_max_function(module, real).name, _exp2_affine_function(module, real, target).name]


def _call_on_row(context, builder, signature, args, function, real):
    """Call an IR row function on the array argument's (pointer, length), then the other arguments."""
    array = context.make_array(signature.args[0])(context, builder, args[0])
    base = builder.bitcast(array.data, real.scalar.as_pointer())
    n = builder.extract_value(array.shape, 0)
    return builder.call(function, [base, n, *args[1:]])


def _row_stride(context, builder, array_type, array_value):
    """The row stride (bytes) of a 2-D array value."""
    array = context.make_array(array_type)(context, builder, array_value)
    return cgutils.unpack_tuple(builder, array.strides, 2)[0]


def _row_start(context, builder, array_type, array_value, row, element_type):
    """Pointer to row `row` of a 2-D array value, as element_type* (no row array made)."""
    array = context.make_array(array_type)(context, builder, array_value)
    row_stride = _row_stride(context, builder, array_type, array_value)
    start = builder.gep(builder.bitcast(array.data, ir.IntType(8).as_pointer()), [builder.mul(row, row_stride)])
    return builder.bitcast(start, element_type.as_pointer())


def _call_on_matrix_row(context, builder, signature, args, function, real, *extra):
    """Call an IR row function on row args[1] of the 2-D array argument (its pointer and width): no
    row array is made, so no reference count moves (a row view costs ~20 ns: bench/results/tiny-calls.md)."""
    array = context.make_array(signature.args[0])(context, builder, args[0])
    width = cgutils.unpack_tuple(builder, array.shape, 2)[1]
    start = _row_start(context, builder, signature.args[0], args[0], args[1], real.scalar)
    return builder.call(function, [start, width, *args[2:], *extra])


def _matrix_row(matrix, r):
    """The _Real of a 2-D float32/float64 array type with an integer row index, or None."""
    if isinstance(matrix, types.Array) and matrix.ndim == 2 and _check_real(matrix.dtype) and isinstance(
            r, types.Integer):  # fmt: skip
        return _Real(matrix.dtype)
    return None


@intrinsic
def _row_max_at_intrinsic(typingctx, matrix, r, initial):
    real = _matrix_row(matrix, r)
    if real is None or initial != matrix.dtype:
        return None

    def codegen(context, builder, signature, args):
        return _call_on_matrix_row(context, builder, signature, args, _row_max_function(builder.module, real), real)

    return initial(matrix, r, initial), codegen


@intrinsic
def _exp2_affine_at_intrinsic(typingctx, matrix, r, multiplier, shift):
    real = _matrix_row(matrix, r)
    if real is None or multiplier != matrix.dtype or shift != matrix.dtype:
        return None

    def codegen(context, builder, signature, args):
        function = _exp2_affine_function(builder.module, real)
        return _call_on_matrix_row(context, builder, signature, args, function, real)

    return multiplier(matrix, r, multiplier, shift), codegen


@intrinsic
def _exp2_affine_bits_at_intrinsic(typingctx, matrix, r, multiplier, shift, bits):
    real = _matrix_row(matrix, r)
    if real is None or real.tag != "f32" or multiplier != matrix.dtype or shift != matrix.dtype:
        return None
    if not (isinstance(bits, types.Array) and bits.ndim == 2 and bits.dtype == types.uint16):
        return None

    def codegen(context, builder, signature, args):
        function = _exp2_affine_bits_function(builder.module, real)
        bits_row = _row_start(context, builder, signature.args[4], args[4], args[1], ir.IntType(16))
        return _call_on_matrix_row(context, builder, signature, args[:4], function, real, bits_row)

    return multiplier(matrix, r, multiplier, shift, bits), codegen


@intrinsic
def _gradient_pairs_at_intrinsic(typingctx, p, dp, r0, r1, n, delta0, delta1, scale, p_pairs, ds_pairs, pair, ds_rows,
                                 keep):  # fmt: skip
    def matrix_of(array, dtype):
        return isinstance(array, types.Array) and array.ndim == 2 and array.dtype == dtype

    dropout = not isinstance(keep, (types.NoneType, types.Omitted))
    if not (matrix_of(p, types.float32) and matrix_of(dp, types.float32)
            and all(matrix_of(a, types.uint16) for a in (p_pairs, ds_pairs, ds_rows))
            and all(isinstance(i, types.Integer) for i in (r0, r1, n, pair))
            and all(x == types.float32 for x in (delta0, delta1, scale))
            and (not dropout or matrix_of(keep, types.float32))):  # fmt: skip
        return None

    def codegen(context, builder, signature, args):
        types_ = signature.args
        f32, i16 = ir.FloatType(), ir.IntType(16)
        p_rows = [_row_start(context, builder, types_[0], args[0], args[r], f32) for r in (2, 3)]
        dp_rows = [_row_start(context, builder, types_[1], args[1], args[r], f32) for r in (2, 3)]
        pairs = [_row_start(context, builder, types_[i], args[i], args[10], i16) for i in (8, 9)]
        rows = [_row_start(context, builder, types_[11], args[11], args[r], i16) for r in (2, 3)]
        keep_rows = [_row_start(context, builder, types_[12], args[12], args[r], f32) for r in (2, 3)] if dropout else []
        n = context.cast(builder, args[4], types_[4], types.int64)
        function = _gradient_pairs_function(builder.module, dropout=dropout)
        builder.call(function, [*p_rows, *dp_rows, n, args[5], args[6], args[7], *pairs, *rows, *keep_rows])
        return context.get_dummy_value()

    return types.none(p, dp, r0, r1, n, delta0, delta1, scale, p_pairs, ds_pairs, pair, ds_rows, keep), codegen


@intrinsic
def _row_max_intrinsic(typingctx, row, initial):
    real = _row_array(row)
    if real is None or initial != row.dtype:
        return None

    def codegen(context, builder, signature, args):
        return _call_on_row(context, builder, signature, args, _row_max_function(builder.module, real), real)

    return initial(row, initial), codegen


@intrinsic
def _exp2_affine_intrinsic(typingctx, row, multiplier, shift):
    real = _row_array(row)
    if real is None or multiplier != row.dtype or shift != row.dtype:
        return None

    def codegen(context, builder, signature, args):
        return _call_on_row(context, builder, signature, args, _exp2_affine_function(builder.module, real), real)

    return multiplier(row, multiplier, shift), codegen


@jit(inline="always")
def row_max(row, initial):
    """max(initial, max(row)) of a contiguous 1-D row; NaN entries ignored. initial has row's dtype."""
    if row.shape[0] > 1 and row.strides[0] != row.itemsize:
        raise ValueError("row_max: the row must be contiguous")
    return _row_max_intrinsic(row, initial)


@jit(inline="always")
def exp2_affine(row, multiplier, shift):
    """row[c] = 2**(row[c] * multiplier - shift) in place; returns the new row's sum.

    row is a contiguous 1-D array; multiplier and shift have its dtype.
    """
    if row.shape[0] > 1 and row.strides[0] != row.itemsize:
        raise ValueError("exp2_affine: the row must be contiguous")
    return _exp2_affine_intrinsic(row, multiplier, shift)


@intrinsic
def _contiguous_row_intrinsic(typingctx, matrix, r):
    if not (isinstance(matrix, types.Array) and matrix.ndim == 2 and isinstance(r, types.Integer)):
        return None
    row_type = types.Array(matrix.dtype, 1, "C", readonly=not matrix.mutable, aligned=matrix.aligned)

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        element = context.get_data_type(matrix.dtype)
        index = context.cast(builder, args[1], signature.args[1], types.intp)
        width = cgutils.unpack_tuple(builder, array.shape, 2)[1]
        start = _row_start(context, builder, signature.args[0], args[0], index, element)
        return _row_view(context, builder, row_type, element, start, width)

    return row_type(matrix, r), codegen


def _row_view(context, builder, row_type, element, start, width):
    """A 1-D 'C' array value of row_type: width elements from the element* start, no MemInfo."""
    itemsize = context.get_constant(types.intp, context.get_abi_sizeof(element))
    row = context.make_array(row_type)(context, builder)
    context.populate_array(row, data=start, shape=cgutils.pack_array(builder, [width]),
                           strides=cgutils.pack_array(builder, [itemsize]), itemsize=itemsize, meminfo=None)
    return row._getvalue()


@intrinsic
def cache_row(typingctx, array, b, h, j):
    """array[b, h, j] of a 4-D array whose last axis is contiguous, C-contiguous or not (a cache in
    flash-attn's (B, N, H, D) layout seen as (B, H, N, D)), as a 1-D 'C' array: loops over it
    vectorise, where array[b, h, j, c] with strides known only at run time stayed scalar (3.6x
    slower), and no view is made (Numba's array[b, h, j] checks and wraps each index: a bf16 decode
    of short rows ran ~15% slower through it). No reference count: the caller keeps array alive.
    The caller guarantees the last axis' stride is the itemsize (kernels/cpu/plan._kernel_array,
    _rows_in_place)."""
    indices = (b, h, j)
    if not (isinstance(array, types.Array) and array.ndim == 4 and all(isinstance(i, types.Integer) for i in indices)):
        return None
    row_type = types.Array(array.dtype, 1, "C", readonly=not array.mutable, aligned=array.aligned)

    def codegen(context, builder, signature, args):
        value = context.make_array(signature.args[0])(context, builder, args[0])
        width = cgutils.unpack_tuple(builder, value.shape, 4)[3]
        element = context.get_data_type(array.dtype)
        start = builder.bitcast(row_address(context, builder, signature.args[0], args[0], args[1:], signature.args[1:]),
                                element.as_pointer())  # fmt: skip
        return _row_view(context, builder, row_type, element, start, width)

    return row_type(array, b, h, j), codegen


def row_address(context, builder, array_type, array_value, indices, index_types):
    """i8* to array[indices] (the leading axes' indices of an array value), from its strides."""
    value = context.make_array(array_type)(context, builder, array_value)
    strides = cgutils.unpack_tuple(builder, value.strides, array_type.ndim)
    offset = context.get_constant(types.intp, 0)
    for index, index_type, stride in zip(indices, index_types, strides):
        offset = builder.add(offset, builder.mul(context.cast(builder, index, index_type, types.intp), stride))
    return builder.gep(builder.bitcast(value.data, ir.IntType(8).as_pointer()), [offset])


@jit(inline="always")
def contiguous_row(matrix, r):
    """Row r of a 2-D array whose rows are contiguous (a slab of a padded tile, typed 'A'), as a 1-D
    'C' array: loops over it vectorise, where matrix[r, c] with a stride known only at run time kept
    them scalar (ALiBi's row pass ran at ~1.2 ns a score: docs/kernel-log.md v48). No reference
    count: the view borrows matrix's memory, which the caller keeps alive while it is used."""
    if matrix.shape[1] > 1 and matrix.strides[1] != matrix.itemsize:
        raise ValueError("contiguous_row: the rows must be contiguous")
    return _contiguous_row_intrinsic(matrix, r)


@jit(inline="always")
def row_max_at(matrix, r, initial):
    """row_max(matrix[r], initial) for a 2-D array with contiguous rows, the row never made an array."""
    if matrix.shape[1] > 1 and matrix.strides[1] != matrix.itemsize:
        raise ValueError("row_max_at: the rows must be contiguous")
    return _row_max_at_intrinsic(matrix, r, initial)


@jit(inline="always")
def exp2_affine_at(matrix, r, multiplier, shift):
    """exp2_affine(matrix[r], multiplier, shift) for a 2-D array with contiguous rows, the row never
    made an array."""
    if matrix.shape[1] > 1 and matrix.strides[1] != matrix.itemsize:
        raise ValueError("exp2_affine_at: the rows must be contiguous")
    return _exp2_affine_at_intrinsic(matrix, r, multiplier, shift)


@jit(inline="always")
def exp2_affine_bits_at(matrix, r, multiplier, shift, bits):
    """exp2_affine_at(matrix, r, multiplier, shift), each new value also rounded to bf16 into
    bits[r, :width] (float32 matrix, uint16 bits with rows at least as wide, both rows contiguous):
    one pass over the row where rounding it afterwards read it again."""
    if matrix.shape[1] > 1 and matrix.strides[1] != matrix.itemsize or bits.shape[1] > 1 and bits.strides[1] != 2:
        raise ValueError("exp2_affine_bits_at: the rows must be contiguous")
    if bits.shape[0] <= r or bits.shape[1] < matrix.shape[1]:
        raise ValueError("exp2_affine_bits_at: bits must hold the row")
    return _exp2_affine_bits_at_intrinsic(matrix, r, multiplier, shift, bits)


@jit(inline="always")
def gradient_pairs(p, dp, rows, n, delta, scale, p_pairs, ds_pairs, ds_rows, keep=None):
    """The backward's three bf16 operands of a tile's first `rows` rows and n columns, in one pass:
    dS = P (dP - delta[r]) scale from float32 P (p) and dP (dp); P and dS rounded to bf16 into row
    pairs, p_pairs[i, 2c + t] / ds_pairs[i, 2c + t] = row 2i + t (zero past the last row: the B
    operands), and dS rounded into ds_rows[r, c] (the A operand). keep: dropout's factors Z (a float32
    tile like p), or None: with them dS = P (dP Z - delta[r]) scale and the P stored is P Z. Writes
    those columns only (the caller zeroes any padding); every row contiguous. The arrays are checked
    once, then the row pairs go to the IR function without a reference count moving."""
    if (p.shape[1] > 1 and p.strides[1] != 4 or dp.shape[1] > 1 and dp.strides[1] != 4
            or p_pairs.shape[1] > 1 and p_pairs.strides[1] != 2 or ds_pairs.shape[1] > 1 and ds_pairs.strides[1] != 2
            or ds_rows.shape[1] > 1 and ds_rows.strides[1] != 2):  # fmt: skip
        raise ValueError("gradient_pairs: the rows must be contiguous")
    n_pairs = (rows + 1) // 2
    if (min(rows, n) < 0 or rows > min(p.shape[0], dp.shape[0], ds_rows.shape[0], delta.shape[0])
            or n > min(p.shape[1], dp.shape[1], ds_rows.shape[1]) or 2 * n > min(p_pairs.shape[1], ds_pairs.shape[1])
            or n_pairs > min(p_pairs.shape[0], ds_pairs.shape[0])):  # fmt: skip
        raise ValueError("gradient_pairs: the operands must hold the tile")
    if keep is not None and (rows > keep.shape[0] or n > keep.shape[1] or keep.shape[1] > 1 and keep.strides[1] != 4):
        raise ValueError("gradient_pairs: keep must hold the tile, its rows contiguous")
    for pair in range(n_pairs):
        r0 = 2 * pair
        r1 = min(r0 + 1, rows - 1)  # an odd last row pairs with itself; its copy is zeroed below
        _gradient_pairs_at_intrinsic(p, dp, r0, r1, n, delta[r0], delta[r1], scale, p_pairs, ds_pairs, pair, ds_rows,
                                     keep)  # fmt: skip
    if rows % 2 == 1:
        for c in range(n):
            p_pairs[n_pairs - 1, 2 * c + 1] = 0
            ds_pairs[n_pairs - 1, 2 * c + 1] = 0


@intrinsic
def wide_vectors(typingctx):
    """Called first in a function: LLVM vectorises the function's loops at the target's full width.

    LLVM's tuning for Intel's AVX-512 server and client cores (Ice Lake, Sapphire Rapids, the
    "rocketlake" this VM reports) prefers 256-bit vectors for loops it vectorises itself, for the
    clock speed 512-bit instructions once cost. Decode's loops stream K and V from memory a row at
    a time, and read them faster at 512 bits (bench/results/decode-bandwidth.md, docs/kernel-log.md
    v30); the prefill kernels' loops did not gain, so the attribute is per function. A no-op on
    targets whose widest vectors are narrower (LLVM never vectorises wider than the registers)."""

    def codegen(context, builder, signature, args):
        # llvmlite's attribute set knows no string attributes: add the text as LLVM spells it
        set.add(builder.function.attributes, f'"prefer-vector-width"="{TARGET.lanes * 32}"')
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def frame_array(typingctx, like, length):
    """A 1-D 'C' array of `length` (a constant) elements of like's dtype in the calling function's
    stack frame, uninitialised. Indexed by constants once a loop of constant trip count over it is
    vectorised and unrolled, LLVM keeps it in registers (SROA): accumulators that a loop over keys
    updates without a load and a store per key. It lives as long as the call: never return it."""
    if not isinstance(like, types.Array) or not isinstance(length, types.IntegerLiteral):
        return None
    size = length.literal_value
    block_type = types.Array(like.dtype, 1, "C")

    def codegen(context, builder, signature, args):
        element = context.get_data_type(like.dtype)
        storage = cgutils.alloca_once(builder, ir.ArrayType(element, size))
        start = builder.bitcast(storage, element.as_pointer())
        return _row_view(context, builder, block_type, element, start, context.get_constant(types.intp, size))

    return block_type(like, length), codegen


@intrinsic
def prefetch(typingctx, address):
    """Ask for the cache line at address (an integer) ahead of its use: prefetcht0, which never
    faults and returns nothing, so an address past the end of an array is harmless."""

    def codegen(context, builder, signature, args):
        pointer = builder.inttoptr(args[0], ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [pointer.type, i32, i32, i32]), "llvm.prefetch.p0")
        # a read, kept in every cache level (locality 3), of data (not instructions)
        builder.call(function, [pointer, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(types.intp), codegen
