"""One tile's scores (scale, softcap, masks, ALiBi, visibility) and the online-softmax step."""

from __future__ import annotations

import math

import numpy as np

from numba import types
from numba.extending import overload

from ..jit import OVERLOAD_OPTIONS, jit as _jit, jit_inner as _jit_inner
from ..microkernels import f32_to_bf16
from ..simd import FLUSH_BELOW, contiguous_row, exp2_affine_at, exp2_affine_bits_at, row_max_at
from .constants import (
    _C_INV_SOFTCAP, _C_LOG2E, _C_NEG_INF, _C_ONE, _C_SCALE, _C_SCALE_LOG2E, _C_SOFTCAP, _C_ZERO, _FASTMATH,
    _HAS_ADDITIVE_MASK, _HAS_ALIBI, _HAS_BOOL_MASK, _HAS_SOFTCAP, _TILE_HIDDEN, _TILE_VISIBLE,
)
from .operands import _operand_of


# ---------------------------------------------------------------------------
# Scores of one tile: raw q.k products -> masked scores in base 2.
# ---------------------------------------------------------------------------


@_jit(inline="always")
def _broadcast_index(mask, b, h, i):
    """(b, h, i) as indices of a (Bm, Hm, Mq, Nk) mask whose axes of size 1 broadcast."""
    return min(b, mask.shape[0] - 1), min(h, mask.shape[1] - 1), min(i, mask.shape[2] - 1)


def _exp2_flushed(x):
    """2**x, or 0 below simd.FLUSH_BELOW of x's dtype."""


@overload(_exp2_flushed, jit_options=OVERLOAD_OPTIONS)
def _exp2_flushed_overload(x):
    real = np.float32 if x == types.float32 else np.float64
    flush, zero = real(FLUSH_BELOW[np.dtype(real)]), real(0.0)

    def flushed(x):
        if x >= flush:
            return math.exp2(x)
        return x if x != x else zero  # NaN stays NaN; -inf and the rest give 0

    return flushed


@_jit_inner(fastmath=_FASTMATH)
def _tile_scores_base2(
    s, i0, j0, b, h, consts, lo_offset, hi_offset, key_start, key_stop, flags, bool_mask, additive_mask,
    slope, diagonal, store_softcap_grad, softcap_grad,
):  # fmt: skip
    """Turn s = q_blk @ k_blk^T (Bq, Bk) into masked scores in base 2, in place.

    Query i0 + r may see key j0 + c when lo_offset <= (j0 + c) - (i0 + r) <= hi_offset,
    key_start <= j0 + c < key_stop (key padding), and the boolean mask allows it. ALiBi
    (flag _HAS_ALIBI) adds -slope * |i + diagonal - j| after the softcap, as flash-attn
    does (diagonal = Nk - Nq: bottom-right aligned). With a softcap and store_softcap_grad,
    softcap_grad (Bq, Bk) receives scale * (1 - tanh^2), the factor the backward
    pass needs (the forward passes False and a placeholder). Callers pass store_softcap_grad as a
    plain bool (_not_literal), not a literal: one compiled function for the forward and the backward
    (a literal True and False compiled it twice in every warmup job, ~0.5 s).

    Returns the multiplier still to apply: with no softcap or mask and a positive
    scale the raw products are left as they are (hidden keys -inf) and the caller
    multiplies by scale * log2(e) inside exp2 (max commutes with a positive scale);
    otherwise the scores are final and the multiplier is 1.
    """
    n_rows, n_cols = s.shape
    neg_inf = consts[_C_NEG_INF]
    scale = consts[_C_SCALE]
    log2e = consts[_C_LOG2E]
    has_softcap = (flags & _HAS_SOFTCAP) != 0
    has_additive = (flags & _HAS_ADDITIVE_MASK) != 0
    has_bool = (flags & _HAS_BOOL_MASK) != 0
    has_alibi = (flags & _HAS_ALIBI) != 0

    multiplier = consts[_C_ONE]
    if not (has_softcap or has_additive or has_bool or has_alibi):
        scale_log2e = consts[_C_SCALE_LOG2E]
        if scale_log2e > consts[_C_ZERO]:
            multiplier = scale_log2e
        else:
            for r in range(n_rows):
                row = contiguous_row(s, r)
                for c in range(n_cols):
                    row[c] *= scale_log2e
    else:
        softcap = consts[_C_SOFTCAP]
        inv_softcap = consts[_C_INV_SOFTCAP]
        one = consts[_C_ONE]
        # A row as a contiguous view (contiguous_row: no reference count, and the loops vectorise;
        # s[r, c] on the tile's 'A' slab kept them scalar: docs/kernel-log.md v48)
        for r in range(n_rows):
            i = i0 + r
            row = contiguous_row(s, r)
            if has_alibi and not (has_softcap or has_additive):  # the common ALiBi row: one pass (v44)
                distance = _operand_of(s, i + diagonal - j0)  # to column c: |distance - c|, exact below 2^24
                for c in range(n_cols):
                    row[c] = (row[c] * scale - slope * abs(distance - _operand_of(s, c))) * log2e
            else:
                if has_softcap and store_softcap_grad:
                    grad_row = contiguous_row(softcap_grad, r)
                    for c in range(n_cols):
                        t = math.tanh(row[c] * scale * inv_softcap)
                        row[c] = softcap * t
                        grad_row[c] = scale * (one - t * t)
                elif has_softcap:
                    for c in range(n_cols):
                        row[c] = softcap * math.tanh(row[c] * scale * inv_softcap)
                else:
                    for c in range(n_cols):
                        row[c] *= scale
                if has_additive:
                    mb, mh, mi = _broadcast_index(additive_mask, b, h, i)
                    for c in range(n_cols):
                        row[c] += additive_mask[mb, mh, mi, j0 + c]
                if has_alibi:
                    distance = i + diagonal - j0  # to column c: |distance - c|
                    for c in range(n_cols):
                        row[c] -= slope * abs(distance - c)
                for c in range(n_cols):
                    row[c] *= log2e
            if has_bool:
                mb, mh, mi = _broadcast_index(bool_mask, b, h, i)
                for c in range(n_cols):
                    row[c] = row[c] if bool_mask[mb, mh, mi, j0 + c] else neg_inf

    # Causal / window / key range: the visible columns of each row form one interval.
    fully_visible = (
        (j0 - (i0 + n_rows - 1) >= lo_offset) and ((j0 + n_cols - 1) - i0 <= hi_offset)
        and j0 >= key_start and j0 + n_cols <= key_stop
    )
    if not fully_visible:
        for r in range(n_rows):
            i = i0 + r
            first = max(0, min(n_cols, max(i + lo_offset, key_start) - j0))
            stop = max(first, min(n_cols, min(i + hi_offset + 1, key_stop) - j0))
            row = contiguous_row(s, r)
            for c in range(first):
                row[c] = neg_inf
            for c in range(stop, n_cols):
                row[c] = neg_inf
    return multiplier


