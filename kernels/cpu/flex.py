"""FlexAttention on the CPU: a tile loop whose scores pass through a user's score_mod and mask_mod.

This file is a module and a template. attnkit.flex traces a user's torch function and generates
score_mod, score_mod_vjp and mask_mod from it (the block between the GENERATED markers); flex_build
writes that block with the rest of this file to a module named by their digest and imports it, so
Numba compiles and caches each user function once, like any other kernel. Imported as it is, the
placeholders are the identity: flex_attention without a score_mod or a mask.

Blocks come from a block mask (torch's BlockMask layout): per (batch, head, query block) the key
blocks where mask_mod must be evaluated (partial) and the ones where every score is visible (full).
Empty blocks are in neither list and never visited. Batch and head axes of size 1 broadcast.

The products are the built-in kernel's (operands.py's _product on K and V packed once a call):
bf16 inputs on the bf16 path (AMX tiles or VDPBF16PS; Q, P, dO and dS rounded to bf16 as the
built-in kernel does), float32 on the FMA micro-kernel, float64 through the BLAS; the rest in the
compute dtype (bf16 and fp16 widened to float32 by the caller). Memory beyond inputs, outputs, the
packed K and V and the backward's transposed dK / dV: O(block) a worker.

The workers share a task queue; flex_build runs one per thread over Numba's threads, by address
through kernels/cpu/launch.py's one parallel loop (the OpenMP team the built-in kernels use, and on
the calling thread torch's operators too: a team of Python threads beside it lost 2 ms of a 6 ms
call to torch's threads still spinning after its last operator). No parallel (parfor) function
here: each new score_mod compiles plain functions (kernel log v45). A forked child runs its calls
on one thread (threads.py).
"""

from __future__ import annotations

import math

import numpy as np
from ..cpu_blas import set_threads_local
from ..jit import jit as _jit
from ..simd import exp2_affine_at, row_max_at
from ..microkernels import PAD, padded
from .backward import _store_transposed
from .constants import _FASTMATH
from .operands import (
    _a_rows_of, _backward_operand_buffers, _bf16_operand, _dp_product, _first_key, _gradient_operands, _key_offset,
    _key_row, _load_rows, _load_transposed, _f64_of, _p_operand, _p_rows_buffer, _pack_forward_head, _pack_operands,
    _product, _scratch, _tile_operands,
)
from .schedule import _claim
from .tile import _exp2_rounding_row, _store

# consts: the per-call numbers, in the compute dtype (BLAS scalars must match it).
_SCALE, _ONE, _ZERO, _LOG2E = 0, 1, 2, 3

_INT_DIVISION_BY_ZERO = "integer division or modulo by zero in a score_mod or mask_mod"


# The generated functions' integer //, % and truncating division pass their divisor through this:
# a division by zero raises as torch's does (the kernels' own error model would give 0).
@_jit(inline="always")
def _int_divisor(b):
    if b == 0:
        raise ZeroDivisionError(_INT_DIVISION_BY_ZERO)
    return b


# --- GENERATED BEGIN (flex_build replaces this block; the placeholders are the identity)


SCORE_MOD_IS_IDENTITY = True  # the kernels then scale inside exp2 and need no pass of their own


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

# Adjacent full key blocks are run as one tile of up to this many keys (the built-in kernel's
# forward / backward key blocks): fewer, wider products and row passes.
_FORWARD_SPAN, _BACKWARD_SPAN = 512, 256


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


@_jit(inline="always")
def _key_span(blocks, b, h, qb, n, count, block_k, nk, span):
    """(first key, end key, partial, next entry) from entry n: a partial block alone, or full
    blocks while the next is full and adjacent and the keys stay within `span`."""
    j0, j1, partial = _key_range(blocks, b, h, qb, n, block_k, nk)
    n += 1
    if not partial:
        while n < count and j1 - j0 + block_k <= span:
            k0, k1, next_partial = _key_range(blocks, b, h, qb, n, block_k, nk)
            if next_partial or k0 != j1:
                break
            j1 = k1
            n += 1
    return j0, j1, partial, n


