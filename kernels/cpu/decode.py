"""Flash-decoding: a GQA group's few query rows against many keys, keys split across cores; and
its backward: the group's rows against the keys a key at a time, K and V read in place."""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import types
from numba.extending import intrinsic, overload

from ..jit import OVERLOAD_OPTIONS, jit as _jit, jit_inner as _jit_inner
from ..key_dots import KEYS_PER_BLOCK, LANES, PAIRS, dots_block
from ..microkernels import PAD, padded
from ..pv_pairs import pv_pairs_block
from ..simd import cache_row, contiguous_row, exp2_affine_at, frame_array, prefetch, wide_vectors
from ..target import TARGET
from .constants import (
    _C_LOG2E, _C_NEG_INF, _C_ONE, _C_SCALE, _C_ZERO, _FASTMATH, _HAS_ADDITIVE_MASK, _HAS_BOOL_MASK, _HAS_SINKS,
    _HAS_SOFTCAP, _READ_AHEAD,
)
from .launch import FAILED, RAN, REFUSED, address_of, borrowed, keep_alive, run_step, steps_array, token_of
from .operands import (
    _any_layout, _not_literal, _operand_of, _padded_rows_as, _padding_buffer, _product, _rows_as,
    _widening_buffer,
)
from .schedule import TASK_QUEUE, _claim_in_runs, run_queue
from .tile import _finish_rows, _online_softmax_step, _store, _task_keys, _tile_flags, _tile_scores_base2


# ---------------------------------------------------------------------------
# Decode: a few queries against many keys (flash-decoding)
# ---------------------------------------------------------------------------


# Below `in_order_rows` rows per tile (GQA group x queries; the caller's choice, see
# kernels/numba_attention.py _in_order_rows) both products take the keys one at a time,
# reading K's and V's rows in memory order, in place (bf16 widened on the way): the scores are
# dot products, and P V adds each key's V row, scaled, to the group's output rows. Up to 4 rows
# the micro-kernel's 6 x 16 tiles are mostly padding, and its P V reads V a 16-column strip at a
# time, a cache line from each row, which the prefetchers served poorly from memory on the Zen 3
# VM: B4 H32/8 Nk4096 D128 fp32 (4 rows) 15.0 -> 8.1-10.6 ms with P V a key at a time, Nk512
# 1.6-2.0 -> 0.9-1.4 ms, H32/16 Nk1024 (2 rows) 7.2-7.6 -> 3.6-5.1 ms; bf16 about even (docs/kernel-log.md
# v25). Register blocks of 2-4 keys in the dot products ran 1.8x faster from L2 but 1.2-1.5x
# slower from memory (fp32), and were not kept.


# With _READ_AHEAD (K and V larger than the cache), the first pass of the dot products over a key
# block asks for K's row 16 keys ahead and for V's row of the same key, which P V reads after the
# block's softmax: two streams from memory at once, and P V served from the cache. Without it a
# core read one stream at a time, its hardware prefetchers stopping at every 4 KiB page (16 bf16
# rows of D128). B4 H32/8 D128 from memory on the Xeon VM: bf16 Nk4096 1.30 -> 1.71-1.84x torch,
# fp32 Nk2048 1.36 -> 1.73x; but from the cache (fp32 Nk1024, 32 MiB) 1.40-1.51 -> 1.24-1.29x, the
# prefetches costing issue slots for lines already there (docs/kernel-log.md v31).
_READ_AHEAD_KEYS = 16

# Except float32 tiles of 4 rows or more on AMD Zen 4 and 5, whose hardware prefetchers keep up with
# float32's rows of K and V in order when each key has four rows' work: there the prefetches only cost
# issue slots and miss buffers. B4 H32/8 Nk8192 D128 fp32 on the Zen 4 VM, four process pairs, two
# threads: 9.2 ms with them, 7.6 without (6.6-9.0); one thread 15.8-17.4 against 12.8-13.2. With one
# row a key (MHA) the stream runs faster than they keep up with: B4 H32 Nk2048 D128 10.3-10.6 ms with
# the prefetches, 11.6-11.9 without (kernel log v64, v67). bf16 gains from them at 4 rows too (5.1-5.4
# against 6.1-6.2 ms), its rows half as long for the same work. Zen 3 and earlier were not measured:
# they read ahead.
_FLOAT32_READ_AHEAD = TARGET.cpu not in ("znver4", "znver5")


@intrinsic
def _prefetches(typingctx, k):
    """Whether tiles of 4 rows or more read K and V ahead for K's dtype on this target: a constant in
    the caller."""
    if not isinstance(k, types.Array):
        return None
    value = k.dtype != types.float32 or _FLOAT32_READ_AHEAD

    def codegen(context, builder, signature, args):
        return context.get_constant(types.boolean, value)

    return types.boolean(k), codegen


@_jit(inline="always")
def _read_ahead(k, v, b, hk, j):
    """Prefetch K's row j + _READ_AHEAD_KEYS and V's row j (of batch b, kv head hk), every cache line."""
    k_row = k.ctypes.data + b * k.strides[0] + hk * k.strides[1] + (j + _READ_AHEAD_KEYS) * k.strides[2]
    for line in range(0, k.shape[3] * k.itemsize, 64):
        prefetch(k_row + line)
    v_row = v.ctypes.data + b * v.strides[0] + hk * v.strides[1] + j * v.strides[2]
    for line in range(0, v.shape[3] * v.itemsize, 64):
        prefetch(v_row + line)


