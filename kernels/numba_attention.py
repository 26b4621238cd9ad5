"""Flash attention on the CPU with Numba: tiled online softmax, forward and backward.

Versions tried (fp32, B=1, H=8, D=64, N=4096 unless said; 2-core Xeon with
AVX-512, OpenBLAS via SciPy; GFLOP/s with torch SDPA timed alternately in the
same process, since this machine's speed drifts by up to 2x between runs):

  v1  per-tile np.dot into per-worker buffers, degree-6 exp2 polynomial with
      an exponent bit trick (0.3 ns/element, vectorised 8-wide), LPT static
      schedule of (batch, head, query block) tasks over prange workers, BLAS
      pinned to one thread. Forward 0.75-0.9x torch.
  v1a row max as `m = x if x > m else m`: not vectorised, 1.4 ns/element,
      slower than the exp itself. With 'nnan' on that loop: still 1.2 ns.
      8 independent lanes: 0.34 ns -> kept.
  v2  scale * log2(e) folded into exp2's FMA and the max taken on raw q.k
      (no separate scaling pass) when there is no softcap/mask and scale > 0:
      ~0.2 ns/element less -> kept.
  v3  worker bodies moved out of the parallel functions and np.argsort
      replaced by a counting sort: first compile 81 s -> ~48 s for both dtypes,
      forward and backward (LLVM re-optimises linked callees for each parallel
      entry; cached loads take < 1 s).
  v4  backward: one task per (batch, query head, query chunk) runs all five
      products per tile (S, dP, dV, dK, dQ) with dK/dV summed into per-task
      slots then reduced in a fixed order: 5 GEMMs per tile instead of the 7
      of a split dK/dV pass + dQ pass, and deterministic without atomics.
  Block sizes then: forward torch's (Q 256/64/32 by Nq, KV 512); backward
  64 x 128. Result: forward 0.55-0.81x torch, forward+backward 0.64-0.78x.
  The ceiling was OpenBLAS on these tile shapes: single-threaded sgemm with
  K = 64 at ~77-88 GFLOP/s.
  v5  tile products through Intel MKL (inside torch's libtorch_cpu, bound in
      cpu_blas.py): ~125-140 GFLOP/s on the same tiles in a Numba loop, one
      thread, against ~85-115 for OpenBLAS (reproduce with
      `python -m attnkit.bench.cpu_parts`: 1.22-1.37x, bench/results/cpu-parts.txt). With beta = 1 the dK, dV, dQ and
      P @ V products accumulate in place (no tile buffer, no add pass).
      Forward 0.72-1.0x torch (the machine drifted by 2x during the run).
  v6  row max and exp2 as explicit 16-wide LLVM vector code (simd.py): row
      max 0.34-0.43 -> 0.13 ns/score, exp2 + sum 0.62-0.70 -> 0.43 ns; exp2's
      rounding with llvm.rint instead of two conversions: -> 0.35 ns. (Rounding
      by adding and subtracting 1.5 * 2**23 was as fast but wrong: numba puts a
      fastmath caller's flags on its callees, and reassoc folded it away.)
  v7  only visible key columns of a causal / window edge tile are computed;
      forward blocks 128 x 512 (vs 256 x 512: 5-15% faster, half the masked
      diagonal work), backward 128 x 256 (0-8% over 64 x 128); the
      accumulator rescale skipped when a row's max did not move.
  v8  a work queue instead of the static LPT split: tasks heaviest first,
      each worker claiming the next one with an atomic add. On this shared
      2-core VM a core is often slowed for a while; a static split then waits
      for the slow half.
  v9  (2026-12-01) a call's results in one allocation (out + lse; dq + dk +
      dv): separate blocks were handed back to the system by glibc after
      every training step and faulted in again, ~1950 page faults per N=1024
      backward (H=8, D=64), 37 -> 24 ms in a loop through autograd. GQA
      backward tasks per (batch, kv head, chunk) looping over the group's
      query heads (dK/dV partials only when query rows are chunked), the
      partials in a workspace kept between calls: group 4, N=1024 backward
      41 -> 30 ms (torch 32-34). Softmax row passes inlined with four
      accumulators (simd.py): row max 0.105 -> 0.055 ns/score, exp2 0.30 ->
      0.27.
  v10 (2026-12-02) bf16 products on our own AVX-512 BF16 micro-kernel
      (kernels/microkernels.py; 363-424 GFLOP/s on one Zen 5 thread where MKL's bf16
      GEMM gave ~90, its generic path on AMD): bf16 inputs stay bf16 (K, V
      pair-packed once per call), P rounded to bf16 for P @ V; backward with
      dK/dV accumulated transposed in float32. Taking turns with torch SDPA bf16
      in one process: forward 2.6-4.1x, forward+backward 1.8-2.2x (first
      check; the record is in bench/results/cpu.md).
  v11 (2026-12-02) float32 forward products on attnkit's own AVX-512 FMA
      micro-kernel (the bf16 one's twin; 216 / 210 GFLOP/s at D=64 / 128 on
      one Zen 5 thread where MKL gave 89 / 91, `python -m
      attnkit.bench.cpu_parts`): K transposed once per call, V read in place.
      float32 forward 2.2-2.3x torch SDPA at N=2048-4096 in a first check, taking
      turns (the backward stays on MKL).
  v12 masks as data: key padding becomes per-(batch, head) key ranges (no
      mask read, padded blocks skipped); other masks a per-tile summary
      (hidden tiles skipped, visible ones unmasked). Decode (Nq <= 16): a GQA
      group's rows in one tile with S^T = K Q^T (K in place), keys split across
      cores, partials merged by lse (fp32 GQA 32/8 Nk=1024: 0.33x -> 1.22x
      torch). Calls of <= 2^18 multiply-adds per product on the calling thread.
  v13 the backward on the micro-kernels as well: one worker for every dtype
      (bf16 and float32 on the micro-kernels, float64 through the BLAS; operands
      picked by dtype; float32 backward 1.43-1.87x torch SDPA's in
      bench/results/cpu-fp32-fma); float32's dP = dO V^T stays on the
      BLAS: the micro-kernel's single FMA chain per element made dP - delta,
      which cancels when one key dominates a row, 3x less accurate than a
      float32 reference (Nk = 1, D = 64); delta in float64. The forward got
      the same treatment: one worker, operands by dtype (speed unchanged in a
      check against torch, taking turns, before and after the merge).
  v14 (2026-12-02) packed sequences: the schedules walk a segment table (batch
      entry, first query row, Nq, first key, Nk, causal offsets, diagonal), a
      dense call being one segment per batch entry, so a varlen call runs each
      sequence at its own (Nq, Nk) with no padded work; key segments start at
      multiples of 16 with 16 free positions between them (whole-vector
      stores, shared dK/dV slots). ALiBi in the tile scores. Packed causal
      prefill of 8 sequences (H8 D64 fp32) 1.83x the faster of torch SDPA per
      sequence and padded + mask; a bf16 decode step of 8 sequences in one
      cache (GQA 32/8 D128, the group folded into rows) 3.22x torch on the
      padded cache (`python -m attnkit.bench.flash_attn`,
      bench/results/flash-attn.txt).
  v15 (2026-12-02) every CPU: the micro-kernels are generated for the target
      Numba compiles for (kernels/target.py), never with an instruction it
      lacks (VDPBF16PS aborted the process on every CPU without AVX-512 BF16):
      float32 FMAs at the target's width (AVX-512, AVX2, NEON), bf16 on
      VDPBF16PS or widened to float32 as loaded, register blocks per target
      (bench/results/cpu-targets.md). The bf16 conversions of P and dS read
      the tile's contiguous rows, not a slice's (which did not vectorise):
      bf16 causal forward, N2048 D64, 140 -> 161 GFLOP/s on VDPBF16PS and
      145 -> 193 widened for an AVX-512F target (2 threads, Intel Xeon).
  Tried after v9, not kept (D=128 backward, N=4096, one process, taking
  turns): blocks 256 x 256, 256 x 128, 512 x 128 and a key-block-outer loop
  (a block's dK/dV stay in cache, dQ streams instead): all within +-4% of
  128 x 256, no consistent winner.
  Not done: skipping the max pass by exponentiating against the previous
  tile's max and redoing a row only when its max jumps (the max pass is now
  ~2% of the time at D = 64). What is left per score at D = 64, one thread:
  ~1.7-2.5 ns of GEMM, 0.05 ns max, 0.25-0.4 ns exp2 (`python -m
  attnkit.bench.cpu_parts`, a 2048-key loop).

Semantics follow attnkit.reference.attention exactly: score = scale * q.k,
then softcap * tanh(score / softcap), then + additive mask, then -inf for keys
that causal alignment, the window or a boolean mask hide. Rows that see no key
give out 0 and lse -inf, and zero gradients.

Scores are kept in base 2 (multiplied by log2(e)) so the exponential is exp2;
lse is converted back to natural log at the end.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import warnings

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic, overload

from .jit import jit as _jit
from .cpu_blas import matmul, set_threads_local, uses_process_threads
from .simd import exp2_affine, row_max
from .microkernels import F32_PRODUCTS, PAD, bf16_of, check_paths, bf16_to_f32, f32_to_bf16, gemm, gemm_f32, pack_pair_columns, pack_pairs, padded

__all__ = ["flash_forward", "flash_backward", "warmup"]

# fastmath=True would fold `x == -inf` to False; masked scores are -inf.
_FASTMATH = {"reassoc", "nsz", "arcp", "contract", "afn"}

# "No limit" for the visible key offsets; far from int64 overflow when added to an index.
_UNLIMITED = 1 << 60

# Feature flags passed to the kernels as one int.
_HAS_SOFTCAP = 1
_HAS_ADDITIVE_MASK = 2
_HAS_BOOL_MASK = 4
_HAS_ALIBI = 8

# Layout of the per-call constants array (in the input dtype, so that no
# float64 literal promotes float32 arithmetic).
_C_SCALE = 0  # scale
_C_SCALE_LOG2E = 1  # scale * log2(e)
_C_LOG2E = 2  # log2(e)
_C_SOFTCAP = 3  # softcap
_C_INV_SOFTCAP = 4  # 1 / softcap
_C_NEG_INF = 5  # -inf
_C_ZERO = 6  # 0
_C_ONE = 7  # 1
_N_CONSTANTS = 8


# ---------------------------------------------------------------------------
# Scores of one tile: raw q.k products -> masked scores in base 2.
# ---------------------------------------------------------------------------


@_jit(fastmath=_FASTMATH)
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
    pass needs (the forward passes False and a placeholder).

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
                row = s[r]  # (Bk,)
                for c in range(n_cols):
                    row[c] *= scale_log2e
    else:
        softcap = consts[_C_SOFTCAP]
        inv_softcap = consts[_C_INV_SOFTCAP]
        one = consts[_C_ONE]
        for r in range(n_rows):
            i = i0 + r
            row = s[r]  # (Bk,)
            if has_softcap and store_softcap_grad:
                grad_row = softcap_grad[r]  # (Bk,)
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
                am = additive_mask[
                    min(b, additive_mask.shape[0] - 1),
                    min(h, additive_mask.shape[1] - 1),
                    min(i, additive_mask.shape[2] - 1),
                ]  # (Nk,)
                for c in range(n_cols):
                    row[c] += am[j0 + c]
            if has_alibi:
                distance = i + diagonal - j0  # to column c: |distance - c|
                for c in range(n_cols):
                    row[c] -= slope * abs(distance - c)
            for c in range(n_cols):
                row[c] *= log2e
            if has_bool:
                bm = bool_mask[
                    min(b, bool_mask.shape[0] - 1),
                    min(h, bool_mask.shape[1] - 1),
                    min(i, bool_mask.shape[2] - 1),
                ]  # (Nk,)
                for c in range(n_cols):
                    row[c] = row[c] if bm[j0 + c] else neg_inf

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
            row = s[r]
            for c in range(first):
                row[c] = neg_inf
            for c in range(stop, n_cols):
                row[c] = neg_inf
    return multiplier


@_jit()
def _key_block_range(i0, i1, nk, lo_offset, hi_offset, block_k):
    """Key blocks [first, stop) that queries i0..i1-1 can see at all (causal/window)."""
    first_key = max(0, i0 + lo_offset)
    last_key = min(nk - 1, i1 - 1 + hi_offset)
    if first_key > last_key:
        return 0, 0
    return first_key // block_k, last_key // block_k + 1


# Tile states of a mask's summary (see _mask_plan): skip the tile, run it
# without reading the mask, or apply the mask element by element.
_TILE_HIDDEN = 0
_TILE_VISIBLE = 1
_TILE_MIXED = 2


@_jit()
def _task_keys(masks, b, h, i0, i1, nk, lo_offset, hi_offset, block_k):
    """(first, stop, key_start, key_stop): the key blocks rows i0..i1-1 of (b, h) can see
    (causal, window and key range), and that key range [key_start, key_stop)."""
    ranges = masks[2]  # (Bk, Hk, 2)
    key_range = ranges[min(b, ranges.shape[0] - 1), min(h, ranges.shape[1] - 1)]
    key_start, key_stop = max(0, key_range[0]), min(nk, key_range[1])
    first_key = max(key_start, i0 + lo_offset)
    last_key = min(key_stop - 1, i1 - 1 + hi_offset)
    if first_key > last_key:
        return 0, 0, key_start, key_stop
    return first_key // block_k, last_key // block_k + 1, key_start, key_stop


@_jit()
def _tile_flags(masks, flags, b, h, qb, kb):
    """The flags to run tile (qb, kb) of (b, h) with, or -1 when the mask hides all of it."""
    states = masks[3]  # (Bt, Ht, Tq, Tk)
    state = states[
        min(b, states.shape[0] - 1), min(h, states.shape[1] - 1),
        min(qb, states.shape[2] - 1), min(kb, states.shape[3] - 1),
    ]  # fmt: skip
    if state == _TILE_HIDDEN:
        return -1
    if state == _TILE_VISIBLE:
        return flags & ~(_HAS_BOOL_MASK | _HAS_ADDITIVE_MASK)
    return flags


@_jit()
def _heaviest_first(costs):
    """Task indices ordered by descending cost (ties by index), for the work queue.

    Costs are small integers (tile counts), so a counting sort orders them; it
    also compiles far faster than np.argsort.
    """
    n_tasks = costs.shape[0]
    max_cost = 0
    for t in range(n_tasks):
        max_cost = max(max_cost, costs[t])
    bucket_start = np.zeros(max_cost + 2, np.int64)  # tasks of cost c, heaviest first
    for t in range(n_tasks):
        bucket_start[max_cost - costs[t] + 1] += 1
    for c in range(1, max_cost + 2):
        bucket_start[c] += bucket_start[c - 1]
    order = np.empty(n_tasks, np.int64)
    for t in range(n_tasks):
        slot = max_cost - costs[t]
        order[bucket_start[slot]] = t
        bucket_start[slot] += 1
    return order


@intrinsic
def _fetch_add(typingctx, counter):
    """Atomically counter[0] += 1; returns the old value (counter: 1-D int64 array)."""
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64):
        return None

    def codegen(context, builder, signature, args):
        pointer = context.make_array(signature.args[0])(context, builder, args[0]).data
        return builder.atomic_rmw("add", pointer, ir.Constant(ir.IntType(64), 1), "monotonic")

    return types.int64(counter), codegen


@_jit()
def _claim(order, next_task):
    """The next task of the queue (order, shared counter next_task[0]), or -1 once it is empty."""
    claimed = _fetch_add(next_task)
    return order[claimed] if claimed < order.shape[0] else -1


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------


@_jit(fastmath=_FASTMATH)
def _online_softmax_step(s, multiplier, consts, running_max, running_sum, rescale, acc):
    """One key tile of the online softmax, rows in place.

    s (Bq, Bk) masked scores in base 2 (times `multiplier`) become P = exp2(score -
    new running max); running_max / running_sum (Bq,) move on; acc (Bq, Dv) rows
    are rescaled to the new max, ready for acc += P @ V.
    """
    neg_inf, zero, one = consts[_C_NEG_INF], consts[_C_ZERO], consts[_C_ONE]
    bq = s.shape[0]
    for r in range(bq):
        row = s[r]  # (Bk,)
        tile_max = row_max(row, neg_inf) * multiplier
        old_max = running_max[r]
        new_max = tile_max if tile_max > old_max else old_max
        # All seen keys invisible so far: shift by 0 so exp2(-inf) stays 0.
        shift = zero if new_max == neg_inf else new_max
        rescale[r] = math.exp2(old_max - shift)
        running_sum[r] = running_sum[r] * rescale[r] + exp2_affine(row, multiplier, shift)
        running_max[r] = new_max
    for r in range(bq):
        alpha = rescale[r]
        if alpha != one:  # after the first tiles the max rarely moves
            acc_row = acc[r]  # (Dv,)
            for c in range(acc_row.shape[0]):
                acc_row[c] *= alpha


@_jit(fastmath=_FASTMATH)
def _finish_rows(acc, running_max, running_sum, consts, out, lse):
    """out (Bq, Dv) = acc / running_sum (stored through _store: float, or bf16 bits), lse (Bq,) in natural log."""
    neg_inf, zero = consts[_C_NEG_INF], consts[_C_ZERO]
    ln2 = math.log(2.0)
    dv = out.shape[1]
    for r in range(out.shape[0]):
        total = running_sum[r]
        out_row = out[r]  # (Dv,)
        if total == zero:  # no visible key: exact zeros, lse -inf
            for c in range(dv):
                out_row[c] = _store(out_row, zero)
            lse[r] = neg_inf
        else:
            inv_total = consts[_C_ONE] / total
            for c in range(dv):
                out_row[c] = _store(out_row, acc[r, c] * inv_total)
            lse[r] = running_max[r] * ln2 + math.log(total)


def _store(array, value):
    """value converted for storing into `array`: bf16 bits when array is uint16, else unchanged."""


@overload(_store, jit_options={"inline": "always"})
def _store_overload(array, value):
    if array.dtype == types.uint16:
        return lambda array, value: f32_to_bf16(value)
    return lambda array, value: value


def _product(a, b, c, m, n, k, accumulate, micro):
    """c[:m, :n] (+)= a[:m, :k] @ b[:k, :n]: bf16 bits (b pair-packed) on the bf16
    micro-kernel; float32 on the FMA micro-kernel when micro (b and c padded to 16
    columns); else, and float64 always, through the BLAS."""


@_jit()
def _blas_product(a, b, c, m, n, k, accumulate):
    one = c.dtype.type(1)
    matmul(a[:m, :k], b[:k, :n], c[:m, :n], one, one if accumulate else c.dtype.type(0))


@overload(_product, jit_options={"inline": "always"})
def _product_overload(a, b, c, m, n, k, accumulate, micro):
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


def _pack_forward(k, v, k_packed, v_packed):
    """One (batch, kv head)'s keys and values as the B operands of the forward's products."""


@overload(_pack_forward)
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


@_jit()
def _pack_forward_head(k, v, k_packed, v_packed, t):
    """Task t = (batch, kv head) of the forward's packing."""
    hkv = k.shape[1]
    b, hk = t // hkv, t % hkv
    _pack_forward(k[b, hk], v[b, hk], k_packed[b, hk], v_packed[b, hk])


