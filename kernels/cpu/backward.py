"""The backward workers: five products per tile; dK / dV owned by a task, or in per-chunk slots reduced in a fixed order."""

from __future__ import annotations

import numpy as np

from ..cpu_blas import set_threads_local
from ..jit import jit as _jit, jit_inner as _jit_inner
from ..microkernels import PAD, padded
from ..simd import exp2_affine_at
from .constants import _C_KEEP_SCALE, _C_LOG2E, _C_NEG_INF, _C_SCALE, _C_ZERO, _FASTMATH, _HAS_DROPOUT, _HAS_SOFTCAP
from .dropout import _dropout_factors, draw_words
from .launch import FAILED, RAN, REFUSED, address_of, run_step, steps_array, token_of
from .operands import (
    _backward_operand_buffers, _bf16_operand, _dp_product, _f64_of, _gradient_operands, _key_offset, _key_row,
    _load_rows, _load_transposed, _not_literal, _pack_operands, _product,
)
from .schedule import TASK_QUEUE, _next_task, _run_schedule, _segment
from .tile import _store, _task_keys, _tile_flags, _tile_scores_base2


@_jit_inner(fastmath=_FASTMATH)
def _backward_worker(
    q, k, v, operand_kind, segments, tasks, masks, out, d_out, lse, consts,
    flags, block_q, block_k, n_chunks, micro, order, next_task, dq, dk_t, dv_t, dk, dv_grad,
):  # fmt: skip
    """Take (segment, kv head, query chunk) tasks from the queue (as _forward_worker does).

    A task covers the chunk's query rows of every query head that reads its kv
    head (the GQA group): it writes their dq, and the gradients of its keys and
    values. Products: bf16 on the micro-kernel when the operands are uint16
    (operand_kind's dtype: uint16, or the float dtype of dk_t); float32 on the FMA
    micro-kernel when micro, else (and float64) through the BLAS. Accumulation in
    float32 (float64 for float64).

    The task packs its keys and values into this worker's buffers first (K^T and
    V^T, K by rows; bf16 in pairs), so that they are read from a warm cache and no
    call-sized copy of K and V is made. dK and dV are accumulated transposed,
    (D, Nk) and (Dv, Nk), so that every product reads its A operand by rows and its
    B operand by rows of the reduction axis: dV^T += dO^T P and dK^T += Q^T dS (P,
    dS in row pairs for bf16); dQ += dS K. With one chunk per kv head (n_chunks 1)
    the task owns its keys' gradients: it accumulates them in this worker's buffers
    and stores them into dk / dv_grad at its end. With more, it adds them into its
    own slot, hk * n_chunks + chunk, of dk_t / dv_t (B, Hkv * n_chunks, D, Nk + 16)
    (zero on entry), which _finish_kv_grad sums in a fixed order (deterministic, no
    atomics). Segments of one batch entry share its slots: each writes its own key
    columns (and up to 15 past them, zeros: _segment_table keeps 16 free between
    segments).
    """
    batch, hq, _, d = q.shape
    hkv = k.shape[1]
    dv = out.shape[3]
    group = hq // hkv
    alibi = masks[4]  # (S or 1, Hq or 1) slopes
    dropout = masks[5]  # Philox key and threshold (kernels/cpu/dropout.py)
    has_dropout = (flags & _HAS_DROPOUT) != 0
    bool_mask, additive_mask, key_ranges, tile_states = masks[0], masks[1], masks[2], masks[3]  # once: shared
    operand = operand_kind.dtype  # uint16 (bf16 bits), float32 or float64
    q_width, dv_width, bq_width = padded(d, 2), padded(dv, 2), padded(block_q, 2)
    neg_inf = consts[_C_NEG_INF]
    zero = consts[_C_ZERO]
    log2e = consts[_C_LOG2E]
    scale = consts[_C_SCALE]
    has_softcap = (flags & _HAS_SOFTCAP) != 0
    real = dk_t.dtype  # float32, or float64 for float64
    tile = block_q * padded(block_k + 1, PAD)
    owned = n_chunks == 1  # the task owns its keys' gradients: no slots

    longest_k = np.int64(0)  # not Literal[int](0): _backward_operand_buffers compiled once
    for seg in range(segments.shape[0]):
        longest_k = max(longest_k, segments[seg, 4])
    k_ops, v_ops, k_rows = _backward_operand_buffers(longest_k, d, dv, operand_kind)
    acc_width = longest_k + PAD if owned else 1
    dk_acc = np.empty((d if owned else 1, acc_width), real)  # (D, Nk + 16) dK^T of the task's keys
    dv_acc = np.empty((dv if owned else 1, acc_width), real)  # (Dv, Nk + 16) dV^T
    q_buf = np.empty((block_q, q_width), operand)  # (Bq, D even) Q rows
    do_buf = np.empty((block_q, dv_width), operand)  # (Bq, Dv even) dO rows
    q_t = np.empty((d, bq_width), operand)  # (D, Bq even) Q^T
    do_t = np.empty((dv, bq_width), operand)  # (Dv, Bq even) dO^T
    p_buf = np.empty(tile, real)  # (Bq, Bk16) scores, then P
    ds_buf = np.empty(tile, real)  # (Bq, Bk16) dP, then dS
    cap_buf = np.empty(tile if has_softcap else 1, real)  # (Bq, Bk) softcap factor
    pairs_buf = np.empty(bq_width * padded(block_k + 1, PAD), operand)  # P as a B operand
    # dS as a B operand: bf16 makes both pair-packed operands in one pass; floats are their own
    ds_pairs_buf = np.empty(bq_width * padded(block_k + 1, PAD) if _bf16_operand(pairs_buf) else 1, operand)
    ds_rows = np.empty(block_q * padded(block_k + 2, 2), operand)  # (Bq, Bk even) dS as an A operand
    dq_acc = np.empty((block_q, padded(d, PAD)), real)  # (Bq, D16)
    lse2 = np.empty(block_q, real)
    delta = np.empty(block_q, real)
    keep_buf = np.empty(block_q * block_k + 1 if has_dropout else 1, real)  # (Bq, Bk) dropout factors
    draws = np.empty(draw_words(block_k) if has_dropout else 1, np.uint32)  # one row's Philox words
    blas_threads = set_threads_local(np.int32(1))  # float32's dP goes through the BLAS, on this thread only

    packed_seg, packed_hk = -1, -1  # whose keys k_ops, v_ops, k_rows hold
    while True:
        t, seg, hk, chunk = _next_task(order, next_task, tasks)
        if t < 0:
            break
        b, qs, nq, ks, nk, lo_offset, hi_offset, diagonal = _segment(segments, seg)
        if seg != packed_seg or hk != packed_hk:
            _pack_operands(k[b, hk, ks : ks + nk], v[b, hk, ks : ks + nk], k_ops, v_ops, k_rows)
            packed_seg, packed_hk = seg, hk
        if owned:
            dk_task, dv_task = dk_acc, dv_acc
            dk_task[:, : nk + PAD] = zero
            dv_task[:, : nk + PAD] = zero
        else:
            dk_task, dv_task = dk_t[b, hk * n_chunks + chunk, :, ks:], dv_t[b, hk * n_chunks + chunk, :, ks:]
        n_qblocks = (nq + block_q - 1) // block_q
        blocks_per_chunk = (n_qblocks + n_chunks - 1) // n_chunks
        for task_block in range(group * blocks_per_chunk):
            h = hk * group + task_block // blocks_per_chunk
            qb = chunk * blocks_per_chunk + task_block % blocks_per_chunk
            if qb >= n_qblocks:
                continue
            slope = alibi[min(seg, alibi.shape[0] - 1), min(h, alibi.shape[1] - 1)]
            i0 = qb * block_q
            i1 = min(i0 + block_q, nq)
            bq = i1 - i0
            rows = slice(qs + i0, qs + i1)
            _load_rows(q[b, h, rows], q_buf)
            _load_rows(d_out[b, h, rows], do_buf)
            _load_transposed(q[b, h, rows], q_t)
            _load_transposed(d_out[b, h, rows], do_t)
            for r in range(bq):
                # In float64: dS = P (dP - delta) cancels when one key dominates a row, and
                # dP's own rounding (FMA order of the micro-kernel) should be all that is left.
                total = 0.0
                for c in range(dv):
                    total += _f64_of(d_out[b, h, qs + i0 + r, c]) * _f64_of(out[b, h, qs + i0 + r, c])
                delta[r] = total
                row_lse = lse[b, h, qs + i0 + r]
                lse2[r] = zero if row_lse == neg_inf else row_lse * log2e
            dq_acc[:bq] = zero

            first, stop, key_start, key_stop = _task_keys(
                key_ranges, b, h, i0, i1, nk, lo_offset, hi_offset, block_k
            )
            for kb in range(first, stop):
                tile_flags = _tile_flags(tile_states, flags, b, h, qb, kb)
                if tile_flags < 0:
                    continue  # the mask hides every score of this tile
                j0 = max(kb * block_k, i0 + lo_offset, key_start)
                j0 -= j0 % 2  # bf16's dS K reads keys in pairs; the extra key is hidden from every row
                j1 = min(kb * block_k + block_k, key_stop, i1 + hi_offset)
                bk = j1 - j0
                bk16 = padded(bk, PAD)
                p_full = p_buf[: bq * bk16].reshape((bq, bk16))
                ds_full = ds_buf[: bq * bk16].reshape((bq, bk16))
                p = p_full[:, :bk]  # (Bq, Bk)
                cap_grad = cap_buf[: bq * bk].reshape((bq, bk)) if has_softcap else cap_buf.reshape((1, 1))
                key_cols = _key_offset(j0, k_ops)
                _product(q_buf, k_ops[:, key_cols:], p_full, bq, bk, d, False, micro)  # S = Q K^T
                multiplier = _tile_scores_base2(
                    p, i0, j0, b, h, consts, lo_offset, hi_offset, key_start, key_stop, tile_flags,
                    bool_mask, additive_mask, slope, diagonal, _not_literal(True), cap_grad,
                )  # fmt: skip
                for r in range(bq):
                    exp2_affine_at(p, r, multiplier, lse2[r])
                _dp_product(do_buf, v_ops[:, key_cols:], ds_full, bq, bk, dv)  # dP = dO V^T
                keep = keep_buf[:1].reshape((1, 1))
                if has_dropout:  # delta = rowsum(dO O) is unchanged by dropout
                    keep = keep_buf[: bq * bk].reshape((bq, bk))
                    _dropout_factors(keep, draws, dropout, consts[_C_KEEP_SCALE], zero, i0, j0, h, seg)
                p_rows, ds_as_b, ds_as_a = _gradient_operands(
                    p_full, ds_full, bq, bk, delta, scale, cap_grad, has_softcap, keep, has_dropout,
                    pairs_buf, ds_pairs_buf, ds_rows)  # fmt: skip
                _product(do_t, p_rows, dv_task[:, j0:], dv, bk, bq, True, micro)  # dV^T += dO^T P
                _product(q_t, ds_as_b, dk_task[:, j0:], d, bk, bq, True, micro)  # dK^T += Q^T dS
                _product(ds_as_a, k_rows[_key_row(j0, k_ops) :], dq_acc, bq, d, bk, True, micro)  # dQ += dS K
            dq_blk = dq[b, h, rows]  # (Bq, D)
            for r in range(bq):
                for c in range(d):
                    dq_blk[r, c] = _store(dq_blk, dq_acc[r, c])
        if owned:
            _store_transposed(dk_task, nk, dk, b, hk, ks)
            _store_transposed(dv_task, nk, dv_grad, b, hk, ks)
    set_threads_local(blas_threads)


