"""The forward workers: (segment, head, run of query blocks) tasks, all keys of a task per worker."""

from __future__ import annotations

import numpy as np

from ..cpu_blas import set_threads_local
from ..jit import jit as _jit, jit_inner as _jit_inner
from ..microkernels import PAD, padded
from .constants import _C_KEEP_SCALE, _C_LOG2E, _C_NEG_INF, _C_ONE, _C_ZERO, _FASTMATH, _HAS_DROPOUT, _HAS_SINKS
from .dropout import _dropout_factors, draw_words
from .launch import FAILED, RAN, REFUSED, address_of, borrowed, keep_alive, run_step, steps_array, token_of
from .operands import (
    _a_rows_of, _bf16_operand, _dropped_operand, _first_key, _key_offset, _key_row, _p_operand, _p_rows_buffer,
    _not_literal, _pack_forward_head, _product, _scratch,
)
from .schedule import TASK_QUEUE, _forward_runs, _next_task, _run_schedule, _segment
from .tile import _finish_rows, _online_softmax_step, _task_keys, _tile_flags, _tile_scores_base2


@_jit_inner(fastmath=_FASTMATH)
def _forward_worker(
    q, k_packed, v_packed, segments, tasks, masks, consts, flags, block_q, block_k, n_runs, micro, order, next_task,
    out, lse,
):  # fmt: skip
    """Take (segment, head, run of query blocks) tasks from the queue until it is empty: a run is
    one of n_runs stretches of the head's consecutive query blocks (schedule._forward_runs).

    A segment (see _segment_table) is one sequence: query rows [qs, qs + Nq) of
    batch entry b against keys [ks, ks + Nk), with its own causal / window
    offsets: a batch entry of a dense call, or one sequence of a packed
    (varlen) call. Within a task every index is relative to its segment.

    The queue is `order` (flat task indices, heaviest first) and the shared
    counter next_task[0]: each worker claims the next index atomically, so a
    worker slowed down (a busy core) simply takes fewer tasks. Which worker runs
    a task never changes what the task computes, so results stay bit-identical.

    Products: bf16 on the micro-kernel when the packed operands (_pack_forward)
    are uint16 (Q rounded per block, P rounded to bf16 for P V, as torch and
    flash-attn do); float32 on the FMA micro-kernel when micro; else, and
    float64 always, through the BLAS. Scores, softmax and acc in lse's dtype.
    """
    # Shared by every worker, and held by the kernel for the whole call: no reference counts (launch.borrowed)
    q, k_packed, v_packed, segments, consts, out, lse = (borrowed(q), borrowed(k_packed), borrowed(v_packed),
                                                         borrowed(segments), borrowed(consts), borrowed(out),
                                                         borrowed(lse))  # fmt: skip
    tasks, order = borrowed(tasks), borrowed(order)
    batch, hq, _, d = q.shape
    hkv, dv = k_packed.shape[1], out.shape[3]
    group = hq // hkv
    neg_inf = consts[_C_NEG_INF]
    zero = consts[_C_ZERO]
    real = lse.dtype
    operand = k_packed.dtype
    alibi = borrowed(masks[4])  # (S or 1, Hq or 1) slopes
    dropout = borrowed(masks[5])  # Philox key and threshold (kernels/cpu/dropout.py)
    has_dropout = (flags & _HAS_DROPOUT) != 0
    sinks = borrowed(masks[6])  # (Hq,) learned sink logits, when flags has _HAS_SINKS
    has_sinks = (flags & _HAS_SINKS) != 0
    bool_mask, additive_mask, key_ranges, tile_states = (borrowed(masks[0]), borrowed(masks[1]), borrowed(masks[2]),
                                                         borrowed(masks[3]))  # once: shared  # fmt: skip

    # Scratch for this worker: O(block) memory, independent of N; rows padded to
    # 16 columns for the micro-kernels (+1 key: bf16's even first key).
    score_buf = np.empty(block_q * padded(block_k + 1, PAD), real)  # (Bq, Bk16) scores, then P
    acc = np.empty((block_q, padded(dv, PAD)), real)  # (Bq, Dv16) running numerator
    running_max = np.empty(block_q, real)  # (Bq,) running max, base 2
    running_sum = np.empty(block_q, real)  # (Bq,) running denominator
    rescale = np.empty(block_q, real)  # (Bq,) exp2(old max - new max)
    unused_grad = np.empty((1, 1), real)
    q_buf = np.empty(_scratch(block_q * padded(d, 2), k_packed), operand)  # bf16: the block's queries
    p_buf = np.empty(_scratch(block_q * padded(block_k + 2, 2), k_packed), operand)  # bf16: P
    keep_buf = np.empty(block_q * block_k if has_dropout else 1, real)  # (Bq, Bk) dropout factors
    draws = np.empty(draw_words(block_k) if has_dropout else 1, np.uint32)  # one row's Philox words
    unused_bits = np.empty((1, 1), np.uint16)  # float operands: P is its own operand
    # bf16 operands: P rounded to bf16 in the softmax's pass, unless dropout scales P after it
    round_in_softmax = _bf16_operand(p_buf) and not has_dropout
    # This worker's own buffers, viewed per tile without reference counts (kept alive to the end)
    owners = (score_buf, acc, running_max, running_sum, rescale, unused_grad, q_buf, p_buf, keep_buf, draws,
              unused_bits)
    score_buf, acc, running_max, running_sum = borrowed(score_buf), borrowed(acc), borrowed(running_max), borrowed(
        running_sum)
    rescale, unused_grad, q_buf, p_buf = borrowed(rescale), borrowed(unused_grad), borrowed(q_buf), borrowed(p_buf)
    keep_buf, draws, unused_bits = borrowed(keep_buf), borrowed(draws), borrowed(unused_bits)
    blas_threads = set_threads_local(np.int32(1))  # this worker is one of the parallel threads already

    while True:
        t, seg, h, run = _next_task(order, next_task, tasks)
        if t < 0:
            break
        b, qs, nq, ks, nk, lo_offset, hi_offset, diagonal = _segment(segments, seg)
        slope = alibi[min(seg, alibi.shape[0] - 1), min(h, alibi.shape[1] - 1)]
        hk = h // group
        n_qblocks = (nq + block_q - 1) // block_q
        blocks_per_run = (n_qblocks + n_runs - 1) // n_runs
        for qb in range(run * blocks_per_run, min(n_qblocks, (run + 1) * blocks_per_run)):
            i0 = qb * block_q
            i1 = min(i0 + block_q, nq)
            bq = i1 - i0
            q_blk = q[b, h, qs + i0 : qs + i1]  # (Bq, D)
            q_rows = _a_rows_of(q_blk, q_blk, q_buf)  # itself, or rounded to bf16
            # A sink is one more score that carries no value: it starts the running max and sum.
            start_max, start_sum = (sinks[h] * consts[_C_LOG2E], consts[_C_ONE]) if has_sinks else (neg_inf, zero)
            for r in range(bq):
                running_max[r] = start_max
                running_sum[r] = start_sum
            acc[:bq] = zero

            first, stop, key_start, key_stop = _task_keys(key_ranges, b, h, i0, i1, nk, lo_offset, hi_offset, block_k)
            for kb in range(first, stop):
                tile_flags = _tile_flags(tile_states, flags, b, h, qb, kb)
                if tile_flags < 0:
                    continue  # the mask hides every score of this tile
                # Columns no row of the block can see (causal / window edges, key range) are not computed.
                j0 = _first_key(max(kb * block_k, i0 + lo_offset, key_start), k_packed)
                j1 = min(kb * block_k + block_k, key_stop, i1 + hi_offset)
                bk = j1 - j0
                s_full = score_buf[: bq * padded(bk, PAD)].reshape((bq, padded(bk, PAD)))  # (Bq, Bk16)
                key_cols = _key_offset(ks + j0, k_packed)
                _product(q_rows, k_packed[b, hk, :, key_cols:], s_full, bq, bk, d, False, micro)  # S = Q K^T
                s = s_full[:, :bk]  # (Bq, Bk)
                multiplier = _tile_scores_base2(
                    s, i0, j0, b, h, consts, lo_offset, hi_offset, key_start, key_stop, tile_flags,
                    bool_mask, additive_mask, slope, diagonal, _not_literal(False), unused_grad,
                )  # fmt: skip
                p_bits = _p_rows_buffer(p_buf, bq, bk, unused_bits)  # (Bq, Bk2) bf16 P, or unused
                _online_softmax_step(s, multiplier, consts, running_max, running_sum, rescale, acc, p_bits,
                                     round_in_softmax)  # fmt: skip
                if has_dropout:  # after the running sum: dropout scales the weights, not their total
                    keep = keep_buf[: bq * bk].reshape((bq, bk))
                    _dropout_factors(keep, draws, dropout, consts[_C_KEEP_SCALE], zero, i0, j0, h, seg)
                    p_rows = _dropped_operand(s, s_full, keep, p_buf, p_bits)  # P Z: in place, or rounded to bf16
                else:
                    p_rows = _p_operand(s, s_full, p_buf, p_bits, round_in_softmax)  # itself, or rounded to bf16
                v_row = _key_row(ks + j0, k_packed)
                _product(p_rows, v_packed[b, hk, v_row:], acc, bq, dv, bk, True, micro)  # acc += P V
            rows = slice(qs + i0, qs + i1)
            _finish_rows(acc, running_max, running_sum, consts, out[b, h, rows], lse[b, h, rows])
    set_threads_local(blas_threads)
    keep_alive(owners)


