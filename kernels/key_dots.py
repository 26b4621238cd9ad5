"""Decode's dot products, a block of keys at a time, their lanes summed by one transposed tree.

A decode tile has few query rows (a GQA group), so its scores are dot products of each row with
each key's row of K, read in memory order. Summed a key at a time, each (row, key) product ended in
its own horizontal sum: a 16-lane vector folded to one number in ~11 instructions, about as many
as the key's FMAs for 4 rows (bench/results/decode-bandwidth.md). Here 4 rows x LANES / 4 keys
keep LANES vector accumulators, and one tree folds all of them at once: at each level two vectors
become one, each source keeping half as many partial sums (4 levels, 15 adds and 30 shuffles for
16 sources, where one at a time took ~16 x 11 instructions).

dots_block(k, b, h, j, q_rows, r, s, col): s[r + i, col + t] = q_rows[r + i] . k[b, h, j + t] for
i < 4, t < KEYS_PER_BLOCK, K float32 or bf16 bits (widened as loaded). The caller guarantees that
K's rows are contiguous, D is a multiple of LANES, and the rows and keys exist (decode.py's
_four_rows_blocked; a D of another size takes the key-at-a-time loop).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .simd import _define, _row_start
from .target import TARGET

__all__ = ["DOTS_ROWS", "KEYS_PER_BLOCK", "LANES", "dots_block", "dots_function", "transposed_sum"]

LANES = TARGET.lanes
DOTS_ROWS = 4  # query rows a block serves (a GQA group of 4, or each 4 of a larger one)
KEYS_PER_BLOCK = LANES // DOTS_ROWS  # so that rows x keys accumulators fill one vector's lanes when summed

_F32 = ir.FloatType()
_I16, _I32, _I64 = ir.IntType(16), ir.IntType(32), ir.IntType(64)


def transposed_sum(builder, sources, lanes):
    """One <lanes x float> vector whose lane i is the sum of sources[i]'s lanes (len(sources) ==
    lanes, a power of two). Each level pairs vectors x, y holding s sources of p partial sums each
    (contiguous blocks of p lanes) into one holding 2s sources of p / 2: the first halves of every
    block (x's, then y's) plus the second halves."""
    vectors = list(sources)
    partials = lanes
    while partials > 1:
        half = partials // 2
        blocks = lanes // partials  # sources per vector
        # indices into x | y concatenated: y's blocks follow x's, from lane `lanes` on
        low = [block * partials + i for block in range(2 * blocks) for i in range(half)]
        high = [index + half for index in low]
        paired = []
        for x, y in zip(vectors[0::2], vectors[1::2]):
            first = builder.shuffle_vector(x, y, ir.Constant(ir.VectorType(_I32, lanes), low))
            second = builder.shuffle_vector(x, y, ir.Constant(ir.VectorType(_I32, lanes), high))
            paired.append(builder.fadd(first, second))
        vectors = paired
        partials = half
    return vectors[0]


def _load_row_vector(builder, element, base, offset, lanes):
    """LANES elements of a row at base (i8*) + offset bytes, as float32 (bf16 bits widened)."""
    pointer = builder.gep(base, [offset])
    if element == "f32":
        return builder.load(builder.bitcast(pointer, ir.VectorType(_F32, lanes).as_pointer()), align=4)
    bits = builder.load(builder.bitcast(pointer, ir.VectorType(_I16, lanes).as_pointer()), align=2)
    wide = builder.shl(builder.zext(bits, ir.VectorType(_I32, lanes)),
                       ir.Constant(ir.VectorType(_I32, lanes), [16] * lanes))  # bf16 bits: a float32's high half
    return builder.bitcast(wide, ir.VectorType(_F32, lanes))


def _fmuladd(builder, a, b, c):
    """a * b + c, elementwise: fused where the target has FMA (llvm.fmuladd)."""
    name = f"llvm.fmuladd.v{a.type.count}f32"
    function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(a.type, [a.type] * 3), name)
    return builder.call(function, [a, b, c])


def dots_function(module, element, lanes=LANES):
    """The IR function void(k i8*, key stride, q float*, q row stride, s float*, s row stride, d) of
    dots_block for K of `element` ("f32", or "bf16" bits) at `lanes` float32 lanes: K's stride in
    bytes, q's and s's in elements; d a multiple of lanes."""
    keys = lanes // DOTS_ROWS
    vector = ir.VectorType(_F32, lanes)
    element_bytes = 4 if element == "f32" else 2

    def build(builder, args):
        k, k_stride, q, q_stride, s, s_stride, d = args
        # accumulators in stack slots, which LLVM keeps in registers (SROA): row i, key t
        slots = [[cgutils.alloca_once_value(builder, ir.Constant(vector, [0.0] * lanes)) for _ in range(keys)]
                 for _ in range(DOTS_ROWS)]  # fmt: skip
        q_bytes = builder.bitcast(q, ir.IntType(8).as_pointer())
        with cgutils.for_range(builder, builder.udiv(d, ir.Constant(_I64, lanes))) as loop:
            column = builder.mul(loop.index, ir.Constant(_I64, lanes))
            k_offset = builder.mul(column, ir.Constant(_I64, element_bytes))
            key_vectors = [
                _load_row_vector(builder, element, k, builder.add(builder.mul(ir.Constant(_I64, t), k_stride), k_offset),
                                 lanes)
                for t in range(keys)
            ]  # fmt: skip
            for i in range(DOTS_ROWS):
                q_offset = builder.shl(builder.add(builder.mul(ir.Constant(_I64, i), q_stride), column),
                                       ir.Constant(_I64, 2))  # float32: 4 bytes an element
                row = _load_row_vector(builder, "f32", q_bytes, q_offset, lanes)
                for t in range(keys):
                    builder.store(_fmuladd(builder, row, key_vectors[t], builder.load(slots[i][t])), slots[i][t])
        sums = transposed_sum(builder, [builder.load(slots[i][t]) for i in range(DOTS_ROWS) for t in range(keys)],
                              lanes)  # lane i * keys + t: row i, key t
        for i in range(DOTS_ROWS):
            values = builder.shuffle_vector(sums, ir.Constant(vector, ir.Undefined),
                                            ir.Constant(ir.VectorType(_I32, keys), [i * keys + t for t in range(keys)]))
            row_start = builder.gep(s, [builder.mul(ir.Constant(_I64, i), s_stride)])
            builder.store(values, builder.bitcast(row_start, values.type.as_pointer()), align=4)

    return _define(module, f"attnkit_dots_block_{element}_{lanes}", ir.VoidType(),
                   [ir.IntType(8).as_pointer(), _I64, _F32.as_pointer(), _I64, _F32.as_pointer(), _I64, _I64],
                   build)  # fmt: skip


@intrinsic
def dots_block(typingctx, k, b, h, j, q_rows, r, s, col):
    """See the module docstring: the caller checks the shapes (no bounds are checked here). For other
    dtypes (K neither float32 nor bf16 bits, or float64 rows: no caller blocks those) it does nothing,
    so that a caller compiled for float64 still types; an intrinsic, not an overload, as it compiles
    no function of its own."""
    integers = (b, h, j, r, col)
    if not (isinstance(k, types.Array) and k.ndim == 4 and all(isinstance(x, types.Integer) for x in integers)):
        return None
    if not all(isinstance(matrix, types.Array) and matrix.ndim == 2 for matrix in (q_rows, s)):
        return None
    element = {types.float32: "f32", types.uint16: "bf16"}.get(k.dtype)
    if q_rows.dtype != types.float32 or s.dtype != types.float32:
        element = None

    def codegen(context, builder, signature, args):
        if element is None:
            return context.get_dummy_value()
        k_value = context.make_array(signature.args[0])(context, builder, args[0])
        strides = cgutils.unpack_tuple(builder, k_value.strides, 4)
        width = cgutils.unpack_tuple(builder, k_value.shape, 4)[3]
        b, h, j, r, col = (context.cast(builder, args[i], signature.args[i], types.intp) for i in (1, 2, 3, 5, 7))
        offset = builder.add(builder.add(builder.mul(b, strides[0]), builder.mul(h, strides[1])),
                             builder.mul(j, strides[2]))  # fmt: skip
        k_start = builder.gep(builder.bitcast(k_value.data, ir.IntType(8).as_pointer()), [offset])
        q_start = _row_start(context, builder, signature.args[4], args[4], r, _F32)
        s_start = builder.gep(_row_start(context, builder, signature.args[6], args[6], r, _F32), [col])
        q_stride, s_stride = (
            builder.udiv(cgutils.unpack_tuple(builder, context.make_array(signature.args[i])(
                context, builder, args[i]).strides, 2)[0], ir.Constant(_I64, 4))
            for i in (4, 6)
        )  # fmt: skip
        function = dots_function(builder.module, element)
        builder.call(function, [k_start, strides[2], q_start, q_stride, s_start, s_stride, width])
        return context.get_dummy_value()

    return types.void(k, b, h, j, q_rows, r, s, col), codegen
