"""FlexAttention on the CPU: a tile loop whose scores pass through a user's score_mod and mask_mod.

This file is a module and a template. attnkit.flex traces a user's torch function and generates
score_mod, score_mod_vjp and mask_mod from it (the block between the GENERATED markers); flex_build
writes that block with the rest of this file to a module named by their digest and imports it, so
Numba compiles and caches each user function once, like any other kernel. Imported as it is, the
placeholders are the identity: flex_attention without a score_mod or a mask.

Blocks come from a block mask (torch's BlockMask layout): per (batch, head, query block) the key
blocks where mask_mod must be evaluated (partial) and the ones where every score is visible (full).
Empty blocks are in neither list and never visited. Batch and head axes of size 1 broadcast.

The forward's products are the built-in kernel's (operands.py's _product on K and V packed once a
call): bf16 inputs on the bf16 path (AMX tiles or VDPBF16PS), float32 on the FMA micro-kernel,
float64 through the BLAS. The backward's go through the BLAS (cpu_blas.matmul) in the compute
dtype (bf16 and fp16 widened to float32 by the caller). Memory beyond inputs, outputs and the
packed K and V: O(block) a worker.

The workers release the GIL and share a task queue; flex_build runs one per thread from a Python
thread pool. No parallel (parfor) function: each new score_mod compiles three plain functions, and
a process forked from one that ran a call can run calls too (no OpenMP runtime involved).
"""

from __future__ import annotations

import math

import numpy as np
from ..cpu_blas import matmul, set_threads_local
from ..jit import jit as _jit
from ..simd import exp2_affine_at, row_max_at
from ..microkernels import PAD, padded
from .constants import _FASTMATH
from .operands import _a_rows_of, _first_key, _key_offset, _key_row, _pack_forward_head, _product, _scratch
from .schedule import _claim

# consts: the per-call numbers, in the compute dtype (BLAS scalars must match it).
_SCALE, _ONE, _ZERO, _LOG2E = 0, 1, 2, 3

# --- GENERATED BEGIN (flex_build replaces this block; the placeholders are the identity)


@_jit(inline="always")
def score_mod(score, b, h, q_idx, kv_idx, caps):
    return score


@_jit(inline="always")
def score_mod_vjp(score, b, h, q_idx, kv_idx, caps, grad, grad_bufs, worker):
    return grad


@_jit(inline="always")
def mask_mod(b, h, q_idx, kv_idx, caps):
    return True


# --- GENERATED END


@_jit(inline="always")
def _key_range(blocks, b, h, qb, n, block_k, nk):
    """(first key, end key, is the block partial) of entry n of (b, h, qb)'s list; empty past Nk."""
    kb, partial = _block_of(blocks, b, h, qb, n)
    j0 = kb * block_k
    return j0, max(j0, min(j0 + block_k, nk)), partial


@_jit(inline="always")
def _block_of(blocks, b, h, qb, n):
    """(key block, is it partial) of entry n of (b, h, qb)'s list: full blocks first, then partial."""
    partial_num, partial_idx, full_num, full_idx = blocks
    mb = min(b, partial_num.shape[0] - 1)
    mh = min(h, partial_num.shape[1] - 1)
    n_full = full_num[min(b, full_num.shape[0] - 1), min(h, full_num.shape[1] - 1), qb]
    if n < n_full:
        return full_idx[min(b, full_idx.shape[0] - 1), min(h, full_idx.shape[1] - 1), qb, n], False
    return partial_idx[mb, mh, qb, n - n_full], True


@_jit(inline="always")
def _block_count(blocks, b, h, qb):
    partial_num, _, full_num, _ = blocks
    n_full = full_num[min(b, full_num.shape[0] - 1), min(h, full_num.shape[1] - 1), qb]
    return n_full + partial_num[min(b, partial_num.shape[0] - 1), min(h, partial_num.shape[1] - 1), qb]


@_jit(fastmath=_FASTMATH)
def _modded_scores(s, i0, j0, b, h, scale, partial, score_caps, mask_caps):
    """s (Bq, Bk) = q.k products -> score_mod(scale * s), -inf where a partial block's mask_mod says no."""
    n_rows, n_cols = s.shape
    for r in range(n_rows):  # rows indexed, never made arrays (no reference counting per row)
        i = i0 + r
        if partial:
            for c in range(n_cols):
                x = score_mod(s[r, c] * scale, b, h, i, j0 + c, score_caps)
                s[r, c] = x if mask_mod(b, h, i, j0 + c, mask_caps) else -np.inf
        else:
            for c in range(n_cols):
                s[r, c] = score_mod(s[r, c] * scale, b, h, i, j0 + c, score_caps)


@_jit(nogil=True)
def pack_worker(k, v, k_packed, v_packed, order, next_task):
    """Take (batch, kv head) tasks from the queue: that head's K and V as the forward's B operands
    (kernels/cpu/operands.py: bf16 pairs, or K^T and V rows padded to 16 columns)."""
    while True:
        t = _claim(order, next_task)
        if t < 0:
            break
        _pack_forward_head(k, v, k_packed, v_packed, t)


