"""Decode's dot products, a block of keys at a time, their lanes summed by one transposed tree.

A decode tile has few query rows (a GQA group), so its scores are dot products of each row with
each key's row of K, read in memory order. Summed a key at a time, each (row, key) product ended in
its own horizontal sum: a 16-lane vector folded to one number in ~11 instructions, about as many
as the key's FMAs for 4 rows (bench/results/decode-bandwidth.md). Here 4 rows x LANES / 4 keys (or
MHA's one row x LANES keys) keep LANES vector accumulators, and one tree folds all of them at once:
at each level two vectors become one, each source keeping half as many partial sums (4 levels, 15
adds and 30 shuffles for 16 sources, where one at a time took ~16 x 11 instructions).

dots_block(k, b, h, j, q_rows, q_bits, r, s, col, rows): s[r + i, col + t] = q_rows[r + i] . k[b, h,
j + t] for i < rows and t < LANES / rows, rows a constant (4, a GQA group's: KEYS_PER_BLOCK keys; or
1, MHA's: LANES keys), K float32 or bf16 bits. bf16 K is widened as loaded, or, on a target with a
bf16 pair product (VDPBF16PS, BFDOT: PAIRS), multiplied as it is with q's rows as bf16 bits (q_bits):
half the multiply-adds and no widening, the products exact in float32 either way (q and K are bf16
values); from the cache 10-20% faster on the Zen 4 VM (kernel log v65). The caller guarantees that
K's rows are contiguous, D is a multiple of LANES, and the rows and keys exist (decode.py's
_rows_blocked; a D of another size takes the key-at-a-time loop).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .microkernels import _Kind, bf16_kind
from .simd import _define, _row_start, _row_stride, row_address
from .target import TARGET

__all__ = ["DOTS_ROWS", "KEYS_PER_BLOCK", "LANES", "PAIRS", "dots_block", "dots_function", "transposed_sum"]

LANES = TARGET.lanes
DOTS_ROWS = 4  # query rows a block serves (a GQA group of 4, or each 4 of a larger one)
KEYS_PER_BLOCK = LANES // DOTS_ROWS  # so that rows x keys accumulators fill one vector's lanes when summed
# (one row, MHA's: LANES keys a block)
# The target's bf16 pair product ("dpbf16", "bfdot"), or None: bf16 K and q multiplied as they are
PAIRS = None if bf16_kind(TARGET) == "widen" else bf16_kind(TARGET)

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


def _load_pairs(builder, kind, base, offset):
    """2 LANES bf16 elements at base (i8*) + offset bytes, as the pair operand of kind's update."""
    pointer = builder.bitcast(builder.gep(base, [offset]), ir.VectorType(_I32, kind.lanes).as_pointer())
    return kind.prepare_b(builder, builder.load(pointer, align=2))


def _fmuladd(builder, a, b, c):
    """a * b + c, elementwise: fused where the target has FMA (llvm.fmuladd)."""
    name = f"llvm.fmuladd.v{a.type.count}f32"
    function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(a.type, [a.type] * 3), name)
    return builder.call(function, [a, b, c])


def dots_function(module, element, lanes=LANES, rows=DOTS_ROWS):
    """The IR function void(k i8*, key stride, q i8*, q row stride, s float*, s row stride, d) of
    dots_block for K of `element` at `lanes` float32 lanes: "f32" (q float32), "bf16" (K's bits widened,
    q float32), or a bf16 pair product, "dpbf16" (x86 VDPBF16PS) or "bfdot" (AArch64 BFDOT), q bf16
    bits too. Strides in bytes for K and q, in elements for s; d a multiple of lanes (2 lanes for
    the pair products). rows: 4 (a GQA group's) or 1 (MHA), times lanes / rows keys."""
    keys = lanes // rows
    vector = ir.VectorType(_F32, lanes)
    pairs = element in ("dpbf16", "bfdot")
    kind = _Kind(element, lanes) if pairs else None
    step = 2 * lanes if pairs else lanes  # elements a step
    k_bytes, q_bytes = (4, 4) if element == "f32" else (2, 2) if pairs else (2, 4)

    def build(builder, args):
        k, k_stride, q, q_stride, s, s_stride, d = args
        # accumulators in stack slots, which LLVM keeps in registers (SROA): row i, key t
        slots = [[cgutils.alloca_once_value(builder, ir.Constant(vector, [0.0] * lanes)) for _ in range(keys)]
                 for _ in range(rows)]  # fmt: skip
        with cgutils.for_range(builder, builder.udiv(d, ir.Constant(_I64, step))) as loop:
            column = builder.mul(loop.index, ir.Constant(_I64, step))
            k_offset, q_offset = (builder.mul(column, ir.Constant(_I64, size)) for size in (k_bytes, q_bytes))
            key_offsets = [builder.add(builder.mul(ir.Constant(_I64, t), k_stride), k_offset) for t in range(keys)]
            if pairs:
                key_vectors = [_load_pairs(builder, kind, k, offset) for offset in key_offsets]
            else:
                key_vectors = [_load_row_vector(builder, element, k, offset, lanes) for offset in key_offsets]
            for i in range(rows):
                row_offset = builder.add(builder.mul(ir.Constant(_I64, i), q_stride), q_offset)
                if pairs:
                    row = _load_pairs(builder, kind, q, row_offset)
                else:
                    row = _load_row_vector(builder, "f32", q, row_offset, lanes)
                for t in range(keys):
                    slot = slots[i][t]
                    if pairs:
                        builder.store(kind.update(builder, builder.load(slot), row, key_vectors[t]), slot)
                    else:
                        builder.store(_fmuladd(builder, row, key_vectors[t], builder.load(slot)), slot)
        sums = transposed_sum(builder, [builder.load(slots[i][t]) for i in range(rows) for t in range(keys)],
                              lanes)  # lane i * keys + t: row i, key t
        for i in range(rows):
            values = builder.shuffle_vector(sums, ir.Constant(vector, ir.Undefined),
                                            ir.Constant(ir.VectorType(_I32, keys), [i * keys + t for t in range(keys)]))
            row_start = builder.gep(s, [builder.mul(ir.Constant(_I64, i), s_stride)])
            builder.store(values, builder.bitcast(row_start, values.type.as_pointer()), align=4)

    return _define(module, f"attnkit_dots_block_{element}_{lanes}x{rows}", ir.VoidType(),
                   [ir.IntType(8).as_pointer(), _I64, ir.IntType(8).as_pointer(), _I64, _F32.as_pointer(), _I64, _I64],
                   build)  # fmt: skip


