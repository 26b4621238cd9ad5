"""Host-side planning of a call: block sizes, constants, mask summaries, the segment table."""

from __future__ import annotations

import functools
import math

import numpy as np

from ...reference.attention import dense_alignment, visible_range
from ...reference.dropout import keep_scale as keep_scale_of
from .constants import (
    _C_INV_SOFTCAP, _C_KEEP_SCALE, _C_LOG2E, _C_NEG_INF, _C_ONE, _C_SCALE, _C_SCALE_LOG2E, _C_SOFTCAP, _C_ZERO,
    _HAS_ADDITIVE_MASK, _HAS_ALIBI, _HAS_BOOL_MASK, _HAS_DROPOUT, _HAS_SINKS, _HAS_SOFTCAP, _N_CONSTANTS, _TILE_HIDDEN,
    _TILE_MIXED, _TILE_VISIBLE, _UNLIMITED,
)
from .dropout import dropout_parameters


def _block_sizes(nq, nk):
    """(query block, key block) of the forward pass.

    torch's CPU kernel uses 256 x 512; 128 x 512 measured 5-15% faster here
    (half the masked work on causal diagonal tiles, same GEMM rate). Fewer than 32
    queries are one block of their own size: a worker's buffers are sized by the
    block, and a tiny call's fit the allocator's small-size lists.
    """
    block_q = 128 if nq >= 512 else 64 if nq >= 128 else 32 if nq >= 32 else max(1, nq)
    block_k = 512
    return block_q, max(1, min(block_k, nk))


def _backward_block_sizes(nq, nk):
    """(query block, key block) for the backward pass (128 x 256 measured 0-8% ahead of 64 x 128)."""
    block_q = 128 if nq >= 256 else 64 if nq >= 64 else 32
    block_k = 256
    return block_q, max(1, min(block_k, nk))


def _clamped(window):
    """The window with each side at most _UNLIMITED (no int64 overflow in visible_range)."""
    return None if window is None else tuple(None if w is None else min(int(w), _UNLIMITED) for w in window)


def _visible_offsets(nq, nk, causal, window, align=None):
    """(lo, hi, diagonal) of a dense call from reference.visible_range: query i sees key j iff
    lo <= j - i <= hi, unlimited sides as -+_UNLIMITED; align defaults to causal's."""
    hides, default_align = dense_alignment(causal)
    align = align or default_align
    lo, hi, diagonal = visible_range(nq, nk, causal=hides, align=align, window=_clamped(window))
    return (-_UNLIMITED if lo is None else max(-_UNLIMITED, int(lo)),
            _UNLIMITED if hi is None else min(_UNLIMITED, int(hi)), int(diagonal))  # fmt: skip


@functools.lru_cache(maxsize=256)
def _constants(dtype, scale, softcap, keep_scale=1.0):
    """The per-call constants array (cached: the kernels only read it)."""
    return _make_constants(dtype, scale, softcap, keep_scale)


def _make_constants(dtype, scale, softcap, keep_scale=1.0):
    log2e = 1.0 / math.log(2.0)
    consts = np.zeros(_N_CONSTANTS, dtype)
    consts[_C_SCALE] = scale
    consts[_C_SCALE_LOG2E] = scale * log2e
    consts[_C_LOG2E] = log2e
    consts[_C_SOFTCAP] = softcap if softcap is not None else 1.0
    consts[_C_INV_SOFTCAP] = 1.0 / softcap if softcap is not None else 1.0
    consts[_C_NEG_INF] = -np.inf
    consts[_C_ZERO] = 0.0
    consts[_C_ONE] = 1.0
    consts[_C_KEEP_SCALE] = keep_scale
    return consts


def _kernel_array(x, dtype):
    """C-contiguous, writeable, aligned, native-order array of dtype (one compiled signature per dtype):
    x itself when it already is one (checked first: planned calls pass three per call), else a copy."""
    if type(x) is np.ndarray and x.dtype == dtype and x.flags.carray:  # C-contiguous, aligned, writeable
        return x
    return np.array(x, dtype=dtype, order="C", copy=True)