@_jit(fastmath=_FASTMATH, nogil=True)
def forward_worker(
    q, k_packed, v_packed, nk, consts, score_caps, mask_caps, blocks, block_q, block_k, micro, order, next_task, out,
    lse,
):  # fmt: skip
    """Take (batch, head, query block) tasks from the queue (order, next_task) until it is empty.

    q (B, Hq, Nq, D), out (B, Hq, Nq, Dv) and lse (B, Hq, Nq) in the compute dtype; k_packed and
    v_packed: nk keys from pack_worker. Products as the built-in forward's (_product): bf16 on the bf16
    path (AMX or VDPBF16PS; Q and P rounded to bf16) when the operands are uint16, float32 on the
    FMA micro-kernel when micro, else the BLAS. lse natural log, -inf (and out 0) for a row that
    sees no key.
    """
    _, hq, nq, d = q.shape
    hkv, dv = k_packed.shape[1], out.shape[3]
    group = hq // hkv
    n_qb = (nq + block_q - 1) // block_q
    scale, one, zero, log2e = consts[_SCALE], consts[_ONE], consts[_ZERO], consts[_LOG2E]
    real = q.dtype
    operand = k_packed.dtype
    # rows padded to 16 columns for the micro-kernels, +1 key for bf16's even first key
    score_buf = np.empty(block_q * padded(block_k + 1, PAD), real)  # (Bq, Bk16) scores, then P
    acc = np.empty((block_q, padded(dv, PAD)), real)  # (Bq, Dv16) running numerator
    running_max = np.empty(block_q, real)  # (Bq,)
    row_sum = np.empty(block_q, real)  # (Bq,)
    q_buf = np.empty(_scratch(block_q * padded(d, 2), k_packed), operand)  # bf16: the block's queries
    p_buf = np.empty(_scratch(block_q * padded(block_k + 2, 2), k_packed), operand)  # bf16: P
    blas_threads = set_threads_local(1)  # this worker is one of the parallel threads already
    while True:
        t = _claim(order, next_task)
        if t < 0:
            break
        b, h, qb = t // (hq * n_qb), (t // n_qb) % hq, t % n_qb
        hk = h // group
        i0 = qb * block_q
        i1 = min(i0 + block_q, nq)
        bq = i1 - i0
        q_blk = q[b, h, i0:i1]  # (Bq, D)
        q_rows = _a_rows_of(q_blk, q_blk, q_buf)  # itself, or rounded to bf16
        for r in range(bq):
            running_max[r] = -np.inf
            row_sum[r] = zero
        acc[:bq] = zero
        for n in range(_block_count(blocks, b, h, qb)):
            j0, j1, partial = _key_range(blocks, b, h, qb, n, block_k, nk)
            if j1 == j0:
                continue
            first = _first_key(j0, k_packed)  # bf16: from an even key (the extra one hidden below)
            bk = j1 - first
            s_full = score_buf[: bq * padded(bk, PAD)].reshape((bq, padded(bk, PAD)))  # (Bq, Bk16)
            _product(q_rows, k_packed[b, hk, :, _key_offset(first, k_packed):], s_full, bq, bk, d, False, micro)
            s = s_full[:, :bk]  # (Bq, Bk): S = Q K^T
            _modded_scores(s[:, j0 - first :], i0, j0, b, h, scale, partial, score_caps, mask_caps)
            for r in range(bq):
                if first < j0:
                    s[r, 0] = -np.inf
                new_max = row_max_at(s, r, running_max[r])
                if new_max == -np.inf:  # nothing visible in this row yet: P = 0, nothing to rescale
                    for c in range(bk):
                        s[r, c] = zero
                    continue
                total = exp2_affine_at(s, r, log2e, new_max * log2e)  # P = e^(s - max), vectorised
                rescale = math.exp(running_max[r] - new_max)
                row_sum[r] = row_sum[r] * rescale + total
                running_max[r] = new_max
                if rescale != one:
                    for c in range(dv):
                        acc[r, c] *= rescale
            p_rows = _a_rows_of(s, s_full, p_buf)  # itself, or rounded to bf16
            _product(p_rows, v_packed[b, hk, _key_row(first, k_packed):], acc, bq, dv, bk, True, micro)  # acc += P V
        for r in range(bq):
            if row_sum[r] == zero:  # the row sees no key: 0, never NaN
                out[b, h, i0 + r] = zero
                lse[b, h, i0 + r] = -np.inf
            else:
                inv = one / row_sum[r]
                for c in range(dv):
                    out[b, h, i0 + r, c] = acc[r, c] * inv
                lse[b, h, i0 + r] = running_max[r] + math.log(row_sum[r])
    set_threads_local(blas_threads)