@_jit(inline="always")
def _dots_pass(k, v, b, hk, j0, bk, start, q_rows, r, n, s_full, zero, ahead):
    """s_full[r + i, j] = q_rows[r + i] . k[b, hk, j0 + j] for n rows (1, 2 or 4; a constant at each
    call, so the unused rows' code folds away) and the block's keys from start to bk, a key at a
    time: each element of the key, widened once (bf16), serves the n rows' sums. ahead: _read_ahead
    per key."""
    d = q_rows.shape[1]
    for j in range(start, bk):
        if ahead:
            _read_ahead(k, v, b, hk, j0 + j)
        t0 = t1 = t2 = t3 = zero
        key = cache_row(k, b, hk, j0 + j)
        for c in range(d):
            x = _operand_of(s_full, key[c])
            t0 += x * q_rows[r, c]
            if n > 1:
                t1 += x * q_rows[r + 1, c]
            if n > 2:
                t2 += x * q_rows[r + 2, c]
                t3 += x * q_rows[r + 3, c]
        s_full[r, j] = t0
        if n > 1:
            s_full[r + 1, j] = t1
        if n > 2:
            s_full[r + 2, j], s_full[r + 3, j] = t2, t3


@_jit_inner(fastmath=_FASTMATH)
def _rows_blocked(k, v, b, hk, j0, bk, q_rows, q_bits, r, s_full, ahead, n):
    """_dots_pass for n rows from r (4, or 1: MHA's) and the block's keys LANES / n at a time
    (key_dots.dots_block); returns how many keys it took (the rest are the caller's). A function of
    its own: as a branch inside _in_order_dots it changed how LLVM compiled the key-at-a-time passes
    beside it (kernel log v63). No wide_vectors(): its one loop is dots_block's own vector code, so
    its callers optimize it with theirs (jit._left_to_callers). n an int64 at both call sites
    (_not_literal): one signature per dtype."""
    keys = LANES // n
    j = 0
    while j + keys <= bk:
        if ahead:
            for t in range(keys):
                _read_ahead(k, v, b, hk, j0 + j + t)
        if n == 4:
            dots_block(k, b, hk, j0 + j, q_rows, q_bits, r, s_full, j, 4)
        else:
            dots_block(k, b, hk, j0 + j, q_rows, q_bits, r, s_full, j, 1)
        j += keys
    return j


def _one_row_block(k, v, b, hk, j0, bk, q_rows, q_bits, r, s_full, ahead):
    """_rows_blocked for one row where K is bf16 bits on a target with pair products, else 0 keys
    taken: float32's one row read LANES keys' rows side by side ran 2-15% slower from the L3 (MHA
    B4 H32 Nk64 D128 on the Zen 4 VM, kernel log v66), and bf16 widened was not measured. Inlined
    by Numba: a constant 0 where it does not run."""


@overload(_one_row_block, inline="always", jit_options=OVERLOAD_OPTIONS)
def _one_row_block_overload(k, v, b, hk, j0, bk, q_rows, q_bits, r, s_full, ahead):
    if k.dtype == types.uint16 and PAIRS is not None:
        return lambda k, v, b, hk, j0, bk, q_rows, q_bits, r, s_full, ahead: _rows_blocked(
            k, v, b, hk, j0, bk, q_rows, q_bits, r, s_full, ahead, _not_literal(1))
    return lambda k, v, b, hk, j0, bk, q_rows, q_bits, r, s_full, ahead: 0


@intrinsic
def _bits_rows(typingctx, q):
    """Whether the decode worker keeps its group's rows of q as bf16 bits too (q_bits), for
    key_dots.dots_block's pair products: bf16 bits on a target with one. A constant in the caller."""
    if not isinstance(q, types.Array):
        return None
    value = q.dtype == types.uint16 and PAIRS is not None

    def codegen(context, builder, signature, args):
        return context.get_constant(types.boolean, value)

    return types.boolean(q), codegen


@intrinsic
def _blocked_dots(typingctx, k, from_memory):
    """Whether _in_order_dots takes four rows' dot products a block of keys at a time
    (_rows_blocked) rather than a key at a time (a horizontal sum per row and key): bf16 bits
    always, float32 only from the cache. Zen 4 VM, two threads, B4 H32/8 D128 (kernel log v63): bf16
    Nk512 236-239 -> 213-216 us, Nk4096 2.0-2.4 -> 1.8-2.0 ms; fp32 Nk64 52-53 -> 48-50 us, Nk512
    235-240 -> 210-225 us; fp32 from memory, blocked, read 15-30% slower (a block reads four keys'
    rows side by side).
    An intrinsic: a constant (or `not from_memory`) in the caller, no function compiled."""
    if not isinstance(k, types.Array) or not isinstance(from_memory, types.Boolean):
        return None

    def codegen(context, builder, signature, args):
        if k.dtype == types.uint16:
            return context.get_constant(types.boolean, True)
        if k.dtype == types.float32:
            return builder.not_(args[1])
        return context.get_constant(types.boolean, False)

    return types.boolean(k, from_memory), codegen