def _rows_in_place(x, dtype):
    """Whether the decode kernel reads x, a (B, H, N, C) array of dtype, in place though it is not
    C-contiguous: rows contiguous, heads interleaved (a (B, N, H, C) cache seen as (B, H, N, C),
    flash-attn's layout). Then neither C- nor F-contiguous, aligned and writeable: Numba types it as
    a layout 'A' array, which the decode kernel's entry has a signature for (its worker takes K and V
    as 'A' arrays whatever their layout). A row's stride is a leading dimension to the kernels
    (float64's BLAS products): rows that overlap (an expanded or unfolded view) or run backwards (a
    reversed NumPy view) are copied, as are batch or head axes that run backwards."""
    if not (type(x) is np.ndarray and x.dtype == dtype and x.ndim == 4 and x.flags.aligned and x.flags.writeable
            and not x.flags.c_contiguous and not x.flags.f_contiguous):  # fmt: skip
        return False
    batch_step, head_step, row_step, column_step = x.strides
    return (column_step == x.itemsize and batch_step >= 0 and head_step >= 0
            and (row_step >= x.shape[3] * x.itemsize or x.shape[2] == 1))  # fmt: skip


def _key_value_arrays(k, v, dtype, in_place):
    """(k, v): K and V as _kernel_array makes them, or both as they are when in_place (a decode call)
    and the decode kernel can read both so (_rows_in_place): no copy of the cache."""
    if in_place and _rows_in_place(k, dtype) and _rows_in_place(v, dtype):
        return k, v
    return _kernel_array(k, dtype), _kernel_array(v, dtype)


def _tile_summary(visible, hidden, block_q, block_k):
    """Tile states (Bm, Hm, Tq, Tk) int8 of a mask given as `visible` / `hidden` booleans (Bm, Hm, Mq, Nk).

    A tile is query rows [qb block_q, ...) (all rows when Mq = 1) by keys
    [kb block_k, ...): _TILE_HIDDEN when every score is hidden, _TILE_VISIBLE when
    the mask changes none, else _TILE_MIXED.
    """
    mq, nk = visible.shape[2], visible.shape[3]
    row_starts = np.arange(0, mq, block_q if mq > 1 else 1)
    key_starts = np.arange(0, nk, block_k)

    def all_in_tiles(x):
        x = np.logical_and.reduceat(x, key_starts, axis=3)
        return np.logical_and.reduceat(x, row_starts, axis=2)

    states = np.full(all_in_tiles(visible).shape, _TILE_MIXED, np.int8)
    states[all_in_tiles(visible)] = _TILE_VISIBLE
    states[all_in_tiles(hidden)] = _TILE_HIDDEN
    return states


def _key_ranges(rows):
    """Per-(b, h) visible key ranges (Bm, Hm, 2) of key-constant rows (Bm, Hm, Nk), or None
    when some row's visible keys are not one contiguous run (empty rows give [0, 0))."""
    nk = rows.shape[-1]
    count = rows.sum(axis=-1)
    first = rows.argmax(axis=-1)
    last = nk - 1 - rows[..., ::-1].argmax(axis=-1)
    if not np.all((count == 0) | (count == last - first + 1)):
        return None
    return np.stack([np.where(count > 0, first, 0), np.where(count > 0, last + 1, 0)], axis=-1).astype(np.int64)


@functools.lru_cache(maxsize=256)
def _no_mask(dtype, nk):
    """The placeholders of _mask_plan's tuple for a call without a mask (cached: the kernels only read them)."""
    return (
        np.ones((1, 1, 1, 1), np.bool_), np.zeros((1, 1, 1, 1), dtype),
        np.array([[[0, nk]]], np.int64), np.full((1, 1, 1, 1), _TILE_VISIBLE, np.int8),
    )  # fmt: skip