# The kernel only fans the steps out, calling them by address (kernels/cpu/launch.py):
# they are compiled once on their own, and no parallel function is compiled per kernel.
@_jit()
def _forward_kernel(
    q, k, v, segments, masks, consts, flags, block_q, block_k, micro, n_workers, k_packed, v_packed, out, lse, steps,
):  # fmt: skip
    """Pack K and V, then run n_workers workers (1: on the calling thread, no thread pool).
    steps: forward_steps(). Returns RAN, REFUSED (nothing run: the steps were compiled for
    other types) or FAILED (a step raised)."""
    n_runs = _forward_runs(segments, q.shape[1], block_q, n_workers)
    tasks, order = _run_schedule(segments, q.shape[1], block_q, block_k, n_runs)
    next_task = np.zeros(1, np.int64)
    # The steps' arguments without reference counts (launch.borrowed): the caller holds the
    # kernel's arguments, and the three arrays made here are kept alive to the end.
    packing = borrowed((k, v, k_packed, v_packed))
    working = (borrowed(q), borrowed(k_packed), borrowed(v_packed), borrowed(segments), borrowed(tasks),
               borrowed(masks), borrowed(consts), flags, block_q, block_k, n_runs, micro, borrowed(order),
               borrowed(next_task), borrowed(out), borrowed(lse))  # fmt: skip
    if steps[1] != token_of(packing, 0) or steps[3] != token_of(working, None):
        return REFUSED
    parallel = n_workers > 1
    status = RAN
    if not run_step(steps[0], packing, 0, k.shape[0] * k.shape[1], parallel):
        status = FAILED
    elif not run_step(steps[2], working, None, n_workers, parallel):
        status = FAILED
    keep_alive((tasks, order, next_task))
    return status


def forward_steps(
    q, k, v, segments, masks, consts, flags, block_q, block_k, micro, n_workers, k_packed, v_packed, out, lse,
    exact=False,
):  # fmt: skip
    """_forward_kernel's `steps` for its arguments: the packing and the worker, compiled for their types."""
    tasks, order, next_task = TASK_QUEUE
    return steps_array(
        address_of(_pack_forward_head, (k, v, k_packed, v_packed), indexed=True, exact=exact),
        address_of(_forward_worker, (q, k_packed, v_packed, segments, tasks, masks, consts, flags, block_q, block_k,
                                     1, micro, order, next_task, out, lse), exact=exact),  # 1: n_runs, an int
    )  # fmt: skip