@_jit_inner(fastmath=_FASTMATH)
def _in_order_dots(k, v, b, hk, j0, bk, q_rows, q_bits, rows, s_full, zero, read_ahead):
    """s_full[r, j] = q_rows[r] . k[b, hk, j0 + j] for the tile's rows and bk keys: four rows' sums a
    pass (then two, then one), blocks of keys first where _blocked_dots says so (_rows_blocked), then
    a key at a time. read_ahead: K and V come from memory; the first pass prefetches them
    (_read_ahead) unless _prefetches says not for tiles of 4 rows or more. A row at a time, bf16
    keys were widened once per row: B4 H32/8 Nk4096 bf16 decode 4.7-4.9 -> 3.8-4.0 ms jammed, fp32
    6.2-6.4 -> 5.8-5.9 (Zen 3 VM, two threads; docs/kernel-log.md v27)."""
    wide_vectors()
    blocked = q_rows.shape[1] % LANES == 0 and _blocked_dots(k, read_ahead)  # read_ahead: from memory
    read_ahead = read_ahead and (rows < 4 or _prefetches(k))
    r = _not_literal(0)  # an int64 from the start: a literal 0 would compile the steps it meets twice
    while r + 4 <= rows:
        ahead = read_ahead and r == 0
        done = 0
        if blocked:
            done = _rows_blocked(k, v, b, hk, j0, bk, q_rows, q_bits, r, s_full, ahead, _not_literal(4))
        _dots_pass(k, v, b, hk, j0, bk, done, q_rows, r, 4, s_full, zero, ahead)
        r += 4
    if rows - r >= 2:
        _dots_pass(k, v, b, hk, j0, bk, 0, q_rows, r, 2, s_full, zero, read_ahead and r == 0)
        r += 2
    if r < rows:
        ahead = read_ahead and r == 0
        done = _one_row_block(k, v, b, hk, j0, bk, q_rows, q_bits, r, s_full, ahead) if blocked else 0
        _dots_pass(k, v, b, hk, j0, bk, done, q_rows, r, 1, s_full, zero, ahead)


def _pv_key_pairs(v):
    """Whether _in_order_pv takes V's rows two keys at a time (the output rows then loaded and stored
    once per two keys): for bf16 bits, 1.1-1.2x faster (B4 H32/8 D128 decode); not for float V,
    which ran 1.1-1.2x slower so from memory (Zen 3 VM; docs/kernel-log.md v28)."""


@overload(_pv_key_pairs, jit_options=OVERLOAD_OPTIONS)
def _pv_key_pairs_overload(v):
    pairs = v.dtype == types.uint16
    return lambda v: pairs


# The output columns a four-row P V pass keeps in registers per row across a key block: four
# vectors a row where there are 32 vector registers (16 accumulators, V's vector and 4 weights: 21),
# two where there are 16 (13). AVX-512: 64 columns of float32.
_PV_COLUMNS = TARGET.lanes * (4 if TARGET.registers >= 32 else 2)
_PV_BLOCK = 4 * _PV_COLUMNS  # its frame_array: four rows' columns


@_jit_inner(fastmath=_FASTMATH)
def _pv_four_rows_blocked(v, b, hk, j0, bk, p, r, dv, acc):
    """acc[r + i, c] += sum_j p[r + i, j] v[b, hk, j0 + j, c] for four rows and the columns c of whole
    _PV_COLUMNS blocks, each block held in registers across all bk keys (frame_array): a key costs
    its V row's loads and the FMAs, not a load and a store of every output row. Returns the first
    column left to the caller's loops. Four rows only (a GQA group of 4 or 8 per query), and a
    function of its own: inlined by Numba (inline="always") into each of _in_order_pv's passes, and
    for 2 and 3 rows too, it cost ~2 s more of the float32 decode job's compilation (kernel log v60)."""
    wide_vectors()
    local = frame_array(acc, _PV_BLOCK)
    c0 = 0
    while c0 + _PV_COLUMNS <= dv:
        for c in range(_PV_COLUMNS):
            local[c] = acc[r, c0 + c]
            local[_PV_COLUMNS + c] = acc[r + 1, c0 + c]
            local[2 * _PV_COLUMNS + c] = acc[r + 2, c0 + c]
            local[3 * _PV_COLUMNS + c] = acc[r + 3, c0 + c]
        for j in range(bk):
            w0, w1, w2, w3 = p[r, j], p[r + 1, j], p[r + 2, j], p[r + 3, j]
            value = cache_row(v, b, hk, j0 + j)
            for c in range(_PV_COLUMNS):
                x = _operand_of(acc, value[c0 + c])
                local[c] += w0 * x
                local[_PV_COLUMNS + c] += w1 * x
                local[2 * _PV_COLUMNS + c] += w2 * x
                local[3 * _PV_COLUMNS + c] += w3 * x
        for c in range(_PV_COLUMNS):
            acc[r, c0 + c] = local[c]
            acc[r + 1, c0 + c] = local[_PV_COLUMNS + c]
            acc[r + 2, c0 + c] = local[2 * _PV_COLUMNS + c]
            acc[r + 3, c0 + c] = local[3 * _PV_COLUMNS + c]
        c0 += _PV_COLUMNS
    return c0


def _four_rows_pv(v, b, hk, j0, bk, p, r, dv, acc):
    """_pv_pass's whole column blocks of four rows, held in registers across the keys; returns the
    first column left: bf16 V on a target with a pair product two keys a step (pv_pairs_block), else
    _pv_four_rows_blocked (widened). Inlined by Numba, so only the one it picks compiles (both take
    blocks of the same width on the targets with pair products, which all have 32 registers)."""


@overload(_four_rows_pv, inline="always", jit_options=OVERLOAD_OPTIONS)
def _four_rows_pv_overload(v, b, hk, j0, bk, p, r, dv, acc):
    if v.dtype == types.uint16 and PAIRS is not None:
        return lambda v, b, hk, j0, bk, p, r, dv, acc: pv_pairs_block(v, b, hk, j0, bk, p, r, acc, dv, 4)
    return lambda v, b, hk, j0, bk, p, r, dv, acc: _pv_four_rows_blocked(v, b, hk, j0, bk, p, r, dv, acc)