@_jit(fastmath=_FASTMATH)
def _masked_raw_scores(s_full, col0, n_rows, n_cols, i0, j0, b, h, mask_caps):
    """-inf in s_full[:n_rows, col0:col0 + n_cols] (the scores of queries i0.., keys j0..) where
    mask_mod hides a score (a partial block under the identity score_mod: the products stay raw,
    scaled inside exp2). Columns indexed unsigned: Numba's wraparound of a signed index kept the
    loop scalar (a document mask's select: 2.4 -> 0.8 ns a score, one thread)."""
    for r in range(n_rows):  # a select, not a branch: the loop vectorises where mask_mod allows
        for c in range(n_cols):  # rows indexed, never made arrays (a row view costs two atomic counts)
            col = np.uint64(col0 + c)
            s_full[r, col] = s_full[r, col] if mask_mod(b, h, i0 + r, j0 + c, mask_caps) else -np.inf


@_jit(fastmath=_FASTMATH)
def _modded_scores(s_full, col0, n_rows, n_cols, i0, j0, b, h, scale, partial, score_caps, mask_caps):
    """s_full[:n_rows, col0:col0 + n_cols] = q.k products of queries i0.., keys j0.. ->
    score_mod(scale * s), -inf where a partial block's mask_mod says no (columns unsigned, as above)."""
    for r in range(n_rows):
        i = i0 + r
        if partial:
            for c in range(n_cols):
                col = np.uint64(col0 + c)
                x = score_mod(s_full[r, col] * scale, b, h, i, j0 + c, score_caps)
                s_full[r, col] = x if mask_mod(b, h, i, j0 + c, mask_caps) else -np.inf
        else:
            for c in range(n_cols):
                col = np.uint64(col0 + c)
                s_full[r, col] = score_mod(s_full[r, col] * scale, b, h, i, j0 + c, score_caps)


@_jit(nogil=True)
def pack_worker(k, v, k_packed, v_packed, order, next_task, worker):
    """Take (batch, kv head) tasks from the queue: that head's K and V as the forward's B operands
    (kernels/cpu/operands.py: bf16 pairs, or K^T and V rows padded to 16 columns)."""
    while True:
        t = _claim(order, next_task)
        if t < 0:
            break
        _pack_forward_head(k, v, k_packed, v_packed, t)