@functools.lru_cache(maxsize=16)
def _no_alibi(dtype):
    return np.zeros((1, 1), dtype)


# Varlen calls: where one sequence's keys end and the next one's start, at
# least this many positions apart, and every start a multiple of it (see _segment_table).
SEGMENT_ALIGN = 16


@functools.lru_cache(maxsize=256)
def _dense_segments(batch, nq, nk, lo, hi, diagonal):
    """The segment table of a dense call: batch entry b is segment b, all of its rows and keys."""
    table = np.empty((batch, 8), np.int64)
    table[:] = (0, 0, nq, 0, nk, lo, hi, diagonal)
    table[:, 0] = np.arange(batch)
    return table


def _segment_table(segments, causal, align, window, n_queries, n_keys):
    """(S, 8) int64 rows (b, qs, Nq, ks, Nk, lo, hi, diagonal) from (S, 5) rows (b, qs, Nq, ks, Nk).

    Segment s is query rows [qs, qs + Nq) of batch entry b against its keys
    [ks, ks + Nk); causal alignment and the window apply within the segment,
    lo <= j - i <= hi in segment-relative indices: causal (a bool) hides keys past
    the diagonal, which align ("top_left" or "bottom_right", as flash-attn
    aligns varlen calls) places at j - i = diagonal; the window and ALiBi are
    aligned the same way. Key
    segments of one batch entry start at multiples of SEGMENT_ALIGN and leave at
    least SEGMENT_ALIGN positions between them: the tile products store whole
    16-lane vectors, and the backward's dK / dV slots are shared by the
    segments of a batch entry.
    """
    segments = np.asarray(segments, np.int64).reshape(-1, 5)
    b, qs, nq, ks, nk = segments.T
    if segments.size and (
        qs.min() < 0 or (qs + nq).max() > n_queries or ks.min() < 0 or (ks + nk).max() > n_keys
        or nq.min() < 0 or nk.min() < 0 or np.any(ks % SEGMENT_ALIGN)
    ):  # fmt: skip
        raise ValueError("segments: every segment must lie inside q and k, with key starts a multiple of 16")
    order = np.lexsort((ks, b))
    gaps = ks[order][1:] - (ks + nk)[order][:-1]
    if np.any((b[order][1:] == b[order][:-1]) & (gaps < SEGMENT_ALIGN)):
        raise ValueError(f"segments: the keys of segments of one batch entry must be {SEGMENT_ALIGN} positions apart")
    lo, hi, offset = visible_range(nq, nk, causal=bool(causal), align=align, window=_clamped(window))
    lo = np.full(len(segments), -_UNLIMITED, np.int64) if lo is None else np.maximum(lo, -_UNLIMITED)
    hi = np.full(len(segments), _UNLIMITED, np.int64) if hi is None else np.minimum(hi, _UNLIMITED)
    return np.ascontiguousarray(np.column_stack([b, qs, nq, ks, nk, lo, hi, offset]).astype(np.int64))


# An additive mask entry at or below this (transformers' finfo(dtype).min padding, or -inf) hides
# its score exactly: beside a visible key's, exp(score + entry - row max) underflows to 0 for any
# score a float32 holds below ~1e38.
_HIDDEN_ADDITIVE = float(np.finfo(np.float32).min) / 2
# The kernels scale scores plus additive entries by log2(e); finfo(float32).min times that is -inf
# in float32 (finfo(float64).min in float64), which turned a row of only such entries into a row
# with no visible key (zeros) where the arithmetic (the reference's, torch's) averages its keys.
# Finite entries below this floor are raised to it: still exactly hidden beside a visible key.
_ADDITIVE_FLOOR = -(2.0**100)