@_jit(inline="always")
def _pv_pass(v, b, hk, j0, bk, p, r, n, pairs, dv, acc):
    """acc[r + i, :dv] += sum_j p[r + i, j] v[b, hk, j0 + j, :dv] for n rows (1-4; a constant at each
    call, so the unused rows' code folds away): four rows' whole column blocks held in registers
    (_four_rows_pv), then the other columns in one pass over the keys, two keys' V rows a step when
    pairs, then a key at a time."""
    start = _four_rows_pv(v, b, hk, j0, bk, p, r, dv, acc) if n == 4 else 0
    if start == dv:
        return
    j = 0
    while pairs and j + 2 <= bk:
        w0, u0 = p[r, j], p[r, j + 1]
        w1, u1 = (p[r + 1, j], p[r + 1, j + 1]) if n > 1 else (w0, u0)
        w2, u2 = (p[r + 2, j], p[r + 2, j + 1]) if n > 2 else (w0, u0)
        w3, u3 = (p[r + 3, j], p[r + 3, j + 1]) if n > 3 else (w0, u0)
        first, second = cache_row(v, b, hk, j0 + j), cache_row(v, b, hk, j0 + j + 1)
        for c in range(start, dv):
            x = _operand_of(acc, first[c])
            y = _operand_of(acc, second[c])
            acc[r, c] += w0 * x + u0 * y
            if n > 1:
                acc[r + 1, c] += w1 * x + u1 * y
            if n > 2:
                acc[r + 2, c] += w2 * x + u2 * y
            if n > 3:
                acc[r + 3, c] += w3 * x + u3 * y
        j += 2
    for j in range(j, bk):
        w0 = p[r, j]
        w1 = p[r + 1, j] if n > 1 else w0
        w2 = p[r + 2, j] if n > 2 else w0
        w3 = p[r + 3, j] if n > 3 else w0
        value = cache_row(v, b, hk, j0 + j)
        for c in range(start, dv):
            x = _operand_of(acc, value[c])
            acc[r, c] += w0 * x
            if n > 1:
                acc[r + 1, c] += w1 * x
            if n > 2:
                acc[r + 2, c] += w2 * x
            if n > 3:
                acc[r + 3, c] += w3 * x


@_jit_inner(fastmath=_FASTMATH)
def _in_order_pv(v, b, hk, j0, bk, p, rows, dv, acc):
    """acc[r, :dv] += sum_j p[r, j] v[b, hk, j0 + j, :dv], keys in memory order: a V row (bf16: two
    keys' rows), loaded and widened once, serves four output rows per pass (then bf16's last three
    in one pass; float's two, then one: four keys a step, _pv_row_quads)."""
    wide_vectors()
    pairs = _pv_key_pairs(v)
    r = _not_literal(0)  # as in _in_order_dots
    while r + 4 <= rows:
        _pv_pass(v, b, hk, j0, bk, p, r, 4, pairs, dv, acc)
        r += 4
    if pairs and rows - r == 3:  # 2 + 1 would read the V block twice
        _pv_pass(v, b, hk, j0, bk, p, r, 3, pairs, dv, acc)
        r += 3
    if rows - r >= 2:
        _pv_pass(v, b, hk, j0, bk, p, r, 2, pairs, dv, acc)
        r += 2
    if r < rows:  # one row: bf16 two keys a step on the pair product, then four keys a step, then one
        _pv_row_quads(v, b, hk, j0, bk, p, r, pv_pairs_block(v, b, hk, j0, bk, p, r, acc, dv, 1), dv, acc)


@_jit(inline="always")
def _pv_row_quads(v, b, hk, j0, bk, p, r, start, dv, acc):
    """acc[r, start:dv] += sum_j p[r, j] v[b, hk, j0 + j, start:dv] for one row, four keys' V rows a
    step: the row is loaded and stored once per four keys, not per key, whose store-to-load chain
    bounded the single-row P V (MHA decode)."""
    if start == dv:
        return
    j = 0
    while j + 4 <= bk:
        w0, w1, w2, w3 = p[r, j], p[r, j + 1], p[r, j + 2], p[r, j + 3]
        v0, v1 = cache_row(v, b, hk, j0 + j), cache_row(v, b, hk, j0 + j + 1)
        v2, v3 = cache_row(v, b, hk, j0 + j + 2), cache_row(v, b, hk, j0 + j + 3)
        for c in range(start, dv):
            acc[r, c] += (w0 * _operand_of(acc, v0[c]) + w1 * _operand_of(acc, v1[c])) + (
                w2 * _operand_of(acc, v2[c]) + w3 * _operand_of(acc, v3[c]))
        j += 4
    for j in range(j, bk):
        w0 = p[r, j]
        value = cache_row(v, b, hk, j0 + j)
        for c in range(start, dv):
            acc[r, c] += w0 * _operand_of(acc, value[c])


@_jit(inline="always")
def _group_key_blocks(key_ranges, b, h0, group, nq, nk, lo_offset, hi_offset, block_k):
    """(first, stop): the key blocks any head h0 .. h0 + group - 1 of the GQA group can see."""
    first, stop = nk, 0
    for g in range(group):
        f, e, _, _ = _task_keys(key_ranges, b, h0 + g, _not_literal(0), nq, nk, lo_offset, hi_offset, block_k)
        if e > f:
            first, stop = min(first, f), max(stop, e)
    return first, stop


@_jit(inline="always")
def _head_keys(key_ranges, tile_states, flags, b, h, nq, nk, lo_offset, hi_offset, block_k, kb, j0):
    """(key_start, key_stop, tile flags) of head h's rows on key block kb (starting at key j0): a
    block the mask hides whole has no visible column, and is then read without the mask."""
    _, _, key_start, key_stop = _task_keys(key_ranges, b, h, _not_literal(0), nq, nk, lo_offset, hi_offset, block_k)
    tile_flags = _tile_flags(tile_states, flags, b, h, _not_literal(0), kb)
    if tile_flags < 0:
        return j0, j0, flags & ~(_HAS_BOOL_MASK | _HAS_ADDITIVE_MASK)
    return key_start, key_stop, tile_flags


