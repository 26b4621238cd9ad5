"""Decode's P V for a bf16 cache, two keys a step on the target's bf16 pair product.

P V adds each key's V row, scaled by the row's weight, to a GQA group's output rows. With bf16 V
widened to float32 that is, per key and 16 columns, a widening and one FMA per row. Here two keys'
V rows are interleaved into bf16 pairs (v[j, c], v[j + 1, c]) in registers, the rows' two weights
rounded to bf16 make one pair per row, and one VDPBF16PS (BFDOT on AArch64) adds both keys'
products to 16 columns of a row: half the multiply-adds, no widening, nothing packed in memory.
The weights are rounded to bf16 (to nearest even), as the prefill's bf16 micro-kernel and
flash-attn's GPU kernels round P before P V; the sums stay float32.

pv_pairs_block(v, b, h, j, bk, p, r, acc, dv, rows): acc[r + i, c] += sum_t p[r + i, t] v[b, h, j + t, c]
for i < rows (a constant: 4, a GQA group's, or MHA's 1), t < bk and the columns c of whole blocks of
pair_columns(rows), each block's rows held in registers across the bk keys; returns the first column
left (0 where it does nothing: V not bf16 bits, no pair product on this target, or acc and p not
float32). The caller guarantees that V's rows are contiguous and that the rows and keys exist
(decode.py's _pv_pass and _in_order_pv).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .bf16 import f32_to_bf16_ir
from .key_dots import PAIRS
from .microkernels import _Kind
from .simd import _define, _row_start, _row_stride, row_address
from .target import TARGET

__all__ = ["PV_PAIR_COLUMNS", "PV_ROWS", "pair_columns", "pv_pairs_block", "pv_pairs_function"]

PV_ROWS = 4  # output rows a block serves (a GQA group of 4, or each 4 of a larger one); MHA's rows=1 as well
# Vectors of columns a block keeps per row: 4 rows x 4 accumulators, 4 pairs of V and the 4 rows'
# weight pairs fit 32 vector registers; 2 where there are 16
_GROUPS = 4 if TARGET.registers >= 32 else 2
PV_PAIR_COLUMNS = TARGET.lanes * _GROUPS


def pair_columns(rows):
    """The columns of a block for `rows` rows: PV_PAIR_COLUMNS for 4, twice as many for MHA's one
    row (a D128 row in one pass over the keys: two passes read the V block twice, and ran 1.1-1.6x
    slower from memory)."""
    return PV_PAIR_COLUMNS * (2 if rows == 1 else 1)


_F32 = ir.FloatType()
_I16, _I32, _I64 = ir.IntType(16), ir.IntType(32), ir.IntType(64)


def _bf16_bits(builder, x):
    """The bf16 nearest x (ties to even) as the low 16 bits of an i32: the conversion instruction,
    which every target with a pair product has (VCVTNEPS2BF16, BFCVT)."""
    return builder.zext(f32_to_bf16_ir(builder, x, native=True), _I32)


def pv_pairs_function(module, kind_name, lanes=TARGET.lanes, groups=_GROUPS, rows=PV_ROWS):
    """The IR function void(v i8*, key stride (bytes), p float*, p row stride, acc float*, acc row stride,
    bk, blocks) of pv_pairs_block for the pair product kind_name ("dpbf16" or "bfdot") at `lanes`
    float32 lanes: `blocks` column blocks of lanes x groups columns, from column 0 of V's row at v, of
    p's rows and of acc's."""
    kind = _Kind(kind_name, lanes)
    columns = lanes * groups
    vector = ir.VectorType(_F32, lanes)
    row_bits = ir.VectorType(_I16, columns)  # one key's V row, a block's columns
    # group g of two rows x | y: (x[g lanes + i], y[g lanes + i]) for i < lanes, as bf16 pairs
    interleave = [ir.Constant(ir.VectorType(_I32, 2 * lanes),
                              [index for i in range(lanes) for index in (g * lanes + i, columns + g * lanes + i)])
                  for g in range(groups)]  # fmt: skip

    def build(builder, args):
        v, v_stride, p, p_stride, acc, acc_stride, bk, blocks = args
        slots = [[cgutils.alloca_once(builder, vector) for _ in range(groups)] for _ in range(rows)]
        acc_rows = [builder.gep(acc, [builder.mul(ir.Constant(_I64, i), acc_stride)]) for i in range(rows)]
        zero_row = ir.Constant(row_bits, [0] * columns)
        one, two = ir.Constant(_I64, 1), ir.Constant(_I64, 2)
        # The weights first, once for every column block: pair t of row i (keys 2t and 2t + 1, the
        # second 0 past bk) at weights[t rows + i], so that the loop over keys reads one pointer
        # (four row pointers there took x86's general registers past 16: spills in the loop)
        n_pairs = builder.udiv(builder.add(bk, one), two)
        weights = builder.alloca(_I32, size=builder.mul(n_pairs, ir.Constant(_I64, rows)))
        with cgutils.for_range(builder, n_pairs) as pair_loop:
            j = builder.mul(pair_loop.index, two)
            has_second = builder.icmp_unsigned("<", builder.add(j, one), bk)
            for i in range(rows):
                row = builder.gep(p, [builder.mul(ir.Constant(_I64, i), p_stride)])
                low = _bf16_bits(builder, builder.load(builder.gep(row, [j])))
                second = builder.select(has_second, builder.add(j, one), j)  # in bounds either way
                high = builder.select(has_second, _bf16_bits(builder, builder.load(builder.gep(row, [second]))),
                                      ir.Constant(_I32, 0))  # fmt: skip
                slot = builder.add(builder.mul(pair_loop.index, ir.Constant(_I64, rows)), ir.Constant(_I64, i))
                builder.store(builder.or_(low, builder.shl(high, ir.Constant(_I32, 16))), builder.gep(weights, [slot]))

        def v_row(j, column):
            start = builder.gep(v, [builder.add(builder.mul(j, v_stride), builder.mul(column, two))])
            return builder.load(builder.bitcast(start, row_bits.as_pointer()), align=2)

        def step(pair, column, second):
            """Keys 2 pair and (second: 2 pair + 1; else none, a zero row) into the accumulators."""
            j = builder.mul(pair, two)
            first_row = v_row(j, column)
            second_row = v_row(builder.add(j, one), column) if second else zero_row
            pairs = [kind.prepare_b(builder, builder.bitcast(builder.shuffle_vector(first_row, second_row, mask),
                                                             ir.VectorType(_I32, lanes)))
                     for mask in interleave]  # fmt: skip
            for i in range(rows):
                slot = builder.add(builder.mul(pair, ir.Constant(_I64, rows)), ir.Constant(_I64, i))
                weight = kind.prepare_a(builder, builder.load(builder.gep(weights, [slot])))
                for g in range(groups):
                    builder.store(kind.update(builder, builder.load(slots[i][g]), weight, pairs[g]), slots[i][g])

        with cgutils.for_range(builder, blocks) as block_loop:
            column = builder.mul(block_loop.index, ir.Constant(_I64, columns))
            targets = [[builder.bitcast(builder.gep(acc_rows[i], [builder.add(column, ir.Constant(_I64, g * lanes))]),
                                        vector.as_pointer()) for g in range(groups)] for i in range(rows)]  # fmt: skip
            for i in range(rows):
                for g in range(groups):
                    builder.store(builder.load(targets[i][g], align=4), slots[i][g])
            with cgutils.for_range(builder, builder.udiv(bk, two)) as key_loop:
                step(key_loop.index, column, True)
            odd = builder.icmp_unsigned("!=", builder.urem(bk, two), ir.Constant(_I64, 0))
            with builder.if_then(odd):
                step(builder.udiv(bk, two), column, False)
            for i in range(rows):
                for g in range(groups):
                    builder.store(builder.load(slots[i][g]), targets[i][g], align=4)

    i8p = ir.IntType(8).as_pointer()
    return _define(module, f"attnkit_pv_pairs_{kind_name}_{lanes}x{groups}x{rows}", ir.VoidType(),
                   [i8p, _I64, _F32.as_pointer(), _I64, _F32.as_pointer(), _I64, _I64, _I64], build)


@intrinsic
def pv_pairs_block(typingctx, v, b, h, j, bk, p, r, acc, dv, rows):
    """See the module docstring: no bounds are checked here. An intrinsic, so that a caller compiled
    for float32 V (where it returns 0) compiles nothing for it."""
    integers = (b, h, j, bk, r, dv)
    if not (isinstance(v, types.Array) and v.ndim == 4 and all(isinstance(x, types.Integer) for x in integers)):
        return None
    if not all(isinstance(matrix, types.Array) and matrix.ndim == 2 for matrix in (p, acc)):
        return None
    if not (isinstance(rows, types.IntegerLiteral) and rows.literal_value in (1, PV_ROWS)):
        return None
    n_rows = rows.literal_value
    active = (v.dtype == types.uint16 and p.dtype == types.float32 and acc.dtype == types.float32
              and PAIRS is not None)  # fmt: skip

    def codegen(context, builder, signature, args):
        if not active:
            return context.get_constant(types.intp, 0)
        bk, r, dv = (context.cast(builder, args[i], signature.args[i], types.intp) for i in (4, 6, 8))
        v_value = context.make_array(signature.args[0])(context, builder, args[0])
        key_stride = cgutils.unpack_tuple(builder, v_value.strides, 4)[2]
        v_start = row_address(context, builder, signature.args[0], args[0], args[1:4], signature.args[1:4])
        p_start = _row_start(context, builder, signature.args[5], args[5], r, _F32)
        acc_start = _row_start(context, builder, signature.args[7], args[7], r, _F32)
        p_stride, acc_stride = (builder.udiv(_row_stride(context, builder, signature.args[i], args[i]),
                                             ir.Constant(_I64, 4)) for i in (5, 7))  # fmt: skip
        columns = pair_columns(n_rows)
        blocks = builder.udiv(dv, ir.Constant(_I64, columns))
        builder.call(pv_pairs_function(builder.module, PAIRS, groups=columns // TARGET.lanes, rows=n_rows),
                     [v_start, key_stride, p_start, p_stride, acc_start, acc_stride, bk, blocks])
        return builder.mul(blocks, ir.Constant(_I64, columns))

    return types.intp(v, b, h, j, bk, p, r, acc, dv, rows), codegen