@_jit_inner()
def _key_block_range(i0, i1, nk, lo_offset, hi_offset, block_k):
    """Key blocks [first, stop) that queries i0..i1-1 can see at all (causal/window)."""
    first_key = max(0, i0 + lo_offset)
    last_key = min(nk - 1, i1 - 1 + hi_offset)
    if first_key > last_key:
        return 0, 0
    return first_key // block_k, last_key // block_k + 1


@_jit_inner()
def _task_keys(key_ranges, b, h, i0, i1, nk, lo_offset, hi_offset, block_k):
    """(first, stop, key_start, key_stop): the key blocks rows i0..i1-1 of (b, h) can see
    (causal, window and key range), and that key range [key_start, key_stop).

    key_ranges: masks[2], (Bk, Hk, 2). The helpers the task loops call take the one array they
    read, indexed to scalars, never the masks tuple nor a view: each array an njit function is
    given or slices is an atomic reference-count update on memory every worker shares (7 per
    call for the tuple), and perf put 16% of a decode call's time in them (docs/kernel-log.md)."""
    rb, rh = min(b, key_ranges.shape[0] - 1), min(h, key_ranges.shape[1] - 1)
    key_start, key_stop = max(0, key_ranges[rb, rh, 0]), min(nk, key_ranges[rb, rh, 1])
    first_key = max(key_start, i0 + lo_offset)
    last_key = min(key_stop - 1, i1 - 1 + hi_offset)
    if first_key > last_key:
        return 0, 0, key_start, key_stop
    return first_key // block_k, last_key // block_k + 1, key_start, key_stop


@_jit_inner()
def _tile_flags(states, flags, b, h, qb, kb):
    """The flags to run tile (qb, kb) of (b, h) with, or -1 when the mask hides all of it.
    states: masks[3], (Bt, Ht, Tq, Tk)."""
    state = states[
        min(b, states.shape[0] - 1), min(h, states.shape[1] - 1),
        min(qb, states.shape[2] - 1), min(kb, states.shape[3] - 1),
    ]  # fmt: skip
    if state == _TILE_HIDDEN:
        return -1
    if state == _TILE_VISIBLE:
        return flags & ~(_HAS_BOOL_MASK | _HAS_ADDITIVE_MASK)
    return flags


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------