@_jit_inner(fastmath=_FASTMATH)
def _decode_worker(
    q, k, v_rows, masks, consts, lo_offset, hi_offset, flags, block_k, n_splits, micro, in_order_rows,
    stretches, counters, out, lse, part_out, part_lse, worker,
):  # fmt: skip
    """Take (batch, kv head, key split) tasks: every query row of the GQA group at once (worker: this
    worker's index, whose home stretch of the queue it takes first: schedule.run_queue).

    The group's Hq / Hkv heads times Nq rows form one tile of rows, so K and V are
    read once per group, and S^T = K_blk Q^T comes from the micro-kernel with the
    keys as its long side (K read in place, no packing). A task's key blocks are
    its split of the blocks any row can see; with n_splits > 1 its normalised
    partial output and lse go to part_out (S, B, Hq, Nq, Dv) / part_lse (S, B, Hq,
    Nq) for _merge_splits, else straight to out / lse.

    bf16 bits (uint16 q, k, v, out) are widened to float32 as they are read, a key block
    at a time, and every product runs in float32 (consts' dtype, the compute dtype): the
    cache is read once, in place, at 2 bytes an element, and nothing is packed per call.
    """
    # Shared by every worker, and held by the kernel for the whole call: no reference counts
    q, k, v_rows, consts = borrowed(q), borrowed(k), borrowed(v_rows), borrowed(consts)
    out, lse, part_out, part_lse = borrowed(out), borrowed(lse), borrowed(part_out), borrowed(part_lse)
    stretches, counters = borrowed(stretches), borrowed(counters)  # the queue, shared: no reference count per claim
    batch, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], out.shape[3]
    group = hq // hkv
    rows = group * nq
    neg_inf = consts[_C_NEG_INF]
    zero = consts[_C_ZERO]
    dtype = consts.dtype  # the compute dtype: float32 for bf16 bits

    q_t = np.zeros((d, padded(rows, PAD)), dtype)  # (D, rows16) Q^T of the group
    q_rows = np.empty((rows, d), dtype)  # (rows, D) the group's rows, for dot products
    # (rows, D) the same rows as bf16 bits, for dots_block. A copy per task: a view of q per task (no
    # copy, no _bits_rows) ran 1-2% slower on bf16 B4 H32 Nk64 decode (review of v65, six rounds)
    q_bits = np.empty((rows if _bits_rows(q) else 1, d), q.dtype)
    st = np.empty((block_k, padded(rows, PAD)), dtype)  # (Bk, rows16) S^T
    score_buf = np.empty(rows * padded(block_k, PAD), dtype)  # (rows, Bk16) scores, then P
    acc = np.empty((rows, padded(dv, PAD)), dtype)  # (rows, Dv16)
    running_max = np.empty(rows, dtype)
    running_sum = np.empty(rows, dtype)
    rescale = np.empty(rows, dtype)
    unused_grad = np.empty((1, 1), dtype)
    unused_bits = np.empty((1, 1), np.uint16)  # P stays float32 here (P V widens V, or rounds P into pairs itself)
    k_wide = _widening_buffer(k, block_k * d, consts)  # (Bk, D) a key block widened (bf16 only)
    v_wide = _padding_buffer(v_rows, block_k, consts)  # (Bk, Dv16) a value block widened or padded, if need be
    # This worker's own buffers, viewed per task without reference counts (kept alive to the end)
    run = np.zeros(2, np.int64)  # the run of tasks this worker holds
    owners = (q_t, q_rows, st, score_buf, acc, running_max, running_sum, rescale, k_wide, v_wide, unused_bits, run,
              unused_grad, q_bits)  # fmt: skip
    q_t, q_rows, st, score_buf, acc = borrowed(q_t), borrowed(q_rows), borrowed(st), borrowed(score_buf), borrowed(acc)
    q_bits = borrowed(q_bits)
    run, unused_grad = borrowed(run), borrowed(unused_grad)
    running_max, running_sum, rescale = borrowed(running_max), borrowed(running_sum), borrowed(rescale)
    k_wide, v_wide, unused_bits = borrowed(k_wide), borrowed(v_wide), borrowed(unused_bits)
    sinks = borrowed(masks[6])  # (Hq,) learned sink logits, when flags has _HAS_SINKS
    has_sinks = (flags & _HAS_SINKS) != 0
    read_ahead = (flags & _READ_AHEAD) != 0
    bool_mask, additive_mask, key_ranges, tile_states = (borrowed(masks[0]), borrowed(masks[1]), borrowed(masks[2]),
                                                         borrowed(masks[3]))  # once: shared  # fmt: skip

    while True:
        t = _claim_in_runs(stretches, counters, run, worker)
        if t < 0:
            break
        split = t % n_splits
        hk = (t // n_splits) % hkv
        b = t // (n_splits * hkv)
        h0 = hk * group
        for g in range(group):
            for i in range(nq):
                for c in range(d):
                    q_rows[g * nq + i, c] = _operand_of(q_t, q[b, h0 + g, i, c])
                if _bits_rows(q):
                    for c in range(d):
                        q_bits[g * nq + i, c] = q[b, h0 + g, i, c]
        if rows >= in_order_rows:  # Q^T for the micro-kernel (the dot products read q_rows)
            for c in range(d):
                for r in range(rows):
                    q_t[c, r] = q_rows[r, c]
        # Key blocks: those any head of the group can see, cut into n_splits runs.
        first, stop = _group_key_blocks(key_ranges, b, h0, group, nq, nk, lo_offset, hi_offset, block_k)
        per_split = max(1, -(-(stop - first) // n_splits))
        first = first + split * per_split
        stop = min(stop, first + per_split)
        for r in range(rows):
            running_max[r] = neg_inf
            running_sum[r] = zero
            if has_sinks and split == 0:  # the sink joins one split's rows; the merge carries it
                running_max[r] = sinks[h0 + r // nq] * consts[_C_LOG2E]
                running_sum[r] = consts[_C_ONE]
        acc[:] = zero

        for kb in range(first, stop):
            j0 = kb * block_k
            j1 = min(j0 + block_k, nk)
            bk = j1 - j0
            s_full = score_buf[: rows * padded(bk, PAD)].reshape((rows, padded(bk, PAD)))
            if rows < in_order_rows:  # few rows: dot products (the micro-kernel fills 16 columns for them)
                _in_order_dots(k, v_rows, b, hk, j0, bk, q_rows, q_bits, rows, s_full, zero, read_ahead)
            else:
                _product(_rows_as(k, b, hk, j0, bk, k_wide), q_t, st, bk, rows, d, False, micro)  # S^T = K_blk Q^T
                for j in range(bk):
                    for r in range(rows):
                        s_full[r, j] = st[j, r]
            for g in range(group):
                slab = s_full[g * nq : (g + 1) * nq, :bk]  # (Nq, Bk) rows of head h0 + g
                key_start, key_stop, tile_flags = _head_keys(
                    key_ranges, tile_states, flags, b, h0 + g, nq, nk, lo_offset, hi_offset, block_k, kb, j0)
                multiplier = _tile_scores_base2(
                    slab, _not_literal(0), j0, b, h0 + g, consts, lo_offset, hi_offset, key_start, key_stop,
                    tile_flags, bool_mask, additive_mask, zero, _not_literal(0), _not_literal(False), unused_grad,
                )  # fmt: skip
                if multiplier != consts[_C_ONE]:  # raw products left scaled by the caller: scale them here
                    for r in range(nq):
                        row = contiguous_row(slab, r)  # slab[r, c] kept the loop scalar (kernel log v48)
                        for c in range(bk):
                            row[c] *= multiplier
            _online_softmax_step(s_full[:, :bk], consts[_C_ONE], consts, running_max, running_sum, rescale, acc,
                                 unused_bits, _not_literal(False))  # the forward's types  # fmt: skip
            if rows < in_order_rows:  # acc += P V, keys in memory order
                _in_order_pv(v_rows, b, hk, j0, bk, s_full, rows, dv, acc)
            else:
                v_blk = _padded_rows_as(v_rows, b, hk, j0, bk, v_wide)  # read in place where Dv allows
                _product(s_full, v_blk, acc, rows, dv, bk, True, micro)  # acc += P V

        for g in range(group):
            h = h0 + g
            block = acc[g * nq : (g + 1) * nq]
            if n_splits == 1:
                _finish_rows(block, running_max[g * nq :], running_sum[g * nq :], consts, out[b, h], lse[b, h])
            else:
                _finish_rows(
                    block, running_max[g * nq :], running_sum[g * nq :], consts,
                    part_out[split, b, h], part_lse[split, b, h],
                )  # fmt: skip
    keep_alive(owners)


@_jit_inner()
def _merge_splits(part_out, part_lse, out, lse, t):
    """out / lse of (batch, head) t from the splits' normalised partials, weighted by exp(lse_s - lse)
    (out: the partials' float dtype, or bf16 bits, rounded once)."""
    n_splits, batch, hq, nq, dv = part_out.shape
    b, h = t // hq, t % hq
    for i in range(nq):
        top = -np.inf
        for sp in range(n_splits):
            top = max(top, part_lse[sp, b, h, i])
        if top == -np.inf:  # no split saw a key: exact zeros, lse -inf
            for c in range(dv):
                out[b, h, i, c] = _store(out, 0.0)
            lse[b, h, i] = -np.inf
            continue
        total = 0.0
        for sp in range(n_splits):
            total += math.exp(part_lse[sp, b, h, i] - top)
        row_lse = top + math.log(total)
        for c in range(dv):
            value = 0.0
            for sp in range(n_splits):
                weight = math.exp(part_lse[sp, b, h, i] - row_lse)
                if weight > 0:
                    value += weight * part_out[sp, b, h, i, c]
            out[b, h, i, c] = _store(out, value)
        lse[b, h, i] = row_lse


@_jit()
def _decode_kernel(
    q, k, v_rows, masks, consts, lo_offset, hi_offset, flags, block_k, n_splits, micro, in_order_rows, n_workers,
    out, lse, part_out, part_lse, steps,
):  # fmt: skip
    """n_workers workers (1: on the calling thread, no thread pool), then the merge of split
    keys. steps: decode_steps(). Returns RAN, REFUSED (nothing run: the steps were compiled
    for other types) or FAILED (a step raised); see kernels/cpu/launch.py."""
    n_tasks = k.shape[0] * k.shape[1] * n_splits
    # K and V typed as layout 'A' whatever their layout: one worker serves a C-contiguous cache and
    # one read in place (flash-attn's (B, N, Hkv, D) seen as (B, Hkv, N, D)); its row loops read
    # through simd.cache_row, as fast on either (kernel log v56). The kernel itself is compiled so
    # too (numba_attention._decode_call), and _any_layout is then a no-op
    stretches, counters = run_queue(n_tasks, n_workers)
    # The steps' arguments without reference counts (launch.borrowed): the caller holds the kernel's
    # arguments, and the queue is kept alive to the end. Counted, each was an atomic add and subtract
    # per argument per call, on counters the workers share.
    working = (borrowed(q), borrowed(_any_layout(k)), borrowed(_any_layout(v_rows)), borrowed(masks), borrowed(consts),
               lo_offset, hi_offset, flags, block_k, n_splits, micro, in_order_rows, borrowed(stretches),
               borrowed(counters), borrowed(out), borrowed(lse), borrowed(part_out), borrowed(part_lse))  # fmt: skip
    merging = borrowed((part_out, part_lse, out, lse))
    if steps[1] != token_of(working, 0) or steps[3] != token_of(merging, 0):
        return REFUSED
    parallel = n_workers > 1
    status = RAN
    if not run_step(steps[0], working, 0, n_workers, parallel):  # the worker's index appended
        status = FAILED
    elif n_splits > 1 and not run_step(steps[2], merging, 0, q.shape[0] * q.shape[1], parallel):
        status = FAILED
    keep_alive((stretches, counters))
    return status


@functools.lru_cache(maxsize=16)
def _any_layout_of(dtype, ndim, writeable):
    """A small array of dtype and ndim that numba.typeof types as layout 'A' (neither C- nor
    F-contiguous: its last axis cut in half), aligned, writeable or not."""
    array = np.zeros((1,) * (ndim - 2) + (2, 2), dtype)[..., :1]
    array.flags.writeable = writeable
    return array


def _any_layout_like(x):
    """A stand-in for x (aligned, as the plans make K and V) in address_of: the same type but for
    the layout, 'A' (what _any_layout makes of x in the kernel)."""
    return _any_layout_of(x.dtype, x.ndim, x.flags.writeable)


def decode_steps(
    q, k, v_rows, masks, consts, lo_offset, hi_offset, flags, block_k, n_splits, micro, in_order_rows, n_workers,
    out, lse, part_out, part_lse, exact=False,
):  # fmt: skip
    """_decode_kernel's `steps` for its arguments: the worker (K and V typed as layout 'A' arrays,
    as the kernel passes them) and the merge of split keys."""
    _, stretches, counters = TASK_QUEUE  # int64 arrays: run_queue's types
    k, v_rows = _any_layout_like(k), _any_layout_like(v_rows)
    return steps_array(
        address_of(_decode_worker, (q, k, v_rows, masks, consts, lo_offset, hi_offset, flags, block_k, n_splits,
                                    micro, in_order_rows, stretches, counters, out, lse, part_out, part_lse),
                   indexed=True, exact=exact),
        address_of(_merge_splits, (part_out, part_lse, out, lse), indexed=True, exact=exact),
    )  # fmt: skip


# ---------------------------------------------------------------------------
# The decode backward: a few query rows per GQA group, gradients a key at a time
# ---------------------------------------------------------------------------

_DECODE_BACKWARD_BLOCK_K = 128


@_jit_inner(fastmath=_FASTMATH)
def _decode_backward_worker(
    q, k, v, masks, consts, lo_offset, hi_offset, flags, block_k, stretches, counters, out, d_out, lse, dq, dk, dv_grad,
    worker,
):  # fmt: skip
    """Take (batch, kv head) tasks: the GQA group's Hq / Hkv heads times Nq rows against every key
    they see, a block of keys at a time (worker: this worker's index in the queue, as _decode_worker's).

    Per block: S and dP = dO V^T as dot products with each key's row of K and V (read in place,
    bf16 widened as read), the masks and the scale per head, P = exp(S - lse) and dS =
    P (dP - delta); then per key, dV_j = sum_r P_rj dO_r and dK_j = sum_r dS_rj Q_r, written
    once (this task owns the kv head's keys: no partial slots, nothing to reduce after), and
    dQ_r += dS_rj K_j. The prefill backward packs K and V per call and keeps dK and dV in
    transposed per-task slots: for one query row that is most of its time.
    """
    batch, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hkv
    rows = group * nq
    neg_inf = consts[_C_NEG_INF]
    zero = consts[_C_ZERO]
    log2e = consts[_C_LOG2E]
    scale = consts[_C_SCALE]
    has_softcap = (flags & _HAS_SOFTCAP) != 0
    dtype = consts.dtype  # the compute dtype: float32 for bf16 bits

    q_rows = np.empty((rows, d), dtype)  # the group's rows of Q
    do_rows = np.empty((rows, dv), dtype)  # and of dO
    dq_acc = np.empty((rows, d), dtype)
    lse2 = np.empty(rows, dtype)
    delta = np.empty(rows, dtype)
    k_blk = np.empty((block_k, d), dtype)  # the block's keys, widened where bf16
    score_buf = np.empty(rows * block_k, dtype)  # (rows, Bk) S, then P
    dp_buf = np.empty(rows * block_k, dtype)  # (rows, Bk) dP, then dS
    cap_buf = np.empty(nq * block_k if has_softcap else 1, dtype)  # (Nq, Bk) one head's softcap factors
    v_row = np.empty(dv, dtype)
    dk_row = np.empty(d, dtype)
    dv_row = np.empty(dv, dtype)
    bool_mask, additive_mask, key_ranges, tile_states = masks[0], masks[1], masks[2], masks[3]  # once: shared

    run = np.zeros(2, np.int64)  # the run of tasks this worker holds
    while True:
        t = _claim_in_runs(stretches, counters, run, worker)
        if t < 0:
            break
        hk = t % hkv
        b = t // hkv
        h0 = hk * group
        for g in range(group):
            for i in range(nq):
                r = g * nq + i
                total = 0.0
                for c in range(d):
                    q_rows[r, c] = _operand_of(q_rows, q[b, h0 + g, i, c])
                for c in range(dv):
                    do_rows[r, c] = _operand_of(do_rows, d_out[b, h0 + g, i, c])
                    total += np.float64(do_rows[r, c]) * np.float64(_operand_of(do_rows, out[b, h0 + g, i, c]))
                delta[r] = total
                row_lse = lse[b, h0 + g, i]
                lse2[r] = zero if row_lse == neg_inf else row_lse * log2e
        dq_acc[:] = zero
        first, stop = _group_key_blocks(key_ranges, b, h0, group, nq, nk, lo_offset, hi_offset, block_k)

        for kb in range(first, stop):
            j0 = kb * block_k
            bk = min(j0 + block_k, nk) - j0
            s = score_buf[: rows * bk].reshape((rows, bk))
            dp = dp_buf[: rows * bk].reshape((rows, bk))
            for j in range(bk):  # S and dP: each key's rows of K and V against the group's rows
                for c in range(d):
                    k_blk[j, c] = _operand_of(k_blk, k[b, hk, j0 + j, c])
                for c in range(dv):
                    v_row[c] = _operand_of(v_row, v[b, hk, j0 + j, c])
                for r in range(rows):
                    total = zero
                    for c in range(d):
                        total += q_rows[r, c] * k_blk[j, c]
                    s[r, j] = total
                    total = zero
                    for c in range(dv):
                        total += do_rows[r, c] * v_row[c]
                    dp[r, j] = total
            for g in range(group):  # masks and scale per head, then P and dS
                slab = _any_layout(s[g * nq : (g + 1) * nq])  # the backward's types
                key_start, key_stop, tile_flags = _head_keys(
                    key_ranges, tile_states, flags, b, h0 + g, nq, nk, lo_offset, hi_offset, block_k, kb, j0)
                cap_grad = cap_buf[: nq * bk].reshape((nq, bk)) if has_softcap else cap_buf.reshape((1, 1))
                multiplier = _tile_scores_base2(
                    slab, _not_literal(0), j0, b, h0 + g, consts, lo_offset, hi_offset, key_start, key_stop,
                    tile_flags, bool_mask, additive_mask, zero, _not_literal(0), _not_literal(True), cap_grad,
                )  # fmt: skip
                for i in range(nq):
                    r = g * nq + i
                    exp2_affine_at(s, r, multiplier, lse2[r])  # P
                    row_delta = delta[r]
                    if has_softcap:
                        for c in range(bk):
                            dp[r, c] = s[r, c] * (dp[r, c] - row_delta) * cap_grad[i, c]
                    else:
                        for c in range(bk):
                            dp[r, c] = s[r, c] * (dp[r, c] - row_delta) * scale
            for j in range(bk):  # dV_j, dK_j written once; dQ accumulated
                dv_row[:] = zero
                dk_row[:] = zero
                for r in range(rows):
                    weight = s[r, j]
                    for c in range(dv):
                        dv_row[c] += weight * do_rows[r, c]
                    grad = dp[r, j]
                    for c in range(d):
                        dk_row[c] += grad * q_rows[r, c]
                        dq_acc[r, c] += grad * k_blk[j, c]
                for c in range(dv):
                    dv_grad[b, hk, j0 + j, c] = _store(dv_grad, dv_row[c])
                for c in range(d):
                    dk[b, hk, j0 + j, c] = _store(dk, dk_row[c])
        for g in range(group):
            for i in range(nq):
                for c in range(d):
                    dq[b, h0 + g, i, c] = _store(dq, dq_acc[g * nq + i, c])


@_jit()
def _decode_backward_kernel(
    q, k, v, masks, consts, lo_offset, hi_offset, flags, block_k, n_workers, out, d_out, lse, dq, dk, dv_grad, steps,
):  # fmt: skip
    """n_workers workers (1: on the calling thread) over the (batch, kv head) tasks. steps:
    decode_backward_steps(). Returns RAN, REFUSED or FAILED (kernels/cpu/launch.py)."""
    n_tasks = k.shape[0] * k.shape[1]
    workers = min(n_workers, n_tasks)
    stretches, counters = run_queue(n_tasks, workers)
    # without reference counts, as _decode_kernel's
    working = (borrowed(q), borrowed(k), borrowed(v), borrowed(masks), borrowed(consts), lo_offset, hi_offset, flags,
               block_k, borrowed(stretches), borrowed(counters), borrowed(out), borrowed(d_out), borrowed(lse),
               borrowed(dq), borrowed(dk), borrowed(dv_grad))  # fmt: skip
    if steps[1] != token_of(working, 0):
        return REFUSED
    status = RAN if run_step(steps[0], working, 0, workers, n_workers > 1) else FAILED  # the worker's index appended
    keep_alive((stretches, counters))
    return status


def decode_backward_steps(
    q, k, v, masks, consts, lo_offset, hi_offset, flags, block_k, n_workers, out, d_out, lse, dq, dk, dv_grad,
    exact=False,
):  # fmt: skip
    """_decode_backward_kernel's `steps` for its arguments: the worker."""
    _, stretches, counters = TASK_QUEUE  # int64 arrays: run_queue's types
    return steps_array(
        address_of(_decode_backward_worker, (q, k, v, masks, consts, lo_offset, hi_offset, flags, block_k, stretches,
                                             counters, out, d_out, lse, dq, dk, dv_grad), indexed=True, exact=exact),
    )  # fmt: skip