def _mask_plan(mask, dtype, nk, block_q, block_k, rows_unrestricted=False):
    """(masks, flags) for the kernels: masks = (bool mask, additive mask, key ranges, tile states).

    Masks are data, not work, so a mask is summarised once per call:
    - a boolean mask that is the same for every query (key padding: (B, 1, 1, Nk),
      or rows all equal) whose visible keys form one run per (batch, head)
      becomes key ranges; the kernel then never reads it, and skips every key
      block outside the range;
    - an additive mask of zeros and hiding entries (_HIDDEN_ADDITIVE: how transformers writes
      a padding mask) is that boolean mask, when every row sees a key and nothing else (no
      causal alignment, window or packing: rows_unrestricted) hides keys: a row hidden whole
      would average its keys under the additive mask and give zeros under the boolean one.
      BERT fine-tuning's padding masks took 1.2-1.3x the time of the same call's boolean mask,
      every score read and added (bench/results/padding-masks.md);
    - any other mask gets tile states (_tile_summary) for the kernel's block
      grid: hidden tiles are skipped, visible ones run unmasked, mixed ones
      read the mask score by score.
    Unused parts are (1, ...)-shaped placeholders.
    """
    no_bool, no_additive, full_range, all_visible = _no_mask(np.dtype(dtype), nk)
    if mask is None or mask.size == 0:  # no keys or no rows: nothing for a mask to hide
        return (no_bool, no_additive, full_range, all_visible), 0
    if mask.dtype == np.bool_:
        if _same_for_every_query(mask):
            mask = mask[:, :, :1]  # key padding
        if mask.shape[2] == 1:
            ranges = _key_ranges(mask[:, :, 0])
            if ranges is not None:
                return (no_bool, no_additive, ranges, all_visible), 0
        states = _tile_summary(mask, ~mask, block_q, block_k)
        return (_kernel_array(mask, np.bool_), no_additive, full_range, states), _HAS_BOOL_MASK
    mask = _kernel_array(mask, dtype)
    first_row = mask[0, 0, 0]  # a mask of other values there (a learned bias) is no padding mask: no pass
    if rows_unrestricted and np.logical_or(first_row == 0, first_row <= _HIDDEN_ADDITIVE).all():
        rows = mask[:, :, :1] if _same_for_every_query(mask) else mask  # key padding: one query's row
        visible = rows == 0
        if np.logical_or(visible, rows <= _HIDDEN_ADDITIVE).all() and visible.any(axis=-1).all():
            return _mask_plan(visible, dtype, nk, block_q, block_k)
    visible = mask == 0
    if mask.min() < _ADDITIVE_FLOOR:  # -inf or entries below the floor: only then look for the latter
        overflowing = (mask < _ADDITIVE_FLOOR) & (mask > -np.inf)
        if overflowing.any():
            mask = np.where(overflowing, mask.dtype.type(_ADDITIVE_FLOOR), mask)
    states = _tile_summary(visible, mask == -np.inf, block_q, block_k)
    return (no_bool, mask, full_range, states), _HAS_ADDITIVE_MASK


def _same_for_every_query(mask):
    """Whether every query's row of mask (B, H, Mq, Nk) is the same (a key padding mask): the second
    row is compared first, so a mask whose rows differ there costs no pass over the whole."""
    if mask.shape[2] < 2:
        return False
    return (np.array_equal(mask[:, :, 1], mask[:, :, 0])
            and np.array_equal(mask, np.broadcast_to(mask[:, :, :1], mask.shape)))  # fmt: skip


def _rows_unrestricted(table, packed):
    """Whether a call's rows see every key but for its mask: dense, no causal alignment, no window."""
    return not packed and len(table) > 0 and table[0, 5] <= -_UNLIMITED and table[0, 6] >= _UNLIMITED


_NO_DROPOUT = dropout_parameters(None, 0.0)  # the kernels only read it