@_jit_inner()
def _finish_kv_grad(partial_t, n_chunks, result, t):
    """result[b, hk] (Nk, X) = the sum over its chunks of partial_t[b, slot] (X, Nk + 16), transposed."""
    hkv = result.shape[1]
    b, hk = t // hkv, t % hkv
    dst = result[b, hk]  # (Nk, X)
    nk, width = dst.shape
    for j in range(nk):
        for c in range(width):
            total = partial_t[b, hk * n_chunks, c, j]
            for chunk in range(1, n_chunks):
                total += partial_t[b, hk * n_chunks + chunk, c, j]
            dst[j, c] = _store(dst, total)


@_jit_inner()
def _store_transposed(acc_t, nk, result, b, hk, ks):
    """result[b, hk, ks + j, c] = acc_t[c, j] for the task's nk keys, in result's dtype."""
    for j in range(nk):
        for c in range(acc_t.shape[0]):
            result[b, hk, ks + j, c] = _store(result, acc_t[c, j])


@_jit()
def _backward_kernel(
    q, k, v, segments, masks, out, d_out, lse, consts, flags,
    block_q, block_k, n_chunks, micro, n_workers, operand_kind, dq, dk_t, dv_t, dk, dv_grad, steps,
):  # fmt: skip
    """dq, dk, dv (input dtype), on n_workers threads (1: the calling thread alone, no thread
    pool). With n_chunks > 1 through transposed partials dk_t / dv_t (zero on entry; float32,
    float64 for float64), else those are placeholders of their type. operand_kind: an array of
    the products' operand dtype (uint16 for bf16). steps: backward_steps(). Returns RAN, REFUSED
    (nothing run: the steps were compiled for other types) or FAILED (a step raised); see
    kernels/cpu/launch.py."""
    n_heads = k.shape[0] * k.shape[1]
    tasks, order = _run_schedule(segments, k.shape[1], block_q, block_k, n_chunks)
    working = (q, k, v, operand_kind, segments, tasks, masks, out, d_out, lse, consts,
               flags, block_q, block_k, n_chunks, micro, order, np.zeros(1, np.int64), dq, dk_t, dv_t, dk, dv_grad)  # fmt: skip
    finishing_k, finishing_v = (dk_t, n_chunks, dk), (dv_t, n_chunks, dv_grad)
    if (steps[1] != token_of(working, None) or steps[3] != token_of(finishing_k, 0)
            or steps[5] != token_of(finishing_v, 0)):
        return REFUSED
    parallel = n_workers > 1
    if not run_step(steps[0], working, None, n_workers, parallel):
        return FAILED
    if n_chunks > 1:  # the chunks' slots, summed in a fixed order
        if not run_step(steps[2], finishing_k, 0, n_heads, parallel):
            return FAILED
        if not run_step(steps[4], finishing_v, 0, n_heads, parallel):
            return FAILED
    return RAN


def backward_steps(
    q, k, v, segments, masks, out, d_out, lse, consts, flags,
    block_q, block_k, n_chunks, micro, n_workers, operand_kind, dq, dk_t, dv_t, dk, dv_grad,
    exact=False,
):  # fmt: skip
    """_backward_kernel's `steps` for its arguments: the worker and the two reductions."""
    tasks, order, next_task = TASK_QUEUE
    return steps_array(
        address_of(_backward_worker, (q, k, v, operand_kind, segments, tasks, masks, out, d_out, lse, consts, flags,
                                      block_q, block_k, n_chunks, micro, order, next_task, dq, dk_t, dv_t, dk, dv_grad),
                   exact=exact),
        address_of(_finish_kv_grad, (dk_t, n_chunks, dk), indexed=True, exact=exact),
        address_of(_finish_kv_grad, (dv_t, n_chunks, dv_grad), indexed=True, exact=exact),
    )  # fmt: skip
