"""The products' operands: packing K and V per (batch, kv head), bf16 / float32 / float64 overloads."""

from __future__ import annotations

import numpy as np
from numba import types
from numba.core.imputils import impl_ret_borrowed
from numba.extending import intrinsic, overload

from ..cpu_blas import matmul
from ..jit import OVERLOAD_OPTIONS, jit as _jit, jit_inner as _jit_inner
from ..microkernels import PAD, bf16_of, bf16_to_f32, gemm, gemm_f32, pack_pair_columns, pack_pairs, padded
from ..simd import cache_row, contiguous_row, gradient_pairs
from .constants import _FASTMATH


# One compiled signature per dtype for the products, whatever the call site's operands:
# slices of C arrays are typed 'C' or 'A' by how they were cut, and a constant argument
# as its literal value, each a signature of its own compiled from scratch (in a cold
# warmup, the products and micro-kernels were compiled three to seven times per dtype).
@intrinsic
def _any_layout(typingctx, x):
    """x typed as an array of layout 'A' (the same data; the products read strides anyway)."""
    if not isinstance(x, types.Array):
        return None
    result = x.copy(layout="A")

    def codegen(context, builder, signature, args):
        return impl_ret_borrowed(context, builder, result, args[0])

    return result(x), codegen


@intrinsic
def _not_literal(typingctx, x):
    """x typed without its literal value (Literal[int](0) -> int64)."""
    result = types.unliteral(x)

    def codegen(context, builder, signature, args):
        return context.cast(builder, args[0], x, result)

    return result(x), codegen


@_jit(inline="always")
def _product(a, b, c, m, n, k, accumulate, micro):
    """c[:m, :n] (+)= a[:m, :k] @ b[:k, :n]: bf16 bits (b pair-packed) on the bf16
    micro-kernel; float32 on the FMA micro-kernel when micro (b and c padded to 16
    columns); else, and float64 always, through the BLAS."""
    _typed_product(_any_layout(a), _any_layout(b), _any_layout(c), m, n, k, _not_literal(accumulate),
                   _not_literal(micro))  # fmt: skip


def _typed_product(a, b, c, m, n, k, accumulate, micro):
    """_product's operands, typed alike."""


@_jit_inner()
def _blas_product(a, b, c, m, n, k, accumulate):
    one = c.dtype.type(1)
    matmul(a[:m, :k], b[:k, :n], c[:m, :n], one, one if accumulate else c.dtype.type(0))