def _prepare(q, k, v, scale, causal, window, softcap, bf16_products, segments, align, alibi, dropout_p, dropout_seed,
             sinks=None, kv_in_place=False):  # fmt: skip
    """(dtype of the results, compute dtype, q, k, v, flags, constants, segment table, masks
    tuple's ALiBi, dropout and sinks entries) for a kernel call.

    bf16 products take bf16 bits (uint16) as they are and float32 otherwise; the
    float kernels take float32 or float64. What depends only on dtypes, shapes and
    options is planned once per signature (_static_prepare, _dense_table): small
    calls feel every microsecond. kv_in_place: K and V are left as they are, for ForwardPlan.run,
    which reads a decode's cache in place and copies what its kernel cannot read (_key_value_arrays).
    """
    dtype, compute, flags, consts = _static_prepare(
        np.dtype(q.dtype), bool(bf16_products), scale, softcap, alibi is not None, dropout_p, sinks is not None)
    q = _kernel_array(q, dtype)
    if not kv_in_place:
        k, v = _kernel_array(k, dtype), _kernel_array(v, dtype)
    if segments is None:
        table = _dense_table(q.shape[0], q.shape[2], k.shape[2], causal, _hashable(window), align)
    else:
        if align is None:
            align = "bottom_right" if causal == "bottom_right" else "top_left"
        table = _segment_table(segments, causal is not None, align, window, q.shape[2], k.shape[2])
    alibi_entry = _no_alibi(compute) if alibi is None else _kernel_array(alibi, compute)
    dropout = dropout_parameters(dropout_seed, dropout_p) if dropout_p > 0 else _NO_DROPOUT
    # No sinks: a (1,) zeros row of the cached placeholder (the kernels read it only under _HAS_SINKS).
    sinks_entry = _no_alibi(compute)[0] if sinks is None else _kernel_array(np.reshape(sinks, -1), compute)
    return dtype, compute, q, k, v, flags, consts, table, (alibi_entry, dropout, sinks_entry)


def _hashable(window):
    return None if window is None else tuple(window)


@functools.lru_cache(maxsize=256)
def _static_prepare(q_dtype, bf16_products, scale, softcap, has_alibi, dropout_p, has_sinks):
    """(dtype of the results, compute dtype, flags, constants): _prepare's part that no array value changes."""
    if bf16_products:
        dtype = np.dtype(np.uint16 if q_dtype == np.uint16 else np.float32)
        compute = np.dtype(np.float32)
    else:
        dtype = compute = np.dtype(np.float64 if q_dtype == np.float64 else np.float32)
    flags = _HAS_SOFTCAP if softcap is not None else 0
    if has_alibi:
        flags |= _HAS_ALIBI
    keep_scale = 1.0
    if dropout_p > 0:
        flags |= _HAS_DROPOUT
        keep_scale = keep_scale_of(dropout_p)
    if has_sinks:
        flags |= _HAS_SINKS
    return dtype, compute, flags, _constants(compute, scale, softcap, keep_scale)


@functools.lru_cache(maxsize=256)
def _dense_table(batch, nq, nk, causal, window, align):
    lo, hi, diagonal = _visible_offsets(nq, nk, causal, window, align)
    return _dense_segments(batch, nq, nk, lo, hi, diagonal)


def _segment_sizes(table, segments, nq, nk):
    """(longest Nq, longest Nk, sum of Nq * Nk) over the segments; a dense call's from its
    shape (small calls feel every microsecond of NumPy reductions)."""
    if segments is None:
        return nq, nk, table.shape[0] * nq * nk
    return int(table[:, 2].max(initial=0)), int(table[:, 4].max(initial=0)), int(np.dot(table[:, 2], table[:, 4]))

# The backward pass splits query rows into chunks until there are this many
# tasks (when batch x kv heads is smaller), for the work queue to balance.
_MIN_BACKWARD_TASKS = 8


def _backward_chunks(batch, hkv, nq, block_q):
    """Query chunks per (batch, kv head): more than one only when there are few pairs,
    so that every core has work; depends on the shape alone (same bits every run)."""
    n_qblocks = (nq + block_q - 1) // block_q
    return max(1, min(n_qblocks, -(-_MIN_BACKWARD_TASKS // (batch * hkv))))