def _scratch(n, operand):
    """Elements of a conversion buffer: n for bf16 operands, 1 for float ones (never used)."""


@overload(_scratch, jit_options={"inline": "always"})
def _scratch_overload(n, operand):
    if operand.dtype == types.uint16:
        return lambda n, operand: n
    return lambda n, operand: 1


def _first_key(j0, operand):
    """j0, moved down to even for bf16 operands (their P V reads keys in pairs; the
    extra key is hidden from every row)."""


@overload(_first_key, jit_options={"inline": "always"})
def _first_key_overload(j0, operand):
    if operand.dtype == types.uint16:
        return lambda j0, operand: j0 - j0 % 2
    return lambda j0, operand: j0


@_jit(fastmath=_FASTMATH)
def _forward_worker(
    q, k_packed, v_packed, segments, tasks, masks, consts, flags, block_q, block_k, micro, order, next_task, out, lse,
):  # fmt: skip
    """Take (segment, head, query block) tasks from the queue until it is empty.

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
    batch, hq, _, d = q.shape
    hkv, dv = k_packed.shape[1], out.shape[3]
    group = hq // hkv
    neg_inf = consts[_C_NEG_INF]
    zero = consts[_C_ZERO]
    real = lse.dtype
    operand = k_packed.dtype
    alibi = masks[4]  # (S or 1, Hq or 1) slopes

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
    blas_threads = set_threads_local(1)  # this worker is one of the parallel threads already

    while True:
        t = _claim(order, next_task)
        if t < 0:
            break
        seg, h, qb = tasks[t, 0], tasks[t, 1], tasks[t, 2]
        b, qs, nq, ks, nk, lo_offset, hi_offset, diagonal = _segment(segments, seg)
        slope = alibi[min(seg, alibi.shape[0] - 1), min(h, alibi.shape[1] - 1)]
        hk = h // group
        i0 = qb * block_q
        i1 = min(i0 + block_q, nq)
        bq = i1 - i0
        q_blk = q[b, h, qs + i0 : qs + i1]  # (Bq, D)
        q_rows = _a_rows_of(q_blk, q_blk, q_buf)  # itself, or rounded to bf16
        for r in range(bq):
            running_max[r] = neg_inf
            running_sum[r] = zero
        acc[:bq] = zero

        first, stop, key_start, key_stop = _task_keys(masks, b, h, i0, i1, nk, lo_offset, hi_offset, block_k)
        for kb in range(first, stop):
            tile_flags = _tile_flags(masks, flags, b, h, qb, kb)
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
                masks[0], masks[1], slope, diagonal, False, unused_grad,
            )  # fmt: skip
            _online_softmax_step(s, multiplier, consts, running_max, running_sum, rescale, acc)
            p_rows = _a_rows_of(s, s_full, p_buf)  # itself, or rounded to bf16
            v_row = _key_row(ks + j0, k_packed)
            _product(p_rows, v_packed[b, hk, v_row:], acc, bq, dv, bk, True, micro)  # acc += P V
        _finish_rows(acc, running_max, running_sum, consts, out[b, h, qs + i0 : qs + i1], lse[b, h, qs + i0 : qs + i1])
    set_threads_local(blas_threads)


@_jit()
def _segment(segments, seg):
    """(b, qs, Nq, ks, Nk, lo, hi, diagonal) of segment seg (see _segment_table)."""
    row = segments[seg]
    return row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7]


@_jit()
def _forward_schedule(segments, hq, block_q, block_k):
    """(tasks (T, 3) of (segment, head, query block), their order heaviest first)."""
    n_tasks = 0
    for seg in range(segments.shape[0]):
        n_tasks += hq * ((segments[seg, 2] + block_q - 1) // block_q)
    tasks = np.empty((n_tasks, 3), np.int64)
    costs = np.empty(n_tasks, np.int64)  # visible key blocks per task
    t = 0
    for seg in range(segments.shape[0]):
        _, _, nq, _, nk, lo_offset, hi_offset, _ = _segment(segments, seg)
        for h in range(hq):
            for qb in range((nq + block_q - 1) // block_q):
                i0 = qb * block_q
                first, stop = _key_block_range(i0, min(i0 + block_q, nq), nk, lo_offset, hi_offset, block_k)
                tasks[t, 0], tasks[t, 1], tasks[t, 2] = seg, h, qb
                costs[t] = stop - first
                t += 1
    return tasks, _heaviest_first(costs)


# The parallel functions only fan the workers out: parfor compilation is slow,
# so everything else lives in plain njit functions.
@_jit(parallel=True)
def _forward_kernel(
    q, k, v, segments, masks, consts, flags, block_q, block_k, micro, n_workers, k_packed, v_packed, out, lse,
):  # fmt: skip
    for t in prange(k.shape[0] * k.shape[1]):
        _pack_forward_head(k, v, k_packed, v_packed, t)
    tasks, order = _forward_schedule(segments, q.shape[1], block_q, block_k)
    next_task = np.zeros(1, np.int64)
    for w in prange(n_workers):
        _forward_worker(
            q, k_packed, v_packed, segments, tasks, masks, consts, flags, block_q, block_k, micro,
            order, next_task, out, lse,
        )  # fmt: skip


@_jit()
def _forward_kernel_serial(
    q, k, v, segments, masks, consts, flags, block_q, block_k, micro, k_packed, v_packed, out, lse,
):  # fmt: skip
    """_forward_kernel on the calling thread alone: small calls start no thread pool."""
    for t in range(k.shape[0] * k.shape[1]):
        _pack_forward_head(k, v, k_packed, v_packed, t)
    tasks, order = _forward_schedule(segments, q.shape[1], block_q, block_k)
    next_task = np.zeros(1, np.int64)
    _forward_worker(
        q, k_packed, v_packed, segments, tasks, masks, consts, flags, block_q, block_k, micro,
        order, next_task, out, lse,
    )  # fmt: skip


# ---------------------------------------------------------------------------
# Decode: a few queries against many keys (flash-decoding)
# ---------------------------------------------------------------------------


@_jit(fastmath=_FASTMATH)
def _decode_worker(
    q, k, v_rows, masks, consts, lo_offset, hi_offset, flags, block_k, n_splits, micro,
    order, next_task, out, lse, part_out, part_lse,
):  # fmt: skip
    """Take (batch, kv head, key split) tasks: every query row of the GQA group at once.

    The group's Hq / Hkv heads times Nq rows form one tile of rows, so K and V are
    read once per group, and S^T = K_blk Q^T comes from the micro-kernel with the
    keys as its long side (K read in place, no packing). A task's key blocks are
    its split of the blocks any row can see; with n_splits > 1 its normalised
    partial output and lse go to part_out (S, B, Hq, Nq, Dv) / part_lse (S, B, Hq,
    Nq) for _merge_splits, else straight to out / lse.
    """
    batch, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], out.shape[3]
    group = hq // hkv
    rows = group * nq
    neg_inf = consts[_C_NEG_INF]
    zero = consts[_C_ZERO]
    dtype = q.dtype

    q_t = np.zeros((d, padded(rows, PAD)), dtype)  # (D, rows16) Q^T of the group
    st = np.empty((block_k, padded(rows, PAD)), dtype)  # (Bk, rows16) S^T
    score_buf = np.empty(rows * padded(block_k, PAD), dtype)  # (rows, Bk16) scores, then P
    acc = np.empty((rows, padded(dv, PAD)), dtype)  # (rows, Dv16)
    running_max = np.empty(rows, dtype)
    running_sum = np.empty(rows, dtype)
    rescale = np.empty(rows, dtype)
    unused_grad = np.empty((1, 1), dtype)

    while True:
        t = _claim(order, next_task)
        if t < 0:
            break
        split = t % n_splits
        hk = (t // n_splits) % hkv
        b = t // (n_splits * hkv)
        h0 = hk * group
        for g in range(group):
            for i in range(nq):
                for c in range(d):
                    q_t[c, g * nq + i] = q[b, h0 + g, i, c]
        # Key blocks: those any head of the group can see, cut into n_splits runs.
        first, stop = nk, 0
        for g in range(group):
            f, e, _, _ = _task_keys(masks, b, h0 + g, 0, nq, nk, lo_offset, hi_offset, block_k)
            if e > f:
                first, stop = min(first, f), max(stop, e)
        per_split = max(1, -(-(stop - first) // n_splits))
        first = first + split * per_split
        stop = min(stop, first + per_split)
        for r in range(rows):
            running_max[r] = neg_inf
            running_sum[r] = zero
        acc[:] = zero

        for kb in range(first, stop):
            j0 = kb * block_k
            j1 = min(j0 + block_k, nk)
            bk = j1 - j0
            _product(k[b, hk, j0:j1], q_t, st, bk, rows, d, False, micro)  # S^T = K_blk Q^T
            s_full = score_buf[: rows * padded(bk, PAD)].reshape((rows, padded(bk, PAD)))
            for j in range(bk):
                for r in range(rows):
                    s_full[r, j] = st[j, r]
            for g in range(group):
                slab = s_full[g * nq : (g + 1) * nq, :bk]  # (Nq, Bk) rows of head h0 + g
                _, _, key_start, key_stop = _task_keys(masks, b, h0 + g, 0, nq, nk, lo_offset, hi_offset, block_k)
                tile_flags = _tile_flags(masks, flags, b, h0 + g, 0, kb)
                if tile_flags < 0:
                    key_start = key_stop = j0  # hidden by the mask: no column visible
                    tile_flags = flags & ~(_HAS_BOOL_MASK | _HAS_ADDITIVE_MASK)
                multiplier = _tile_scores_base2(
                    slab, 0, j0, b, h0 + g, consts, lo_offset, hi_offset, key_start, key_stop, tile_flags,
                    masks[0], masks[1], zero, 0, False, unused_grad,
                )  # fmt: skip
                if multiplier != consts[_C_ONE]:  # raw products left scaled by the caller: scale them here
                    for r in range(nq):
                        for c in range(bk):
                            slab[r, c] *= multiplier
            _online_softmax_step(s_full[:, :bk], consts[_C_ONE], consts, running_max, running_sum, rescale, acc)
            _product(s_full, v_rows[b, hk, j0:], acc, rows, dv, bk, True, micro)  # acc += P V

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


@_jit()
def _merge_splits(part_out, part_lse, out, lse, t):
    """out / lse of (batch, head) t from the splits' normalised partials, weighted by exp(lse_s - lse)."""
    n_splits, batch, hq, nq, dv = part_out.shape
    b, h = t // hq, t % hq
    for i in range(nq):
        top = -np.inf
        for sp in range(n_splits):
            top = max(top, part_lse[sp, b, h, i])
        if top == -np.inf:  # no split saw a key: exact zeros, lse -inf
            out[b, h, i, :] = 0
            lse[b, h, i] = -np.inf
            continue
        total = 0.0
        for sp in range(n_splits):
            total += math.exp(part_lse[sp, b, h, i] - top)
        row_lse = top + math.log(total)
        out[b, h, i, :] = 0
        for sp in range(n_splits):
            weight = math.exp(part_lse[sp, b, h, i] - row_lse)
            if weight > 0:
                for c in range(dv):
                    out[b, h, i, c] += weight * part_out[sp, b, h, i, c]
        lse[b, h, i] = row_lse