@overload(_typed_product, jit_options=OVERLOAD_OPTIONS)
def _typed_product_overload(a, b, c, m, n, k, accumulate, micro):
    if a.dtype == types.uint16:  # bf16 bits: the bf16 micro-kernel, k elements as pairs
        return lambda a, b, c, m, n, k, accumulate, micro: gemm(a, b, c, m, n, (k + 1) // 2, accumulate)
    if a.dtype == types.float32:

        def product(a, b, c, m, n, k, accumulate, micro):
            if micro:
                gemm_f32(a, b, c, m, n, k, accumulate)
            else:
                _blas_product(a, b, c, m, n, k, accumulate)

        return product
    return lambda a, b, c, m, n, k, accumulate, micro: _blas_product(a, b, c, m, n, k, accumulate)


def forward_operand_shapes(batch, hkv, nk, d, dv, bf16):
    """Shapes of _pack_forward's K and V operands: bf16 pairs along the features (Q K^T) and along the
    keys (P V); or K^T and V with rows of a whole number of vectors (None for V: its rows already
    are, and the products read it in place)."""
    v_width = padded(dv, PAD)
    if bf16:
        return (batch, hkv, (d + 1) // 2, 2 * (nk + PAD)), (batch, hkv, (nk + 1) // 2, 2 * v_width)
    return (batch, hkv, d, nk + PAD), (batch, hkv, nk, v_width) if v_width != dv else None


@_jit_inner()
def _backward_operand_buffers(nk, d, dv, operand_kind):
    """One worker's K, V and K-rows operands for up to nk keys of one kv head (_pack_operands), in
    operand_kind's dtype: bf16 pairs along the features for S and dP, ((D + 1) / 2, 2 (Nk + 16)) and
    ((Dv + 1) / 2, ..), and along the keys for dQ, ((Nk + 1) / 2, 2 D16); or K^T (D, Nk + 16), V^T
    (Dv, Nk + 16) and K with rows of a whole number of vectors (Nk, D16)."""
    dtype = operand_kind.dtype
    if _bf16_operand(operand_kind):
        return (np.empty(((d + 1) // 2, 2 * (nk + PAD)), dtype), np.empty(((dv + 1) // 2, 2 * (nk + PAD)), dtype),
                np.empty(((nk + 1) // 2, 2 * padded(d, PAD)), dtype))  # fmt: skip
    return np.empty((d, nk + PAD), dtype), np.empty((dv, nk + PAD), dtype), np.empty((nk, padded(d, PAD)), dtype)


def _pack_forward(k, v, k_packed, v_packed):
    """One (batch, kv head)'s keys and values as the B operands of the forward's products."""


@overload(_pack_forward, jit_options=OVERLOAD_OPTIONS)
def _pack_forward_overload(k, v, k_packed, v_packed):
    if k_packed.dtype == types.uint16:
        # k_packed (ceil(D/2), 2 (Nk + 16)): pairs along the features for Q K^T;
        # v_packed (ceil(Nk/2), 2 Dv16): pairs along the keys for P V.
        def pairs(k, v, k_packed, v_packed):
            _pack_keys(k, k_packed)
            pack_pairs(v, v_packed)

        return pairs

    # float: k_packed = K^T (D, Nk + 16); v_packed = V with rows padded to 16
    # columns, unless it is V itself (Dv a multiple of 16: nothing to copy).
    def rows(k, v, k_packed, v_packed):
        _load_transposed(k, k_packed)
        if v_packed.shape[1] != v.shape[1]:
            _load_rows(v, v_packed)

    return rows


@_jit_inner()
def _pack_forward_head(k, v, k_packed, v_packed, t):
    """Task t = (batch, kv head) of the forward's packing."""
    hkv = k.shape[1]
    b, hk = t // hkv, t % hkv
    _pack_forward(k[b, hk], v[b, hk], k_packed[b, hk], v_packed[b, hk])


def _scratch(n, operand):
    """Elements of a conversion buffer: n for bf16 operands, 1 for float ones (never used)."""


@overload(_scratch, jit_options=OVERLOAD_OPTIONS)
def _scratch_overload(n, operand):
    if operand.dtype == types.uint16:
        return lambda n, operand: n
    return lambda n, operand: 1


def _first_key(j0, operand):
    """j0, moved down to even for bf16 operands (their P V reads keys in pairs; the
    extra key is hidden from every row)."""


@overload(_first_key, jit_options=OVERLOAD_OPTIONS)
def _first_key_overload(j0, operand):
    if operand.dtype == types.uint16:
        return lambda j0, operand: j0 - j0 % 2
    return lambda j0, operand: j0


# ---------------------------------------------------------------------------
# Operands of the micro-kernels (kernels/microkernels.py)
# ---------------------------------------------------------------------------


@_jit_inner()
def _pack_keys(k, dst):
    """dst[p, 2 j + t] = k[j, 2 p + t]: k (Nk, D) as the B operand of Q @ K^T, pairs along D.

    dst (ceil(D / 2), >= 2 Nk); the columns past Nk and a missing last feature are 0.
    """
    nk, d = k.shape
    dst[:] = 0
    for j in range(nk):
        for p in range(d // 2):
            dst[p, 2 * j] = bf16_of(k[j, 2 * p])
            dst[p, 2 * j + 1] = bf16_of(k[j, 2 * p + 1])
        if d % 2:
            dst[d // 2, 2 * j] = bf16_of(k[j, d - 1])


def _operand_of(dst, value):
    """value as an element of the operand array dst: bf16 bits for uint16, float32 for float32."""


@overload(_operand_of, jit_options=OVERLOAD_OPTIONS)
def _operand_of_overload(dst, value):
    if dst.dtype == types.uint16:
        return lambda dst, value: bf16_of(value)
    if dst.dtype == types.float64:
        return lambda dst, value: np.float64(value)
    return lambda dst, value: np.float32(_f32_of(value))


@_jit_inner(fastmath=_FASTMATH)
def _load_rows(src, dst):
    """dst[:rows, :cols] = src as elements of dst's dtype (bf16 bits, float32 or float64); dst's padding = 0."""
    _load_row_prefixes(src, src.shape[1], dst)


@_jit_inner(fastmath=_FASTMATH)
def _load_row_prefixes(src, cols, dst):
    """_load_rows of src[:, :cols]; pass a C-contiguous src (a slice's rows would not vectorise)."""
    rows, width = src.shape[0], dst.shape[1]
    for r in range(rows):  # rows indexed, never made arrays (no reference counting per row)
        for c in range(cols):
            dst[r, c] = _operand_of(dst, src[r, c])
        for c in range(cols, width):
            dst[r, c] = 0


# ---------------------------------------------------------------------------
# Backward: the five products per tile, on the micro-kernels or the BLAS
# ---------------------------------------------------------------------------


def _f32_of(value):
    """A stored element as float32: bf16 bits (uint16) widened, floats converted."""


@overload(_f32_of, jit_options=OVERLOAD_OPTIONS)
def _f32_of_overload(value):
    if value == types.uint16:
        return lambda value: bf16_to_f32(value)
    return lambda value: np.float32(value)


def _f64_of(value):
    """A stored element as float64, exactly: bf16 bits widened, float32 and float64 converted."""


@overload(_f64_of, jit_options=OVERLOAD_OPTIONS)
def _f64_of_overload(value):
    if value == types.uint16:
        return lambda value: np.float64(bf16_to_f32(value))
    return lambda value: np.float64(value)


def _widening_buffer(x, size, like):
    """A 1-D scratch of like's dtype for _rows_as: size elements when x's elements need widening
    (bf16 bits), none when x is read in place."""


@overload(_widening_buffer, jit_options=OVERLOAD_OPTIONS)
def _widening_buffer_overload(x, size, like):
    if x.dtype == like.dtype:
        return lambda x, size, like: np.empty(0, like.dtype)
    return lambda x, size, like: np.empty(size, like.dtype)


def _padding_buffer(x, rows, like):
    """A 1-D scratch of like's dtype for _padded_rows_as: room for rows of x (B, H, N, C) padded to a
    multiple of PAD when they must be copied (bf16 bits to widen, or C not a multiple of PAD), else none."""


@overload(_padding_buffer, jit_options=OVERLOAD_OPTIONS)
def _padding_buffer_overload(x, rows, like):
    if x.dtype == like.dtype:
        return lambda x, rows, like: np.empty(0 if x.shape[3] % PAD == 0 else rows * padded(x.shape[3], PAD),
                                              like.dtype)  # fmt: skip
    return lambda x, rows, like: np.empty(rows * padded(x.shape[3], PAD), like.dtype)


@_jit(inline="always")
def _copy_padded_rows(x, b, h, j0, rows, buffer):
    """Rows j0 .. j0 + rows of x[b, h] as elements of buffer's dtype, zero-padded to a multiple of PAD."""
    cols = x.shape[3]
    width = padded(cols, PAD)
    wide = buffer[: rows * width].reshape((rows, width))
    for r in range(rows):
        row = cache_row(x, b, h, j0 + r)  # a row view without index checks or reference counts
        for c in range(cols):
            wide[r, c] = _operand_of(wide, row[c])
        for c in range(cols, width):
            wide[r, c] = 0
    return wide


def _padded_rows_as(x, b, h, j0, rows, buffer):
    """Rows j0 .. of x[b, h] as a B operand of buffer's dtype, whose rows a product may read in whole
    groups of PAD columns: x[b, h, j0:] itself when x has that dtype and C is a multiple of PAD, else
    copied into buffer (_padding_buffer), widened from bf16 bits and zero-padded."""


@overload(_padded_rows_as, jit_options=OVERLOAD_OPTIONS)
def _padded_rows_as_overload(x, b, h, j0, rows, buffer):
    if x.dtype != buffer.dtype:
        return lambda x, b, h, j0, rows, buffer: _copy_padded_rows(x, b, h, j0, rows, buffer)

    def in_place_when_padded(x, b, h, j0, rows, buffer):
        if x.shape[3] % PAD == 0:
            return x[b, h, j0:]
        return _copy_padded_rows(x, b, h, j0, rows, buffer)

    return in_place_when_padded


def _rows_as(x, b, h, j0, rows, buffer):
    """Rows j0 .. of x[b, h] (x: (B, H, N, C)) as an operand of buffer's dtype: x[b, h, j0:] itself
    when x has that dtype (read in place); else rows j0 .. j0 + rows widened from bf16 bits into
    buffer (room for rows * C), read from x's contiguous rows."""


@overload(_rows_as, jit_options=OVERLOAD_OPTIONS)
def _rows_as_overload(x, b, h, j0, rows, buffer):
    if x.dtype == buffer.dtype:
        return lambda x, b, h, j0, rows, buffer: x[b, h, j0:]

    def widened(x, b, h, j0, rows, buffer):
        cols = x.shape[3]
        wide = buffer[: rows * cols].reshape((rows, cols))
        for r in range(rows):
            row = cache_row(x, b, h, j0 + r)  # a row view without index checks or reference counts
            for c in range(cols):
                wide[r, c] = _f32_of(row[c])
        return wide

    return widened


@_jit_inner()
def _load_transposed(src, dst):
    """dst[c, r] = src[r, c] as elements of dst's dtype; dst (C, >= R) rows zero past R, dst C-contiguous.

    The padding is short (16 columns past the keys, for the micro-kernel's last vector), and a
    loop over it of unknown length stayed scalar (LLVM's vector loop takes 64 elements at once):
    1,024 scalar stores for one key's 64 features. Few rows: the C rows zeroed in one flat pass,
    then the values; else 16 columns a row as a constant-length loop, one vector store (kernel log v53)."""
    rows, cols = src.shape
    width = dst.shape[1]
    zeroed_first = rows <= 64
    if zeroed_first:
        flat = dst.reshape(dst.shape[0] * width)
        for i in range(cols * width):
            flat[i] = 0
    for c in range(cols):
        row = contiguous_row(dst, c)
        for r in range(rows):
            row[r] = _operand_of(dst, src[r, c])
        if zeroed_first:
            continue
        if width - rows == 16:
            for i in range(16):
                row[rows + i] = 0
        else:
            for r in range(rows, width):
                row[r] = 0


def _pack_operands(k, v, k_packed, v_packed, k_rows):
    """One (batch, kv head)'s keys and values as the B operands of the backward's products."""


@overload(_pack_operands, jit_options=OVERLOAD_OPTIONS)
def _pack_operands_overload(k, v, k_packed, v_packed, k_rows):
    if k_packed.dtype == types.uint16:
        # k_packed (ceil(D/2), 2 (Nk + 16)), v_packed (ceil(Dv/2), ..): pairs along the
        # features for S and dP; k_rows (ceil(Nk/2), 2 D16): pairs along the keys for dQ.
        def pack(k, v, k_packed, v_packed, k_rows):
            _pack_keys(k, k_packed)
            _pack_keys(v, v_packed)
            pack_pairs(k, k_rows)

        return pack

    # float32 / float64: K^T (D, Nk + 16), V^T (Dv, Nk + 16), K rows (Nk, D16)
    def pack_float(k, v, k_packed, v_packed, k_rows):
        _load_transposed(k, k_packed)
        _load_transposed(v, v_packed)
        _load_rows(k, k_rows)

    return pack_float


@_jit(inline="always")
def _dp_product(a, b, c, m, n, k):
    """dP = dO V^T: _product without the FMA micro-kernel. bf16 on the micro-kernel; float32
    through the BLAS, whose blocked summation keeps dP - delta (which cancels when one key
    dominates a row) as accurate as a float32 reference; the micro-kernel's one long FMA chain
    per element left 3x its error (Nk = 1, D = 64)."""
    _product(a, b, c, m, n, k, False, False)


def _gradient_operands(p_full, ds_full, bq, bk, delta, scale, cap_grad, has_softcap, keep, has_dropout,
                       pairs_buf, ds_pairs_buf, ds_rows_buf):
    """dS = P (dP - delta) scale (the softcap's factor cap_grad instead of scale when has_softcap;
    dropout's factors keep on dP, then on P, when has_dropout) of a (Bq, Bk) tile, where p_full and
    ds_full (Bq, Bk16) hold P and dP; returns the three products' operands: P as the B operand of
    dV^T += dO^T P, dS as the B operand of dK^T += Q^T dS, dS as the A operand of dQ += dS K.

    float32 / float64: dS in place, then p_full, ds_full, ds_full (padding columns zeroed). bf16:
    P and dS in row pairs (pairs_buf, ds_pairs_buf) and dS by rows (ds_rows_buf), rounded; without
    softcap one pass over the tile makes all three, dropout's factors included (simd.gradient_pairs),
    where a pass per operand read the tile three times more (docs/kernel-log.md v35, v41).
    """


@_jit(inline="always")
def _gradient_in_place(p_full, ds_full, bq, bk, delta, scale, cap_grad, has_softcap, keep, has_dropout):
    """dS into ds_full (over dP), and P times dropout's factors, in place (_gradient_operands)."""
    if has_dropout:  # Z = keep / (1 - p): out = (P Z) V, so dP (of P) = Z dO V^T and dV = (P Z)^T dO
        for r in range(bq):
            for c in range(bk):
                ds_full[r, c] *= keep[r, c]
    for r in range(bq):  # rows of the C-contiguous buffers, indexed: the loops vectorise
        row_delta = delta[r]
        if has_softcap:
            for c in range(bk):
                ds_full[r, c] = p_full[r, c] * (ds_full[r, c] - row_delta) * cap_grad[r, c]
        else:
            for c in range(bk):
                ds_full[r, c] = p_full[r, c] * (ds_full[r, c] - row_delta) * scale
    if has_dropout:
        for r in range(bq):
            for c in range(bk):
                p_full[r, c] *= keep[r, c]


@overload(_gradient_operands, jit_options=OVERLOAD_OPTIONS)
def _gradient_operands_overload(p_full, ds_full, bq, bk, delta, scale, cap_grad, has_softcap, keep, has_dropout,
                                pairs_buf, ds_pairs_buf, ds_rows_buf):  # fmt: skip
    if pairs_buf.dtype == types.uint16:

        def rounded(p_full, ds_full, bq, bk, delta, scale, cap_grad, has_softcap, keep, has_dropout,
                    pairs_buf, ds_pairs_buf, ds_rows_buf):  # fmt: skip
            if has_softcap:  # its factors: dS in place first, then each operand
                _gradient_in_place(p_full, ds_full, bq, bk, delta, scale, cap_grad, has_softcap, keep, has_dropout)
                return _tile_operands(p_full, ds_full, bq, bk, pairs_buf, ds_pairs_buf, ds_rows_buf)
            p_pairs, ds_pairs, ds_rows = _operand_views(p_full, bq, bk, pairs_buf, ds_pairs_buf, ds_rows_buf)
            if has_dropout:  # dropout's factors in the same pass (docs/kernel-log.md v41)
                gradient_pairs(p_full, ds_full, bq, bk, delta, scale, p_pairs, ds_pairs, ds_rows, keep)
            else:
                gradient_pairs(p_full, ds_full, bq, bk, delta, scale, p_pairs, ds_pairs, ds_rows)
            for pair in range(p_pairs.shape[0]):  # the padding columns
                for c in range(2 * bk, p_pairs.shape[1]):
                    p_pairs[pair, c] = 0
                    ds_pairs[pair, c] = 0
            for r in range(bq):
                for c in range(bk, ds_rows.shape[1]):
                    ds_rows[r, c] = 0
            return p_pairs, ds_pairs, ds_rows

        return rounded

    def in_place(p_full, ds_full, bq, bk, delta, scale, cap_grad, has_softcap, keep, has_dropout,
                 pairs_buf, ds_pairs_buf, ds_rows_buf):  # fmt: skip
        _gradient_in_place(p_full, ds_full, bq, bk, delta, scale, cap_grad, has_softcap, keep, has_dropout)
        return _tile_operands(p_full, ds_full, bq, bk, pairs_buf, ds_pairs_buf, ds_rows_buf)

    return in_place


@_jit(inline="always")
def _operand_views(p_full, bq, bk, pairs_buf, ds_pairs_buf, ds_rows_buf):
    """(P pairs, dS pairs, dS rows): the bf16 operands' views of their buffers for a (Bq, Bk) tile."""
    pair_width = 2 * p_full.shape[1]
    n_pairs = (bq + 1) // 2
    p_pairs = pairs_buf[: n_pairs * pair_width].reshape((n_pairs, pair_width))
    ds_pairs = ds_pairs_buf[: n_pairs * pair_width].reshape((n_pairs, pair_width))
    row_width = padded(bk, 2)
    return p_pairs, ds_pairs, ds_rows_buf[: bq * row_width].reshape((bq, row_width))


def _tile_operands(p_full, ds_full, bq, bk, pairs_buf, ds_pairs_buf, ds_rows_buf):
    """The three products' operands of a tile whose P and dS are computed (p_full, ds_full, Bq x
    Bk16): bf16 P and dS packed in row pairs and dS rounded by rows, a pass each; floats are their
    own operands, their padding columns zeroed (they reach columns of other keys otherwise)."""


@overload(_tile_operands, jit_options=OVERLOAD_OPTIONS)
def _tile_operands_overload(p_full, ds_full, bq, bk, pairs_buf, ds_pairs_buf, ds_rows_buf):
    if pairs_buf.dtype == types.uint16:

        def rounded(p_full, ds_full, bq, bk, pairs_buf, ds_pairs_buf, ds_rows_buf):
            p_pairs, ds_pairs, ds_rows = _operand_views(p_full, bq, bk, pairs_buf, ds_pairs_buf, ds_rows_buf)
            pack_pair_columns(p_full, bk, p_pairs)
            pack_pair_columns(ds_full, bk, ds_pairs)
            _load_row_prefixes(ds_full, bk, ds_rows)
            return p_pairs, ds_pairs, ds_rows

        return rounded

    def itself(p_full, ds_full, bq, bk, pairs_buf, ds_pairs_buf, ds_rows_buf):
        p_full[:, bk:] = 0
        ds_full[:, bk:] = 0
        return p_full, ds_full, ds_full

    return itself


def _a_rows_of(x, x_full, buffer):
    """The (Bq, Bk) tile x as an A operand: bf16 rows (even width) in buffer, or x_full itself."""


@overload(_a_rows_of, jit_options=OVERLOAD_OPTIONS)
def _a_rows_of_overload(x, x_full, buffer):
    if buffer.dtype == types.uint16:

        def converted(x, x_full, buffer):
            width = padded(x.shape[1], 2)
            rows = buffer[: x.shape[0] * width].reshape((x.shape[0], width))
            _load_row_prefixes(x_full, x.shape[1], rows)  # x_full's rows: contiguous
            return rows

        return converted
    return lambda x, x_full, buffer: x_full


def _bf16_operand(buffer):
    """Whether a products' buffer holds bf16 bits (uint16): a constant per compiled signature."""


@overload(_bf16_operand, jit_options=OVERLOAD_OPTIONS)
def _bf16_operand_overload(buffer):
    bits = buffer.dtype == types.uint16
    return lambda buffer: bits


def _p_rows_buffer(buffer, bq, bk, unused):
    """(Bq, Bk rounded up to even) rows of a bf16 buffer for P, or `unused` for a float buffer."""


@overload(_p_rows_buffer, jit_options=OVERLOAD_OPTIONS)
def _p_rows_buffer_overload(buffer, bq, bk, unused):
    if buffer.dtype == types.uint16:
        return lambda buffer, bq, bk, unused: buffer[: bq * padded(bk, 2)].reshape((bq, padded(bk, 2)))
    return lambda buffer, bq, bk, unused: unused


def _p_operand(p, p_full, buffer, p_bits, rounded):
    """P (Bq, Bk) as the A operand of P V: p_full itself when the products' buffer is float; for a
    bf16 buffer p_bits (_p_rows_buffer), rounded into here unless the softmax did it (rounded)."""


@overload(_p_operand, jit_options=OVERLOAD_OPTIONS)
def _p_operand_overload(p, p_full, buffer, p_bits, rounded):
    if buffer.dtype == types.uint16:

        def bits(p, p_full, buffer, p_bits, rounded):
            if not rounded:
                _load_row_prefixes(p_full, p.shape[1], p_bits)
            return p_bits

        return bits
    return lambda p, p_full, buffer, p_bits, rounded: p_full


def _dropped_operand(p, p_full, keep, buffer, p_bits):
    """P (Bq, Bk) times dropout's factors keep, as the A operand of P V: in place in p_full when the
    products' buffer is float; for a bf16 buffer rounded into p_bits (_p_rows_buffer) in the same
    pass, p_full left as it was (the product reads p_bits only)."""


@overload(_dropped_operand, jit_options=OVERLOAD_OPTIONS)
def _dropped_operand_overload(p, p_full, keep, buffer, p_bits):
    if buffer.dtype == types.uint16:

        def bits(p, p_full, keep, buffer, p_bits):
            rows, cols, width = p.shape[0], p.shape[1], p_bits.shape[1]
            for r in range(rows):  # rows of C-contiguous buffers, indexed: the loop vectorises
                for c in range(cols):
                    p_bits[r, c] = bf16_of(p_full[r, c] * keep[r, c])
                for c in range(cols, width):
                    p_bits[r, c] = 0
            return p_bits

        return bits

    def scaled(p, p_full, keep, buffer, p_bits):
        for r in range(p.shape[0]):
            for c in range(p.shape[1]):
                p_full[r, c] *= keep[r, c]
        return p_full

    return scaled


def _key_offset(j0, operand):
    """Where key j0 starts along a packed operand: 2 j0 columns (bf16 pairs) or j0."""


@overload(_key_offset, jit_options=OVERLOAD_OPTIONS)
def _key_offset_overload(j0, operand):
    if operand.dtype == types.uint16:
        return lambda j0, operand: 2 * j0
    return lambda j0, operand: j0


def _key_row(j0, operand):
    """The row of key j0 in k_rows: j0 // 2 (bf16 pairs of keys) or j0."""


@overload(_key_row, jit_options=OVERLOAD_OPTIONS)
def _key_row_overload(j0, operand):
    if operand.dtype == types.uint16:
        return lambda j0, operand: j0 // 2
    return lambda j0, operand: j0