@intrinsic
def dots_block(typingctx, k, b, h, j, q_rows, q_bits, r, s, col, rows):
    """See the module docstring: the caller checks the shapes (no bounds are checked here). q_bits:
    the same rows as q_rows in q's own dtype; read instead of q_rows where K and q_bits are bf16
    bits, the target has a bf16 pair product (PAIRS) and D is a multiple of 2 LANES. For other
    dtypes (K neither float32 nor bf16 bits, or float64 rows: no caller blocks those) it does nothing,
    so that a caller compiled for float64 still types; an intrinsic, not an overload, as it compiles
    no function of its own."""
    integers = (b, h, j, r, col)
    if not (isinstance(k, types.Array) and k.ndim == 4 and all(isinstance(x, types.Integer) for x in integers)):
        return None
    if not (isinstance(rows, types.IntegerLiteral) and rows.literal_value in (1, DOTS_ROWS)):
        return None
    n_rows = rows.literal_value
    if not all(isinstance(matrix, types.Array) and matrix.ndim == 2 for matrix in (q_rows, q_bits, s)):
        return None
    element = {types.float32: "f32", types.uint16: "bf16"}.get(k.dtype)
    if q_rows.dtype != types.float32 or s.dtype != types.float32:
        element = None
    pairs = element == "bf16" and q_bits.dtype == types.uint16 and PAIRS is not None

    def codegen(context, builder, signature, args):
        if element is None:
            return context.get_dummy_value()
        i8p = ir.IntType(8).as_pointer()
        k_value = context.make_array(signature.args[0])(context, builder, args[0])
        strides = cgutils.unpack_tuple(builder, k_value.strides, 4)
        width = cgutils.unpack_tuple(builder, k_value.shape, 4)[3]
        r, col = (context.cast(builder, args[i], signature.args[i], types.intp) for i in (6, 8))
        k_start = row_address(context, builder, signature.args[0], args[0], args[1:4], signature.args[1:4])
        s_start = builder.gep(_row_start(context, builder, signature.args[7], args[7], r, _F32), [col])
        s_stride = builder.udiv(_row_stride(context, builder, signature.args[7], args[7]), ir.Constant(_I64, 4))

        def call(element, index):  # q: q_rows (index 4) or q_bits (5)
            q_start = builder.bitcast(_row_start(context, builder, signature.args[index], args[index], r, _F32), i8p)
            q_stride = _row_stride(context, builder, signature.args[index], args[index])
            builder.call(dots_function(builder.module, element, LANES, n_rows),
                         [k_start, strides[2], q_start, q_stride, s_start, s_stride, width])  # fmt: skip

        if not pairs:
            call(element, 4)
            return context.get_dummy_value()
        whole_pairs = builder.icmp_unsigned("==", builder.urem(width, ir.Constant(_I64, 2 * LANES)),
                                            ir.Constant(_I64, 0))  # fmt: skip
        with builder.if_else(whole_pairs) as (then, otherwise):
            with then:
                call(PAIRS, 5)
            with otherwise:
                call(element, 4)
        return context.get_dummy_value()

    return types.void(k, b, h, j, q_rows, q_bits, r, s, col, rows), codegen