@_jit(fastmath=_FASTMATH, nogil=True)
def forward_worker(
    q, k_packed, v_packed, nk, consts, score_caps, mask_caps, blocks, block_q, block_k, micro, order, next_task,
    out, lse, worker,
):  # fmt: skip
    """Take (batch, head, query block) tasks from the queue (order, next_task) until it is empty.

    q (B, Hq, Nq, D) and out (B, Hq, Nq, Dv) in the compute dtype or as bf16 bits (uint16), lse
    (B, Hq, Nq) in the compute dtype; k_packed and v_packed: nk keys from pack_worker. Products as the built-in forward's (_product): bf16 on the bf16
    path (AMX or VDPBF16PS; Q and P rounded to bf16) when the operands are uint16, float32 on the
    FMA micro-kernel when micro, else the BLAS. lse natural log, -inf (and out 0) for a row that
    sees no key.
    """
    _, hq, nq, d = q.shape
    hkv, dv = k_packed.shape[1], out.shape[3]
    group = hq // hkv
    n_qb = (nq + block_q - 1) // block_q
    scale, one, zero, log2e = consts[_SCALE], consts[_ONE], consts[_ZERO], consts[_LOG2E]
    # Under the identity score_mod (and a positive scale, which max commutes with) the scores stay
    # raw q.k products and running_max is kept in their units: exp2 multiplies by scale log2(e).
    raw = SCORE_MOD_IS_IDENTITY and scale > zero
    multiplier = scale * log2e if raw else log2e  # score units -> base-2 exponent
    unit = scale if raw else one  # score units -> natural-log units (the lse)
    real = lse.dtype  # the compute dtype (q may hold bf16 bits)
    operand = k_packed.dtype
    span = max(block_k, _FORWARD_SPAN // block_k * block_k)
    # rows padded to 16 columns for the micro-kernels, +1 key for bf16's even first key
    score_buf = np.empty(block_q * padded(span + 1, PAD), real)  # (Bq, Bk16) scores, then P
    acc = np.empty((block_q, padded(dv, PAD)), real)  # (Bq, Dv16) running numerator
    running_max = np.empty(block_q, real)  # (Bq,) in score units
    row_sum = np.empty(block_q, real)  # (Bq,)
    q_buf = np.empty(_scratch(block_q * padded(d, 2), k_packed), operand)  # bf16: the block's queries
    p_buf = np.empty(_scratch(block_q * padded(span + 2, 2), k_packed), operand)  # bf16: P
    unused_bits = np.empty((1, 1), np.uint16)  # float operands: P is its own operand
    round_p = _bf16_operand(p_buf)  # bf16 operands: P rounded in the exp2 pass (kernel log v33)
    blas_threads = set_threads_local(np.int32(1))  # this worker is one of the parallel threads already
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
        count = _block_count(blocks, b, h, qb)
        n = 0
        while n < count:
            j0, j1, partial, n = _key_span(blocks, b, h, qb, n, count, block_k, nk, span)
            if j1 == j0:
                continue
            first = _first_key(j0, k_packed)  # bf16: from an even key (the extra one hidden below)
            bk = j1 - first
            s_full = score_buf[: bq * padded(bk, PAD)].reshape((bq, padded(bk, PAD)))  # (Bq, Bk16)
            _product(q_rows, k_packed[b, hk, :, _key_offset(first, k_packed):], s_full, bq, bk, d, False, micro)
            s = s_full[:, :bk]  # (Bq, Bk): S = Q K^T
            if raw:
                if partial:
                    _masked_raw_scores(s_full, j0 - first, bq, j1 - j0, i0, j0, b, h, mask_caps)
            else:
                _modded_scores(s_full, j0 - first, bq, j1 - j0, i0, j0, b, h, scale, partial, score_caps, mask_caps)
            p_bits = _p_rows_buffer(p_buf, bq, bk, unused_bits)  # (Bq, Bk2) bf16 P, or unused
            for r in range(bq):
                if first < j0:
                    s[r, 0] = -np.inf
                new_max = row_max_at(s, r, running_max[r])
                if new_max == -np.inf:  # nothing visible in this row yet: P = 0, nothing to rescale
                    for c in range(bk):
                        s[r, c] = zero
                    if round_p:
                        for c in range(p_bits.shape[1]):
                            p_bits[r, c] = 0
                    continue
                if round_p:  # P = e^(score - max), vectorised; and rounded to bf16 in the same pass
                    total = _exp2_rounding_row(s, r, multiplier, new_max * multiplier, p_bits)
                else:
                    total = exp2_affine_at(s, r, multiplier, new_max * multiplier)
                # exp2(0) = 1 exactly: once a row's max settles, no libm call per row
                rescale = one if running_max[r] == new_max else math.exp2((running_max[r] - new_max) * multiplier)
                row_sum[r] = row_sum[r] * rescale + total
                running_max[r] = new_max
                if rescale != one:
                    for c in range(dv):
                        acc[r, c] *= rescale
            p_rows = _p_operand(s, s_full, p_buf, p_bits, round_p)  # itself, or rounded to bf16
            _product(p_rows, v_packed[b, hk, _key_row(first, k_packed):], acc, bq, dv, bk, True, micro)  # acc += P V
        for r in range(bq):
            if row_sum[r] == zero:  # the row sees no key: 0, never NaN
                for c in range(dv):
                    out[b, h, i0 + r, c] = _store(out, zero)
                lse[b, h, i0 + r] = -np.inf
            else:
                inv = one / row_sum[r]
                for c in range(dv):
                    out[b, h, i0 + r, c] = _store(out, acc[r, c] * inv)
                lse[b, h, i0 + r] = running_max[r] * unit + math.log(row_sum[r])
    set_threads_local(blas_threads)


@_jit(fastmath=_FASTMATH, nogil=True)
def backward_worker(
    q, k, v, out, dout, lse, dlse, consts, score_caps, mask_caps, blocks, block_q, block_k,
    micro, order, next_task, dq, dk, dv, grad_bufs, worker,
):  # fmt: skip
    """Take (batch, kv head) tasks from the queue: each owns dk[b, hk], dv[b, hk] and the dq rows of
    its query heads, so no two workers write the same place. Captured tensors' gradients go to this
    worker's slice grad_bufs[n][worker]. Five products per tile, as FlashAttention-2's backward, on
    the built-in backward's operands and products (bf16 pairs for bf16 inputs, P and dS rounded to
    bf16; float32 on the FMA micro-kernel when micro; else the BLAS). A task packs its head's K and
    V into this worker's buffers (operands.py: K^T and V^T for S and dP, K by rows for dQ; bf16 in
    pairs) and accumulates dK and dV transposed in this worker's (D or Dv, Nk + 16) buffers, in the
    compute dtype, then stores them: no call-sized copies (docs/kernel-log.md v39, v43).
    q, k, v, out, dout and the gradients: the compute dtype, or all bf16 bits (uint16).
    dlse (B, Hq, Nq) is the gradient reaching the lse (zeros when the lse was not used)."""
    _, hq, nq, d = q.shape
    hkv, nk, dv_dim = dk.shape[1], dk.shape[2], dv.shape[3]
    group = hq // hkv
    n_qb = (nq + block_q - 1) // block_q
    scale, zero, log2e = consts[_SCALE], consts[_ZERO], consts[_LOG2E]
    # P = exp2(scale log2(e) q.k - lse log2(e)), dS = P (dP - delta) scale; a hidden score's -inf
    # times a negative scale would be +inf, so only for a positive one
    raw_scores = SCORE_MOD_IS_IDENTITY and scale > zero
    real = consts.dtype
    operand = k.dtype  # bf16 bits, or the compute dtype
    k_packed, v_packed, k_rows = _backward_operand_buffers(nk, d, dv_dim, k)  # this task's head, packed
    dk_t = np.empty((d, nk + PAD), real)  # (D, Nk + 16) this task's dK^T
    dv_t = np.empty((dv_dim, nk + PAD), real)  # (Dv, Nk + 16) its dV^T
    bq_width = padded(block_q, 2)
    span = max(block_k, _BACKWARD_SPAN // block_k * block_k)
    tile = block_q * padded(span + 1, PAD)
    q_buf = np.empty((block_q, padded(d, 2)), operand)  # (Bq, D even) Q rows
    do_buf = np.empty((block_q, padded(dv_dim, 2)), operand)  # (Bq, Dv even) dO rows
    q_t = np.empty((d, bq_width), operand)  # (D, Bq even) Q^T
    do_t = np.empty((dv_dim, bq_width), operand)  # (Dv, Bq even) dO^T
    raw_buf = np.empty(1 if raw_scores else tile, real)  # (Bq, Bk) q.k products, for score_mod_vjp
    p_buf = np.empty(tile, real)  # (Bq, Bk16) P
    ds_buf = np.empty(tile, real)  # (Bq, Bk16) dP, then dS
    pairs_buf = np.empty(bq_width * padded(span + 1, PAD), operand)  # P as a B operand
    # dS as a B operand: bf16 makes both pair-packed operands at once; floats are their own
    ds_pairs_buf = np.empty(bq_width * padded(span + 1, PAD) if _bf16_operand(pairs_buf) else 1, operand)
    no_factors = np.empty((1, 1), real)  # neither dropout's nor softcap's: flex has its score_mod instead
    ds_rows = np.empty(block_q * padded(span + 2, 2), operand)  # (Bq, Bk even) dS as an A operand
    dq_acc = np.empty((block_q, padded(d, PAD)), real)  # (Bq, D16)
    delta = np.empty(block_q, real)  # (Bq,) rowsum(dO * O) - dlse
    blas_threads = set_threads_local(np.int32(1))
    while True:
        t = _claim(order, next_task)
        if t < 0:
            break
        b, hk = t // hkv, t % hkv
        _pack_operands(k[b, hk], v[b, hk], k_packed, v_packed, k_rows)
        dk_t[:, :] = zero
        dv_t[:, :] = zero
        for h in range(hk * group, hk * group + group):
            for qb in range(n_qb):
                i0 = qb * block_q
                i1 = min(i0 + block_q, nq)
                bq = i1 - i0
                _load_rows(q[b, h, i0:i1], q_buf)
                _load_rows(dout[b, h, i0:i1], do_buf)
                _load_transposed(q[b, h, i0:i1], q_t)
                _load_transposed(dout[b, h, i0:i1], do_t)
                for r in range(bq):
                    total = 0.0  # float64, from inputs that may be bf16 bits
                    for c in range(dv_dim):
                        total += _f64_of(dout[b, h, i0 + r, c]) * _f64_of(out[b, h, i0 + r, c])
                    delta[r] = total - dlse[b, h, i0 + r]  # d lse / d score is P: it joins dO.O
                dq_acc[:bq] = zero
                count = _block_count(blocks, b, h, qb)
                n = 0
                while n < count:
                    j0, j1, partial, n = _key_span(blocks, b, h, qb, n, count, block_k, nk, span)
                    if j1 == j0:
                        continue
                    first = _first_key(j0, k_packed)  # bf16: from an even key, the extra one hidden
                    skip = j0 - first
                    bk = j1 - first
                    bk16 = padded(bk, PAD)
                    p_full = p_buf[: bq * bk16].reshape((bq, bk16))
                    ds_full = ds_buf[: bq * bk16].reshape((bq, bk16))
                    p = p_full[:, :bk]
                    key_cols = _key_offset(first, k_packed)
                    _product(q_buf, k_packed[:, key_cols:], p_full, bq, bk, d, False, micro)  # S = Q K^T
                    if raw_scores:
                        multiplier = scale * log2e
                        if partial:
                            _masked_raw_scores(p_full, skip, bq, j1 - j0, i0, j0, b, h, mask_caps)
                    else:
                        multiplier = log2e
                        raw = raw_buf[: bq * bk].reshape((bq, bk))
                        for r in range(bq):  # the C buffers' rows, indexed: the slabs' run-time stride kept loops scalar
                            for c in range(bk):
                                raw[r, c] = p_full[r, c]
                        _modded_scores(p_full, skip, bq, j1 - j0, i0, j0, b, h, scale, partial, score_caps, mask_caps)
                    for r in range(bq):
                        row_lse = lse[b, h, i0 + r]
                        if row_lse == -np.inf or skip:
                            p[r, 0] = -np.inf  # the row sees no key; or the key before the block
                        if row_lse == -np.inf:
                            for c in range(bk):
                                p[r, c] = zero
                        else:
                            exp2_affine_at(p, r, multiplier, row_lse * log2e)  # P = e^(score - lse)
                    _dp_product(do_buf, v_packed[:, key_cols:], ds_full, bq, bk, dv_dim)  # dP = dO V^T
                    if raw_scores:  # dS = P (dP - delta) scale and the three operands, in one pass for bf16
                        p_rows, ds_as_b, ds_as_a = _gradient_operands(
                            p_full, ds_full, bq, bk, delta, scale, no_factors, False, no_factors, False,
                            pairs_buf, ds_pairs_buf, ds_rows)  # fmt: skip
                    else:
                        for r in range(bq):
                            for c in range(bk):
                                grad = p_full[r, c] * (ds_full[r, c] - delta[r])  # d loss / d modded score
                                if grad != zero:  # hidden or underflowed: nothing flows, to the score or the captures
                                    grad = score_mod_vjp(
                                        raw[r, c] * scale, b, h, i0 + r, first + c, score_caps, grad, grad_bufs, worker
                                    ) * scale
                                ds_full[r, c] = grad
                        p_rows, ds_as_b, ds_as_a = _tile_operands(p_full, ds_full, bq, bk, pairs_buf, ds_pairs_buf,
                                                                  ds_rows)  # fmt: skip
                    _product(do_t, p_rows, dv_t[:, first:], dv_dim, bk, bq, True, micro)  # dV^T += dO^T P
                    _product(q_t, ds_as_b, dk_t[:, first:], d, bk, bq, True, micro)  # dK^T += Q^T dS
                    _product(ds_as_a, k_rows[_key_row(first, k_packed):], dq_acc, bq, d, bk, True, micro)  # dQ += dS K
                for r in range(bq):
                    for c in range(d):
                        dq[b, h, i0 + r, c] = _store(dq, dq_acc[r, c])
        _store_transposed(dk_t, nk, dk, b, hk, 0)  # this task's dK and dV, untransposed
        _store_transposed(dv_t, nk, dv, b, hk, 0)
    set_threads_local(blas_threads)


@_jit(nogil=True)
def classify_worker(batch, heads, nq, nk, block_q, block_k, mask_caps, order, next_task, kinds, worker):
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