@_jit(parallel=True)
def _decode_kernel(
    q, k, v_rows, masks, consts, lo_offset, hi_offset, flags, block_k, n_splits, micro, n_workers,
    out, lse, part_out, part_lse,
):  # fmt: skip
    n_tasks = k.shape[0] * k.shape[1] * n_splits
    order = np.arange(n_tasks)
    next_task = np.zeros(1, np.int64)
    for w in prange(n_workers):
        _decode_worker(
            q, k, v_rows, masks, consts, lo_offset, hi_offset, flags, block_k, n_splits, micro,
            order, next_task, out, lse, part_out, part_lse,
        )  # fmt: skip
    if n_splits > 1:
        for t in prange(q.shape[0] * q.shape[1]):
            _merge_splits(part_out, part_lse, out, lse, t)


# ---------------------------------------------------------------------------
# Operands of the micro-kernels (kernels/microkernels.py)
# ---------------------------------------------------------------------------


@_jit()
def _pack_keys(k, dst):
    """dst[p, 2 j + t] = k[j, 2 p + t]: k (Nk, D) as the B operand of Q @ K^T, pairs along D.

    dst (ceil(D / 2), >= 2 Nk); the columns past Nk and a missing last feature are 0.
    """
    nk, d = k.shape
    dst[:] = 0
    for j in range(nk):
        row = k[j]  # (D,)
        for p in range(d // 2):
            dst[p, 2 * j] = bf16_of(row[2 * p])
            dst[p, 2 * j + 1] = bf16_of(row[2 * p + 1])
        if d % 2:
            dst[d // 2, 2 * j] = bf16_of(row[d - 1])


def _operand_of(dst, value):
    """value as an element of the operand array dst: bf16 bits for uint16, float32 for float32."""


@overload(_operand_of, jit_options={"inline": "always"})
def _operand_of_overload(dst, value):
    if dst.dtype == types.uint16:
        return lambda dst, value: bf16_of(value)
    if dst.dtype == types.float64:
        return lambda dst, value: np.float64(value)
    return lambda dst, value: np.float32(_f32_of(value))


@_jit(fastmath=_FASTMATH)
def _load_rows(src, dst):
    """dst[:rows, :cols] = src as elements of dst's dtype (bf16 bits, float32 or float64); dst's padding = 0."""
    _load_row_prefixes(src, src.shape[1], dst)


@_jit(fastmath=_FASTMATH)
def _load_row_prefixes(src, cols, dst):
    """_load_rows of src[:, :cols]; pass a C-contiguous src (a slice's rows would not vectorise)."""
    rows = src.shape[0]
    for r in range(rows):
        s_row, d_row = src[r], dst[r]
        for c in range(cols):
            d_row[c] = _operand_of(d_row, s_row[c])
        for c in range(cols, d_row.shape[0]):
            d_row[c] = 0


# ---------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------


@_jit()
def _backward_schedule(segments, hkv, block_q, block_k, n_chunks):
    """(tasks (T, 3) of (segment, kv head, query chunk), their order heaviest first;
    every head of a group costs the same)."""
    n_tasks = segments.shape[0] * hkv * n_chunks
    tasks = np.empty((n_tasks, 3), np.int64)
    costs = np.zeros(n_tasks, np.int64)  # visible tiles per task
    t = 0
    for seg in range(segments.shape[0]):
        _, _, nq, _, nk, lo_offset, hi_offset, _ = _segment(segments, seg)
        n_qblocks = (nq + block_q - 1) // block_q
        blocks_per_chunk = (n_qblocks + n_chunks - 1) // n_chunks
        for hk in range(hkv):
            for chunk in range(n_chunks):
                tasks[t, 0], tasks[t, 1], tasks[t, 2] = seg, hk, chunk
                for qb in range(chunk * blocks_per_chunk, min(n_qblocks, (chunk + 1) * blocks_per_chunk)):
                    i0 = qb * block_q
                    first, stop = _key_block_range(i0, min(i0 + block_q, nq), nk, lo_offset, hi_offset, block_k)
                    costs[t] += stop - first
                t += 1
    return tasks, _heaviest_first(costs)


# ---------------------------------------------------------------------------
# Backward: the five products per tile, on the micro-kernels or the BLAS
# ---------------------------------------------------------------------------


def _f32_of(value):
    """A stored element as float32: bf16 bits (uint16) widened, floats converted."""


@overload(_f32_of, jit_options={"inline": "always"})
def _f32_of_overload(value):
    if value == types.uint16:
        return lambda value: bf16_to_f32(value)
    return lambda value: np.float32(value)


def _f64_of(value):
    """A stored element as float64, exactly: bf16 bits widened, float32 and float64 converted."""


@overload(_f64_of, jit_options={"inline": "always"})
def _f64_of_overload(value):
    if value == types.uint16:
        return lambda value: np.float64(bf16_to_f32(value))
    return lambda value: np.float64(value)


@_jit()
def _load_transposed(src, dst):
    """dst[c, r] = src[r, c] as elements of dst's dtype; dst (C, >= R) rows zero past R."""
    rows, cols = src.shape
    for c in range(cols):
        d_row = dst[c]
        for r in range(rows):
            d_row[r] = _operand_of(d_row, src[r, c])
        for r in range(rows, d_row.shape[0]):
            d_row[r] = 0


def _pack_operands(k, v, k_packed, v_packed, k_rows):
    """One (batch, kv head)'s keys and values as the B operands of the backward's products."""


@overload(_pack_operands)
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


@_jit()
def _pack_head_backward(k, v, k_packed, v_packed, k_rows, t):
    """Task t = (batch, kv head): _pack_operands for the backward's products."""
    hkv = k.shape[1]
    b, hk = t // hkv, t % hkv
    _pack_operands(k[b, hk], v[b, hk], k_packed[b, hk], v_packed[b, hk], k_rows[b, hk])


def _steps(n, operand):
    """Reduction steps of n elements for the micro-kernel of `operand`'s dtype (pairs for bf16)."""


@overload(_steps, jit_options={"inline": "always"})
def _steps_overload(n, operand):
    if operand.dtype == types.uint16:
        return lambda n, operand: (n + 1) // 2
    return lambda n, operand: n


def _dp_product(a, b, c, m, n, k):
    """dP = dO V^T. bf16 on the micro-kernel; float32 through the BLAS, whose blocked
    summation keeps dP - delta (which cancels when one key dominates a row) as
    accurate as a float32 reference; the micro-kernel's one long FMA chain per
    element left 3x its error (Nk = 1, D = 64)."""


@overload(_dp_product, jit_options={"inline": "always"})
def _dp_product_overload(a, b, c, m, n, k):
    if a.dtype == types.uint16:
        return lambda a, b, c, m, n, k: gemm(a, b, c, m, n, (k + 1) // 2, False)
    return lambda a, b, c, m, n, k: _blas_product(a, b, c, m, n, k, False)


def _b_rows_of(x, x_full, bk, buffer):
    """The (Bq, Bk) tile x as the B operand of a product over its rows (P or dS).

    bf16: packed in row pairs into buffer; float32: x_full itself (Bq, Bk16), its
    padding columns zeroed (they reach columns of other keys otherwise).
    """


@overload(_b_rows_of, jit_options={"inline": "always"})
def _b_rows_of_overload(x, x_full, bk, buffer):
    if buffer.dtype == types.uint16:

        def pairs(x, x_full, bk, buffer):
            rows = (x.shape[0] + 1) // 2
            packed = buffer[: rows * 2 * x_full.shape[1]].reshape((rows, 2 * x_full.shape[1]))
            pack_pair_columns(x_full, x.shape[1], packed)  # x_full's rows: contiguous
            return packed

        return pairs

    def itself(x, x_full, bk, buffer):
        x_full[:, bk:] = 0
        return x_full

    return itself


def _a_rows_of(x, x_full, buffer):
    """The (Bq, Bk) tile x as an A operand: bf16 rows (even width) in buffer, or x_full itself."""


@overload(_a_rows_of, jit_options={"inline": "always"})
def _a_rows_of_overload(x, x_full, buffer):
    if buffer.dtype == types.uint16:

        def converted(x, x_full, buffer):
            width = padded(x.shape[1], 2)
            rows = buffer[: x.shape[0] * width].reshape((x.shape[0], width))
            _load_row_prefixes(x_full, x.shape[1], rows)  # x_full's rows: contiguous
            return rows

        return converted
    return lambda x, x_full, buffer: x_full


def _key_offset(j0, operand):
    """Where key j0 starts along a packed operand: 2 j0 columns (bf16 pairs) or j0."""


@overload(_key_offset, jit_options={"inline": "always"})
def _key_offset_overload(j0, operand):
    if operand.dtype == types.uint16:
        return lambda j0, operand: 2 * j0
    return lambda j0, operand: j0


def _key_row(j0, operand):
    """The row of key j0 in k_rows: j0 // 2 (bf16 pairs of keys) or j0."""


@overload(_key_row, jit_options={"inline": "always"})
def _key_row_overload(j0, operand):
    if operand.dtype == types.uint16:
        return lambda j0, operand: j0 // 2
    return lambda j0, operand: j0


@_jit(fastmath=_FASTMATH)
def _backward_worker(
    q, k_packed, v_packed, k_rows, segments, tasks, masks, out, d_out, lse, consts,
    flags, block_q, block_k, n_chunks, micro, order, next_task, dq, dk_t, dv_t,
):  # fmt: skip
    """Take (segment, kv head, query chunk) tasks from the queue (as _forward_worker does).

    A task covers the chunk's query rows of every query head that reads its kv
    head (the GQA group): it writes their dq and adds its dK/dV to its own slot,
    hk * n_chunks + chunk, of dk_t / dv_t (deterministic, no atomics).
    Products: bf16 on the micro-kernel when the packed operands are uint16;
    float32 on the FMA micro-kernel when micro, else (and float64) through the
    BLAS. Accumulation in float32 (float64 for float64).

    dK and dV are accumulated transposed, dk_t (B, Hkv * n_chunks, D, Nk + 16) and
    dv_t (.., Dv, ..) in float32, one slot per task, so that every product reads
    its A operand by rows and its B operand by rows of the reduction axis:
    dV^T += dO^T P and dK^T += Q^T dS (P, dS in row pairs for bf16); dQ += dS K.
    Segments of one batch entry share its slots: each writes its own key columns
    (and up to 15 past them, zeros: _segment_table keeps 16 free between segments).
    """
    batch, hq, _, d = q.shape
    hkv = k_packed.shape[1]
    dv = out.shape[3]
    group = hq // hkv
    alibi = masks[4]  # (S or 1, Hq or 1) slopes
    operand = k_packed.dtype  # uint16 (bf16 bits) or float32
    q_width, dv_width, bq_width = padded(d, 2), padded(dv, 2), padded(block_q, 2)
    neg_inf = consts[_C_NEG_INF]
    zero = consts[_C_ZERO]
    log2e = consts[_C_LOG2E]
    scale = consts[_C_SCALE]
    has_softcap = (flags & _HAS_SOFTCAP) != 0
    real = dk_t.dtype  # float32, or float64 for float64
    tile = block_q * padded(block_k + 1, PAD)

    q_buf = np.empty((block_q, q_width), operand)  # (Bq, D even) Q rows
    do_buf = np.empty((block_q, dv_width), operand)  # (Bq, Dv even) dO rows
    q_t = np.empty((d, bq_width), operand)  # (D, Bq even) Q^T
    do_t = np.empty((dv, bq_width), operand)  # (Dv, Bq even) dO^T
    p_buf = np.empty(tile, real)  # (Bq, Bk16) scores, then P
    ds_buf = np.empty(tile, real)  # (Bq, Bk16) dP, then dS
    cap_buf = np.empty(tile if has_softcap else 1, real)  # (Bq, Bk) softcap factor
    pairs_buf = np.empty(bq_width * padded(block_k + 1, PAD), operand)  # P or dS as a B operand
    ds_rows = np.empty(block_q * padded(block_k + 2, 2), operand)  # (Bq, Bk even) dS as an A operand
    dq_acc = np.empty((block_q, padded(d, PAD)), real)  # (Bq, D16)
    lse2 = np.empty(block_q, real)
    delta = np.empty(block_q, real)
    blas_threads = set_threads_local(1)  # float32's dP goes through the BLAS, on this thread only

    while True:
        t = _claim(order, next_task)
        if t < 0:
            break
        seg, hk, chunk = tasks[t, 0], tasks[t, 1], tasks[t, 2]
        b, qs, nq, ks, nk, lo_offset, hi_offset, diagonal = _segment(segments, seg)
        n_qblocks = (nq + block_q - 1) // block_q
        blocks_per_chunk = (n_qblocks + n_chunks - 1) // n_chunks
        slot = hk * n_chunks + chunk
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
                masks, b, h, i0, i1, nk, lo_offset, hi_offset, block_k
            )
            for kb in range(first, stop):
                tile_flags = _tile_flags(masks, flags, b, h, qb, kb)
                if tile_flags < 0:
                    continue  # the mask hides every score of this tile
                j0 = max(kb * block_k, i0 + lo_offset, key_start)
                j0 -= j0 % 2  # bf16's dS K reads keys in pairs; the extra key is hidden from every row
                j1 = min(kb * block_k + block_k, key_stop, i1 + hi_offset)
                bk = j1 - j0
                bk16 = padded(bk, PAD)
                p_full = p_buf[: bq * bk16].reshape((bq, bk16))
                ds_full = ds_buf[: bq * bk16].reshape((bq, bk16))
                p, ds = p_full[:, :bk], ds_full[:, :bk]  # (Bq, Bk)
                cap_grad = cap_buf[: bq * bk].reshape((bq, bk)) if has_softcap else cap_buf.reshape((1, 1))
                key_cols = _key_offset(ks + j0, k_packed)
                _product(q_buf, k_packed[b, hk, :, key_cols:], p_full, bq, bk, d, False, micro)  # S = Q K^T
                multiplier = _tile_scores_base2(
                    p, i0, j0, b, h, consts, lo_offset, hi_offset, key_start, key_stop, tile_flags,
                    masks[0], masks[1], slope, diagonal, True, cap_grad,
                )  # fmt: skip
                for r in range(bq):
                    exp2_affine(p[r], multiplier, lse2[r])
                _dp_product(do_buf, v_packed[b, hk, :, key_cols:], ds_full, bq, bk, dv)  # dP = dO V^T
                for r in range(bq):
                    row_delta = delta[r]
                    if has_softcap:
                        for c in range(bk):
                            ds[r, c] = p[r, c] * (ds[r, c] - row_delta) * cap_grad[r, c]
                    else:
                        for c in range(bk):
                            ds[r, c] = p[r, c] * (ds[r, c] - row_delta) * scale

                p_rows = _b_rows_of(p, p_full, bk, pairs_buf)
                _product(do_t, p_rows, dv_t[b, slot, :, ks + j0 :], dv, bk, bq, True, micro)  # dV^T += dO^T P
                ds_as_b = _b_rows_of(ds, ds_full, bk, pairs_buf)
                _product(q_t, ds_as_b, dk_t[b, slot, :, ks + j0 :], d, bk, bq, True, micro)  # dK^T += Q^T dS
                ds_as_a = _a_rows_of(ds, ds_full, ds_rows)
                k_row = _key_row(ks + j0, k_packed)
                _product(ds_as_a, k_rows[b, hk, k_row:], dq_acc, bq, d, bk, True, micro)  # dQ += dS K
            dq_blk = dq[b, h, rows]  # (Bq, D)
            for r in range(bq):
                for c in range(d):
                    dq_blk[r, c] = _store(dq_blk[r], dq_acc[r, c])
    set_threads_local(blas_threads)


@_jit()
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
            dst[j, c] = _store(dst[j], total)


@_jit(parallel=True)
def _backward_kernel(
    q, k, v, segments, masks, out, d_out, lse, consts, flags,
    block_q, block_k, n_chunks, micro, n_workers, k_packed, v_packed, k_rows, dq, dk_t, dv_t, dk, dv_grad,
):  # fmt: skip
    """dq, dk, dv (input dtype) through transposed partials dk_t / dv_t (zero on entry;
    float32, float64 for float64)."""
    n_heads = k.shape[0] * k.shape[1]
    for t in prange(n_heads):
        _pack_head_backward(k, v, k_packed, v_packed, k_rows, t)
    tasks, order = _backward_schedule(segments, k.shape[1], block_q, block_k, n_chunks)
    next_task = np.zeros(1, np.int64)
    for w in prange(n_workers):
        _backward_worker(
            q, k_packed, v_packed, k_rows, segments, tasks, masks, out, d_out, lse, consts,
            flags, block_q, block_k, n_chunks, micro, order, next_task, dq, dk_t, dv_t,
        )  # fmt: skip
    for t in prange(n_heads):
        _finish_kv_grad(dk_t, n_chunks, dk, t)
        _finish_kv_grad(dv_t, n_chunks, dv_grad, t)


# ---------------------------------------------------------------------------
# Python entry points
# ---------------------------------------------------------------------------

# Concurrent calls are serialised: numba's workqueue layer aborts on concurrent
# parallel calls, and OpenBLAS's thread limit is process-wide state.
_CALL_LOCK = threading.Lock()
_NOTHING_TO_PIN = contextlib.nullcontext()  # reusable: entering it does nothing
_THREADPOOL_CONTROLLER = None


def _single_threaded_blas():
    """Context manager pinning the BLAS to one thread (each worker calls it already in parallel).

    MKL is pinned per worker thread inside the kernels (cpu_blas.set_threads_local);
    OpenBLAS only has a process-wide setting, set here through threadpoolctl.
    """
    global _THREADPOOL_CONTROLLER
    if not uses_process_threads():
        return _NOTHING_TO_PIN
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        return _NOTHING_TO_PIN
    if _THREADPOOL_CONTROLLER is None:
        _THREADPOOL_CONTROLLER = ThreadpoolController()
    return _THREADPOOL_CONTROLLER.limit(limits=1, user_api="blas")


def _block_sizes(nq, nk):
    """(query block, key block) of the forward pass.

    torch's CPU kernel uses 256 x 512; 128 x 512 measured 5-15% faster here
    (half the masked work on causal diagonal tiles, same GEMM rate).
    """
    block_q = 128 if nq >= 512 else 64 if nq >= 128 else 32
    block_k = 512
    return block_q, max(1, min(block_k, nk))


def _backward_block_sizes(nq, nk):
    """(query block, key block) for the backward pass (128 x 256 measured 0-8% ahead of 64 x 128)."""
    block_q = 128 if nq >= 256 else 64 if nq >= 64 else 32
    block_k = 256
    return block_q, max(1, min(block_k, nk))


def _visible_offsets(nq, nk, causal, window):
    """(lo, hi): query i sees key j iff lo <= j - i <= hi (causal alignment + window)."""
    offset = nk - nq if causal == "bottom_right" else 0
    lo, hi = -_UNLIMITED, _UNLIMITED
    if causal is not None:
        hi = offset
    if window is not None:
        left, right = window
        if left is not None:
            lo = offset - int(left)
        if right is not None:
            hi = min(hi, offset + int(right))
    # Python ints of any size -> int64 range the kernels can add indices to.
    return max(-_UNLIMITED, min(_UNLIMITED, lo)), max(-_UNLIMITED, min(_UNLIMITED, hi))


@functools.lru_cache(maxsize=256)
def _constants(dtype, scale, softcap):
    """The per-call constants array (cached: the kernels only read it)."""
    return _make_constants(dtype, scale, softcap)


def _make_constants(dtype, scale, softcap):
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
    return consts


def _kernel_array(x, dtype):
    """C-contiguous, writeable, native-order array of dtype (one compiled signature per dtype)."""
    x = np.asarray(x)
    if x.dtype != dtype or not x.flags.c_contiguous or not x.flags.writeable:
        x = np.array(x, dtype=dtype, order="C", copy=True)
    return x


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
    offset = nk - nq if align == "bottom_right" else np.zeros_like(nk)
    lo = np.full(len(segments), -_UNLIMITED, np.int64)
    hi = np.full(len(segments), _UNLIMITED, np.int64)
    if causal:
        hi = offset
    if window is not None:
        left, right = window
        if left is not None:
            lo = np.maximum(-_UNLIMITED, offset - min(int(left), _UNLIMITED))
        if right is not None:
            hi = np.minimum(hi, offset + min(int(right), _UNLIMITED))
    return np.ascontiguousarray(np.column_stack([b, qs, nq, ks, nk, lo, hi, offset]).astype(np.int64))


def _mask_plan(mask, dtype, nk, block_q, block_k):
    """(masks, flags) for the kernels: masks = (bool mask, additive mask, key ranges, tile states).

    Masks are data, not work, so a mask is summarised once per call:
    - a boolean mask that is the same for every query (key padding: (B, 1, 1, Nk),
      or rows all equal) whose visible keys form one run per (batch, head)
      becomes key ranges; the kernel then never reads it, and skips every key
      block outside the range;
    - any other mask gets tile states (_tile_summary) for the kernel's block
      grid: hidden tiles are skipped, visible ones run unmasked, mixed ones
      read the mask score by score.
    Unused parts are (1, ...)-shaped placeholders.
    """
    no_bool, no_additive, full_range, all_visible = _no_mask(np.dtype(dtype), nk)
    if mask is None:
        return (no_bool, no_additive, full_range, all_visible), 0
    if mask.dtype == np.bool_:
        if mask.shape[2] > 1 and np.array_equal(mask, np.broadcast_to(mask[:, :, :1], mask.shape)):
            mask = mask[:, :, :1]  # the same for every query: key padding
        if mask.shape[2] == 1:
            ranges = _key_ranges(mask[:, :, 0])
            if ranges is not None:
                return (no_bool, no_additive, ranges, all_visible), 0
        states = _tile_summary(mask, ~mask, block_q, block_k)
        return (_kernel_array(mask, np.bool_), no_additive, full_range, states), _HAS_BOOL_MASK
    mask = _kernel_array(mask, dtype)
    states = _tile_summary(mask == 0, mask == -np.inf, block_q, block_k)
    return (no_bool, mask, full_range, states), _HAS_ADDITIVE_MASK


def _prepare(q, k, v, scale, causal, window, softcap, bf16_products, segments, align, alibi):
    """(dtype of the results, compute dtype, q, k, v, flags, constants, segment table, masks
    tuple's ALiBi entry) for a kernel call.

    bf16 products take bf16 bits (uint16) as they are and float32 otherwise; the
    float kernels take float32 or float64.
    """
    if bf16_products:
        dtype = np.dtype(np.uint16 if np.dtype(q.dtype) == np.uint16 else np.float32)
        compute = np.dtype(np.float32)
    else:
        dtype = compute = np.dtype(np.float64 if np.dtype(q.dtype) == np.float64 else np.float32)
    q, k, v = (_kernel_array(x, dtype) for x in (q, k, v))
    flags = _HAS_SOFTCAP if softcap is not None else 0
    if segments is None:
        lo, hi = _visible_offsets(q.shape[2], k.shape[2], causal, window)
        diagonal = k.shape[2] - q.shape[2] if causal == "bottom_right" else 0
        table = _dense_segments(q.shape[0], q.shape[2], k.shape[2], lo, hi, diagonal)
    else:
        if align is None:
            align = "bottom_right" if causal == "bottom_right" else "top_left"
        table = _segment_table(segments, causal is not None, align, window, q.shape[2], k.shape[2])
    alibi_entry = _no_alibi(compute) if alibi is None else _kernel_array(alibi, compute)
    if alibi is not None:
        flags |= _HAS_ALIBI
    return dtype, compute, q, k, v, flags, _constants(compute, scale, softcap), table, alibi_entry


def _segment_sizes(table, segments, nq, nk):
    """(longest Nq, longest Nk, sum of Nq * Nk) over the segments; a dense call's from its
    shape (small calls feel every microsecond of NumPy reductions)."""
    if segments is None:
        return nq, nk, table.shape[0] * nq * nk
    return int(table[:, 2].max(initial=0)), int(table[:, 4].max(initial=0)), int(np.dot(table[:, 2], table[:, 4]))


# Calls with at most this many multiply-adds per product (B * Hq * Nq * Nk * D,
# ~0.5 MFLOP in all) run on the calling thread: waking the worker threads costs
# more than such a call's work.
_SERIAL_WORK = 1 << 17

# Arrays handed to a kernel start on a 64-byte boundary (a cache line, one AVX-512 vector).
_ALIGN_BYTES = 64

# The backward pass splits query rows into chunks until there are this many
# tasks (when batch x kv heads is smaller), for the work queue to balance.
_MIN_BACKWARD_TASKS = 8


@functools.lru_cache(maxsize=256)
def _packed_layout(dtype, shapes):
    """(first element of each array, elements in all) for arrays packed one after another.

    Each start is a multiple of 64 bytes from the first; the block needs one
    alignment step more, for _packed_views to find a 64-byte boundary in it.
    """
    align = max(1, _ALIGN_BYTES // dtype.itemsize)
    starts, total = [], 0
    for shape in shapes:
        starts.append(total)
        total += -(-math.prod(shape) // align) * align
    return starts, total + align


def _packed_views(block, shapes, starts):
    address = block.__array_interface__["data"][0]  # (.ctypes.data costs ~3 µs a call)
    skip = (-address % _ALIGN_BYTES) // block.itemsize  # to the first aligned element
    return tuple(
        block[skip + start : skip + start + math.prod(shape)].reshape(shape)
        for start, shape in zip(starts, shapes)
    )


def _arrays_together(dtype, shapes, zero):
    """Arrays of the given shapes as views into one allocation (zeroed if zero).

    Why one block: glibc serves a large allocation from the heap once a block
    of that size has been freed, but gives the top of the heap back to the
    system when more than twice that size is free there. Three separate
    gradients freed together always crossed that line, so every backward call
    of a training loop faulted ~8 MiB of fresh pages in at N = 1024 (~1950
    page faults per call, a third of its time on this VM); one block is reused
    in place.
    """
    dtype = np.dtype(dtype)
    starts, total = _packed_layout(dtype, shapes)
    return _packed_views((np.zeros if zero else np.empty)(total, dtype), shapes, starts)


class _Workspace:
    """Temporaries for one call at a time (the caller holds _CALL_LOCK), kept between calls.

    One request per call: every request hands out the same memory.

    Temporaries freed at the end of every call are faulted in again by the next
    one (see _arrays_together); kept, their pages stay mapped. A request larger
    than keep_bytes gets fresh memory that is not kept: there the call's O(N^2)
    work dwarfs the O(N) page faults, and holding on to it would surprise.
    """

    def __init__(self, keep_bytes):
        self.keep_bytes = keep_bytes
        self.buffer = np.empty(0, np.uint8)

    def arrays(self, dtype, shapes, zero):
        """Arrays of the given shapes (zeroed if zero) in the kept memory."""
        dtype = np.dtype(dtype)
        starts, total = _packed_layout(dtype, shapes)
        if total * dtype.itemsize > self.keep_bytes:
            return _arrays_together(dtype, shapes, zero=zero)
        if self.buffer.nbytes < total * dtype.itemsize:
            self.buffer = np.empty(total * dtype.itemsize, np.uint8)
        block = self.buffer[: total * dtype.itemsize].view(dtype)
        if zero:
            block.fill(0)
        return _packed_views(block, shapes, starts)

    def zeroed(self, dtype, shapes):
        return self.arrays(dtype, shapes, zero=True)


_WORKSPACE = _Workspace(keep_bytes=32 << 20)


def flash_forward(
    q, k, v, mask, *, scale, causal, window, softcap, bf16_products=False, segments=None, align=None, alibi=None,
    f32_products=None,
):  # fmt: skip
    """Attention output and natural-log lse.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv), all float32, all
    float64, or all bf16 bits (uint16); mask None or (Bm, Hm, Mq, Nk) bool /
    additive, broadcast by index. Returns out (B, Hq, Nq, Dv) in the input dtype
    and lse (B, Hq, Nq) in float32 (float64 for float64 input).

    bf16 input runs its products in bf16 with float32 accumulation (P rounded to
    bf16 for P @ V); so does float32 input with bf16_products=True (torch's
    "medium" matmul precision), its output staying float32.

    segments: None (every batch entry is one sequence), or (S, 5) rows (b, qs,
    Nq_s, ks, Nk_s) for packed sequences (varlen; see _segment_table): segment s
    is rows [qs, qs + Nq_s) of batch entry b against its keys [ks, ks + Nk_s),
    causal / window aligned per segment by `align` ("top_left", "bottom_right";
    default from causal), and nothing else is computed (rows of no segment are
    left 0, lse -inf). alibi: None or slopes (S or 1, Hq or 1) (a batch entry
    is a segment when segments is None): scores get -slope * |i + diagonal - j|,
    diagonal = Nk - Nq when aligned bottom-right, else 0. f32_products: "fma" or
    "blas" for float32's products (default: F32_PRODUCTS, the machine's choice).
    """
    check_paths()
    bf16 = bf16_products or np.dtype(q.dtype) == np.uint16
    dtype, compute, q, k, v, flags, consts, table, alibi = _prepare(
        q, k, v, scale, causal, window, softcap, bf16, segments, align, alibi)
    batch, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    if bf16:  # out in bf16 bits (or float32), lse in float32: two allocations
        out, lse = np.empty((batch, hq, nq, dv), dtype), np.empty((batch, hq, nq), compute)
    else:
        out, lse = _arrays_together(dtype, ((batch, hq, nq, dv), (batch, hq, nq)), zero=False)
    if out.size == 0 and lse.size == 0:
        return out, lse
    if nk == 0 or segments is not None:  # rows no key reaches (or no segment holds): 0 and -inf
        out.fill(0)
        lse.fill(-np.inf)
        if nk == 0:
            return out, lse
    longest_q, longest_k, work = _segment_sizes(table, segments, nq, nk)
    block_q, block_k = _block_sizes(longest_q, longest_k)
    masks, mask_flags = _mask_plan(mask, compute, nk, block_q, block_k)
    masks, flags = masks + (alibi,), flags | mask_flags
    n_workers = numba.get_num_threads()
    micro = dtype == np.float32 and (f32_products or F32_PRODUCTS) == "fma"
    v_width = dv if dv % PAD == 0 else padded(dv, PAD)
    dense = segments is None and not flags & _HAS_ALIBI
    if dense and not bf16 and _is_decode(nq, nk, hq // hkv) and v_width == dv:
        lo, hi = int(table[0, 5]), int(table[0, 6])
        return _decode(q, k, v, masks, consts, lo, hi, flags, micro, n_workers, out, lse)
    if bf16:  # pairs along the features (Q K^T) and along the keys (P V)
        operand, operand_shapes = np.uint16, (
            (batch, hkv, (d + 1) // 2, 2 * (nk + PAD)), (batch, hkv, (nk + 1) // 2, 2 * padded(dv, PAD)))
    else:  # K^T, and V with rows of a whole number of vectors (V itself when Dv already is)
        operand, operand_shapes = dtype, (
            (batch, hkv, d, nk + PAD), (batch, hkv, nk, v_width) if v_width != dv else (1, 1, 1, 1))
    serial = hq * d * work <= _SERIAL_WORK
    with _CALL_LOCK, _single_threaded_blas():
        k_packed, v_packed = _WORKSPACE.arrays(operand, operand_shapes, zero=False)
        if not bf16 and v_width == dv:
            v_packed = v  # read V in place
        if serial:
            _forward_kernel_serial(
                q, k, v, table, masks, consts, flags, block_q, block_k, micro, k_packed, v_packed, out, lse
            )
        else:
            _forward_kernel(
                q, k, v, table, masks, consts, flags, block_q, block_k, micro, n_workers, k_packed, v_packed,
                out, lse,
            )  # fmt: skip
    return out, lse


# Decode (flash-decoding): at most this many query rows per head, against at
# least _DECODE_MIN_KEYS keys, and at most 128 rows per GQA group in one tile.
_DECODE_MAX_QUERIES = 16
_DECODE_MIN_KEYS = 256
_DECODE_BLOCK_K = 512


def _is_decode(nq, nk, group):
    return nq <= _DECODE_MAX_QUERIES and nk >= _DECODE_MIN_KEYS and group * nq <= 128


def _decode(q, k, v, masks, consts, lo, hi, flags, micro, n_workers, out, lse):
    """The decode kernel: keys split across cores when there are fewer (batch, kv head)
    pairs than twice the workers, partials merged by lse."""
    batch, hq, nq, _ = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    key_blocks = -(-nk // _DECODE_BLOCK_K)
    n_splits = max(1, min(key_blocks, -(-2 * n_workers // (batch * hkv))))
    with _CALL_LOCK, _single_threaded_blas():
        part_out, part_lse = _WORKSPACE.zeroed(
            out.dtype, ((n_splits, batch, hq, nq, dv), (n_splits, batch, hq, nq)) if n_splits > 1
            else ((1, 1, 1, 1, 1), (1, 1, 1, 1)),
        )  # fmt: skip
        _decode_kernel(
            q, k, v, masks, consts, lo, hi, flags, min(_DECODE_BLOCK_K, nk), n_splits, micro, n_workers,
            out, lse, part_out, part_lse,
        )  # fmt: skip
    return out, lse


def _backward_chunks(batch, hkv, nq, block_q):
    """Query chunks per (batch, kv head): more than one only when there are few pairs,
    so that every core has work; depends on the shape alone (same bits every run)."""
    n_qblocks = (nq + block_q - 1) // block_q
    return max(1, min(n_qblocks, -(-_MIN_BACKWARD_TASKS // (batch * hkv))))


def flash_backward(
    q, k, v, mask, out, d_out, lse, *, scale, causal, window, softcap, bf16_products=False,
    segments=None, align=None, alibi=None,
):  # fmt: skip
    """Gradients (dq, dk, dv) of flash_forward, shaped and typed like q, k, v.

    FlashAttention-2 style: probabilities recomputed from lse, delta = rowsum(dO * O).
    Deterministic: every accumulation has a fixed order. bf16 bits (uint16) and
    bf16_products run the five products in bf16 with float32 accumulation, as
    flash_forward does. segments, align and alibi as for flash_forward; rows and
    keys outside every segment get zero gradients.
    """
    check_paths()
    bf16 = bf16_products or np.dtype(q.dtype) == np.uint16
    dtype, compute, q, k, v, flags, consts, table, alibi = _prepare(
        q, k, v, scale, causal, window, softcap, bf16, segments, align, alibi)
    out, d_out = (_kernel_array(x, dtype) for x in (out, d_out))
    lse = _kernel_array(lse, compute)
    batch, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    dq, dk, dv_grad = _arrays_together(dtype, (q.shape, k.shape, v.shape), zero=True)
    if nq == 0 or nk == 0 or batch * hq == 0:
        return dq, dk, dv_grad
    longest_q, longest_k, _ = _segment_sizes(table, segments, nq, nk)
    block_q, block_k = _backward_block_sizes(longest_q, longest_k)
    masks, mask_flags = _mask_plan(mask, compute, nk, block_q, block_k)
    masks, flags = masks + (alibi,), flags | mask_flags
    n_chunks = _backward_chunks(len(table), hkv, longest_q, block_q)
    n_workers = numba.get_num_threads()
    micro = dtype == np.float32 and F32_PRODUCTS == "fma"
    if bf16:  # pairs along the features (S, dP) and along the keys (dQ)
        operand_shapes = ((batch, hkv, (d + 1) // 2, 2 * (nk + PAD)),
                          (batch, hkv, (dv + 1) // 2, 2 * (nk + PAD)),
                          (batch, hkv, (nk + 1) // 2, 2 * padded(d, PAD)))  # fmt: skip
    else:  # K^T, V^T and K with rows of a whole number of vectors
        operand_shapes = ((batch, hkv, d, nk + PAD), (batch, hkv, dv, nk + PAD),
                          (batch, hkv, nk, padded(d, PAD)))  # fmt: skip
    partial_shapes = ((batch, hkv * n_chunks, d, nk + PAD), (batch, hkv * n_chunks, dv, nk + PAD))
    with _CALL_LOCK, _single_threaded_blas():
        if bf16:  # uint16 operands apart from the float32 partials
            k_packed, v_packed, k_rows = _arrays_together(np.uint16, operand_shapes, zero=False)
            dk_t, dv_t = _WORKSPACE.zeroed(compute, partial_shapes)
        else:  # one kept block, so a training loop faults no fresh pages in
            dk_t, dv_t, k_packed, v_packed, k_rows = _WORKSPACE.zeroed(compute, partial_shapes + operand_shapes)
        _backward_kernel(
            q, k, v, table, masks, out, d_out, lse, consts, flags, block_q, block_k, n_chunks, micro,
            n_workers, k_packed, v_packed, k_rows, dq, dk_t, dv_t, dk, dv_grad,
        )  # fmt: skip
    return dq, dk, dv_grad


def warmup():
    """Compile (or load from cache) forward and backward for float32 and float64, and the
    bf16 products where bf16 stays bf16 (bf16 bits; float32 under "medium" on VDPBF16PS)."""
    from .microkernels import BF16_DOT, BF16_PRODUCTS, bf16_bits

    rng = np.random.default_rng(0)
    variants = [(np.float32, False), (np.float64, False)]
    if BF16_PRODUCTS != "fp32":
        variants += [(np.uint16, True)]
    if BF16_DOT:
        variants += [(np.float32, True)]
    for dtype, bf16_products in variants:
        q, k, v = (rng.standard_normal(shape) for shape in ((1, 2, 3, 4), (1, 1, 5, 4), (1, 1, 5, 4)))
        q, k, v = (bf16_bits(x) if dtype == np.uint16 else x.astype(dtype) for x in (q, k, v))
        options = dict(scale=0.5, causal=None, window=None, softcap=None, bf16_products=bf16_products)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", numba.NumbaWarning)
            out, lse = flash_forward(q, k, v, None, **options)
            flash_backward(q, k, v, None, out, np.ones_like(out), lse, **options)