@_jit(fastmath=_FASTMATH, nogil=True)
def backward_worker(
    q, k, v, out, dout, lse, dlse, consts, score_caps, mask_caps, blocks, block_q, block_k, order, next_task,
    worker, dq, dk, dv, grad_bufs,
):  # fmt: skip
    """Take (batch, kv head) tasks from the queue: each owns dk[b, hk], dv[b, hk] and the dq rows of
    its query heads, so no two workers write the same place. Captured tensors' gradients go to this
    worker's slice grad_bufs[n][worker]. Five products per tile, as FlashAttention-2's backward.
    dlse (B, Hq, Nq) is the gradient reaching the lse (zeros when the lse was not used)."""
    _, hq, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    n_qb = (nq + block_q - 1) // block_q
    scale, one, zero, log2e = consts[_SCALE], consts[_ONE], consts[_ZERO], consts[_LOG2E]
    raw_buf = np.empty((block_q, block_k), q.dtype)  # (Bq, Bk) q.k products
    p_buf = np.empty((block_q, block_k), q.dtype)  # (Bq, Bk) P
    dp_buf = np.empty((block_q, block_k), q.dtype)  # (Bq, Bk) dP, then dS
    delta = np.empty(block_q, q.dtype)  # (Bq,) rowsum(dO * O)
    blas_threads = set_threads_local(1)
    while True:
        t = _claim(order, next_task)
        if t < 0:
            break
        b, hk = t // hkv, t % hkv
        for h in range(hk * group, hk * group + group):
            for qb in range(n_qb):
                i0 = qb * block_q
                i1 = min(i0 + block_q, nq)
                bq = i1 - i0
                q_blk, do_blk, dq_blk = q[b, h, i0:i1], dout[b, h, i0:i1], dq[b, h, i0:i1]  # (Bq, D), (Bq, Dv), (Bq, D)
                for r in range(bq):
                    total = zero
                    for c in range(do_blk.shape[1]):
                        total += do_blk[r, c] * out[b, h, i0 + r, c]
                    delta[r] = total - dlse[b, h, i0 + r]  # d lse / d score is P: it joins dO.O
                for n in range(_block_count(blocks, b, h, qb)):
                    j0, j1, partial = _key_range(blocks, b, h, qb, n, block_k, nk)
                    if j1 == j0:
                        continue
                    bk = j1 - j0
                    k_blk, v_blk = k[b, hk, j0:j1], v[b, hk, j0:j1]  # (Bk, D), (Bk, Dv)
                    raw, p, dp = raw_buf[:bq, :bk], p_buf[:bq, :bk], dp_buf[:bq, :bk]
                    matmul(q_blk, k_blk.T, raw, one, zero)  # S = Q K^T
                    p[:, :] = raw
                    _modded_scores(p, i0, j0, b, h, scale, partial, score_caps, mask_caps)
                    for r in range(bq):
                        row_lse = lse[b, h, i0 + r]
                        if row_lse == -np.inf:  # the row sees no key
                            p[r, :] = zero
                        else:
                            exp2_affine_at(p, r, log2e, row_lse * log2e)  # P = e^(s - lse)
                    matmul(p.T, do_blk, dv[b, hk, j0:j1], one, one)  # dV += P^T dO
                    matmul(do_blk, v_blk.T, dp, one, zero)  # dP = dO V^T
                    for r in range(bq):
                        for c in range(bk):
                            grad = p[r, c] * (dp[r, c] - delta[r])  # d loss / d modded score
                            if grad != zero:  # hidden or underflowed: nothing flows, to the score or the captures
                                grad = score_mod_vjp(
                                    raw[r, c] * scale, b, h, i0 + r, j0 + c, score_caps, grad, grad_bufs, worker
                                ) * scale
                            dp[r, c] = grad
                    matmul(dp, k_blk, dq_blk, one, one)  # dQ += dS K
                    matmul(dp.T, q_blk, dk[b, hk, j0:j1], one, one)  # dK += dS^T Q
    set_threads_local(blas_threads)


@_jit(nogil=True)
def classify_worker(batch, heads, nq, nk, block_q, block_k, mask_caps, order, next_task, kinds):
    """kinds[b, h, qb, kb] = 2 where mask_mod allows every score of the block, 1 where it allows some,
    0 where none: create_block_mask's work, compiled, one (b, h, query block) task at a time."""
    n_qb, n_kb = kinds.shape[2], kinds.shape[3]
    while True:
        t = _claim(order, next_task)
        if t < 0:
            break
        b, h, qb = t // (heads * n_qb), (t // n_qb) % heads, t % n_qb
        i0 = qb * block_q
        i1 = min(i0 + block_q, nq)
        for kb in range(n_kb):
            j0 = kb * block_k
            j1 = min(j0 + block_k, nk)
            seen = False
            hidden = False
            for i in range(i0, i1):
                for j in range(j0, j1):
                    if mask_mod(b, h, i, j, mask_caps):
                        seen = True
                    else:
                        hidden = True
                if seen and hidden:
                    break
            kinds[b, h, qb, kb] = 1 if seen and hidden else (2 if seen else 0)