def _exp2_rounding_row(s, r, multiplier, shift, p_bits):
    """exp2_affine_bits_at for float32 scores, p_bits' columns past s's zeroed (the bf16 operand's
    even width); for float64 ones (never bf16 operands, so never asked at run time) plain
    exp2_affine_at, so that its callers compile for both."""


@overload(_exp2_rounding_row, jit_options=OVERLOAD_OPTIONS)
def _exp2_rounding_row_overload(s, r, multiplier, shift, p_bits):
    if s.dtype == types.float32:

        def rounding(s, r, multiplier, shift, p_bits):
            total = exp2_affine_bits_at(s, r, multiplier, shift, p_bits)
            for c in range(s.shape[1], p_bits.shape[1]):
                p_bits[r, c] = 0
            return total

        return rounding
    return lambda s, r, multiplier, shift, p_bits: exp2_affine_at(s, r, multiplier, shift)


@_jit_inner(fastmath=_FASTMATH)
def _online_softmax_step(s, multiplier, consts, running_max, running_sum, rescale, acc, p_bits, to_bits):
    """One key tile of the online softmax, rows in place.

    s (Bq, Bk) masked scores in base 2 (times `multiplier`) become P = exp2(score -
    new running max); running_max / running_sum (Bq,) move on; acc (Bq, Dv) rows
    are rescaled to the new max, ready for acc += P @ V. With to_bits, P is also
    written rounded to bf16 into p_bits (Bq, Bk rounded up to even; _exp2_rounding_row):
    the A operand of a bf16 P V, made in the same pass.
    """
    neg_inf, zero, one = consts[_C_NEG_INF], consts[_C_ZERO], consts[_C_ONE]
    bq = s.shape[0]
    # Two passes over the rows, maxima then exponentials: a row's exp2 waits for its max, and one
    # loop doing both left each row's latency in the way (a 32 x 32 tile 33.7 -> 27 ns a row,
    # 64 x 128 64 -> 50; docs/kernel-log.md v51). Rows indexed, never made arrays (no reference counts).
    for r in range(bq):
        tile_max = row_max_at(s, r, neg_inf) * multiplier
        old_max = running_max[r]
        new_max = tile_max if tile_max > old_max else old_max
        # All seen keys invisible so far: shift by 0 so exp2(-inf) stays 0.
        shift = zero if new_max == neg_inf else new_max
        # exp2(0) = 1 exactly: once a row's max settles (most tiles), no libm call per row; a jump of
        # more than FLUSH_BELOW gives 0, as the weights' exp2 does (no subnormal acc: simd.py)
        rescale[r] = one if old_max == shift else _exp2_flushed(old_max - shift)
        running_max[r] = new_max
    for r in range(bq):
        shift = zero if running_max[r] == neg_inf else running_max[r]
        if to_bits:
            running_sum[r] = running_sum[r] * rescale[r] + _exp2_rounding_row(s, r, multiplier, shift, p_bits)
        else:
            running_sum[r] = running_sum[r] * rescale[r] + exp2_affine_at(s, r, multiplier, shift)
    dv = acc.shape[1]
    for r in range(bq):
        alpha = rescale[r]
        if alpha != one:  # after the first tiles the max rarely moves
            for c in range(dv):
                acc[r, c] *= alpha


@_jit_inner(fastmath=_FASTMATH)
def _finish_rows(acc, running_max, running_sum, consts, out, lse):
    """out (Bq, Dv) = acc / running_sum (stored through _store: float, or bf16 bits), lse (Bq,) in natural log."""
    neg_inf, zero = consts[_C_NEG_INF], consts[_C_ZERO]
    ln2 = math.log(2.0)
    dv = out.shape[1]
    for r in range(out.shape[0]):  # rows indexed, never made arrays (no reference counting per row)
        total = running_sum[r]
        if total == zero:  # no visible key: exact zeros, lse -inf
            for c in range(dv):
                out[r, c] = _store(out, zero)
            lse[r] = neg_inf
        else:
            inv_total = consts[_C_ONE] / total
            for c in range(dv):
                out[r, c] = _store(out, acc[r, c] * inv_total)
            lse[r] = running_max[r] * ln2 + math.log(total)


def _store(array, value):
    """value converted for storing into `array`: bf16 bits when array is uint16, else unchanged."""


@overload(_store, jit_options=OVERLOAD_OPTIONS)
def _store_overload(array, value):
    if array.dtype == types.uint16:
        return lambda array, value: f32_to_bf16(value)
    return lambda array, value: value
