"""Flash attention on the CPU with Numba: tiled online softmax, forward and backward.

The code, by concern (kernels/cpu/): constants.py (flags, per-call
constants), tile.py (one tile's scores and the online softmax), schedule.py
(tasks heaviest first, the work queue), operands.py (packing K / V, products by
dtype), forward.py, decode.py, backward.py (the workers), plan.py (host-side
planning), memory.py (allocations, workspace, BLAS pinning). This file holds
the entry points: flash_forward, flash_backward, warmup (kernels/warmup.py), and two documented
ways to look inside a call (for tests and diagnostics): plan_mask (how a mask
will be read) and recording (which worker ran, on which arrays). What each
version changed and measured: docs/kernel-log.md.

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
from dataclasses import dataclass

import numpy as np

from .jit import announce_as
from .microkernels import F32_PRODUCTS, PAD, check_paths, padded
from .cpu_blas import uses_process_threads
from .cpu.backward import _backward_kernel, backward_steps
from .cpu.constants import (
    _HAS_ADDITIVE_MASK, _HAS_ALIBI, _HAS_BOOL_MASK, _HAS_DROPOUT, _HAS_SINKS, _READ_AHEAD, _TILE_HIDDEN, _TILE_MIXED,
    _TILE_VISIBLE,
)
from .cpu.decode import (
    _DECODE_BACKWARD_BLOCK_K, _decode_backward_kernel, _decode_kernel, decode_backward_steps, decode_steps,
)
from .cpu.forward import _forward_kernel, forward_steps
from .cpu.launch import RAN, KernelCall, launch
from .cpu.operands import forward_operand_shapes
from .cpu.memory import (
    _CALL_LOCK, _NOTHING_TO_PIN, WORKSPACE, BlockLayout, arrays_together, _single_threaded_blas,
    last_level_cache_bytes,
)
from .cpu.threads import worker_count
from .warmup import warmup  # the entry point's home since before kernels/warmup.py
from .cpu.plan import (
    _NO_DROPOUT, _backward_block_sizes, _backward_chunks, _block_sizes, _dense_table, _hashable, _kernel_array,
    _key_value_arrays, _mask_plan, _no_alibi, _prepare, _rows_unrestricted, _segment_sizes, _static_prepare,
)

__all__ = [
    "flash_forward", "flash_backward", "runs_decode", "warmup", "plan_mask", "MaskPlan", "recording", "Launch",
    "TILE_HIDDEN", "TILE_VISIBLE", "TILE_MIXED",
]  # fmt: skip

# Tile states of MaskPlan.tiles: every score hidden, every score visible (run unmasked), or read one by one.
TILE_HIDDEN, TILE_VISIBLE, TILE_MIXED = _TILE_HIDDEN, _TILE_VISIBLE, _TILE_MIXED


@dataclass(frozen=True)
class MaskPlan:
    """How the kernel reads a mask: masks are data, not work, summarised once per call.

    kind: "none"; "key_ranges" (a boolean mask the same for every query whose visible
    keys are one run per (batch, head): key_ranges (Bm, Hm, 2) [start, stop), the mask
    itself never read); "bool" or "additive" (tiles (Bm, Hm, Tq, Tk) of TILE_* states
    on the call's block grid: hidden tiles skipped, visible ones unmasked, mixed ones
    read score by score).
    """

    kind: str
    key_ranges: np.ndarray | None
    tiles: np.ndarray | None


def plan_mask(mask, nq, nk, *, backward=False, rows_unrestricted=True):
    """The MaskPlan of a (Bm, Hm, Mq, Nk) bool or additive mask for a forward (or backward)
    call with Nq queries and Nk keys; rows_unrestricted=False: a call with causal alignment, a
    window or packed sequences as well."""
    block_q, block_k = (_backward_block_sizes if backward else _block_sizes)(nq, nk)
    compute = np.float64 if mask is not None and mask.dtype == np.float64 else np.float32
    masks, flags = _mask_plan(mask, compute, nk, block_q, block_k, rows_unrestricted)
    if flags & (_HAS_BOOL_MASK | _HAS_ADDITIVE_MASK):
        return MaskPlan("bool" if flags & _HAS_BOOL_MASK else "additive", None, masks[3])
    return MaskPlan("none", None, None) if mask is None else MaskPlan("key_ranges", masks[2], None)


@dataclass(frozen=True)
class Launch:
    """One worker launch: which (forward, forward_serial, decode, backward), the q / k / v
    arrays it read, the mask as the kernel received it, and the decode's key splits."""

    worker: str
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    mask: np.ndarray | None = None
    n_splits: int = 1
    in_order_rows: int = 0  # decode: tiles of fewer rows read the keys one at a time
    read_ahead: bool = False  # decode: K and V prefetched ahead of use (from memory)


_RECORDINGS = []


@contextlib.contextmanager
def recording():
    """Collect a Launch for every worker launch inside the block (yields the list)."""
    launches = []
    _RECORDINGS.append(launches)
    try:
        yield launches
    finally:
        _RECORDINGS.remove(launches)


def _record(worker, q, k, v, mask=None, n_splits=1, in_order_rows=0, read_ahead=False):
    for launches in _RECORDINGS:
        launches.append(Launch(worker, q, k, v, mask, n_splits, in_order_rows, read_ahead))


# Calls with at most this many multiply-adds per product (B * Hq * Nq * Nk * D,
# ~0.5 MFLOP in all) run on the calling thread: waking the worker threads costs
# more than such a call's work.
_SERIAL_WORK = 1 << 17


@functools.lru_cache(maxsize=256)
def _forward_layout(batch, hq, nq, d, hkv, nk, dv, dtype, bf16, dense, longest_q, longest_k, work):
    """What a forward call's shapes decide (planned once per signature: small calls feel every
    microsecond): (block_q, block_k, V's padded width, decode?, the packed operands' dtype and
    shapes, small enough for the calling thread alone?)."""
    block_q, block_k = _block_sizes(longest_q, longest_k)
    v_width = padded(dv, PAD)
    decode = runs_decode(nq, nk, hq // hkv, dense)
    k_shape, v_shape = forward_operand_shapes(batch, hkv, nk, d, dv, bf16)
    operand = np.uint16 if bf16 else dtype
    operand_shapes = (k_shape, v_shape or (1, 1, 1, 1))  # V read in place: a placeholder
    return block_q, block_k, v_width, decode, operand, operand_shapes, hq * d * work <= _SERIAL_WORK


def flash_forward(
    q, k, v, mask, *, scale, causal, window, softcap, bf16_products=False, segments=None, align=None, alibi=None,
    f32_products=None, dropout_p=0.0, dropout_seed=None, sinks=None,
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
    dropout_p > 0 drops weights by attnkit.reference.dropout's keep mask for
    dropout_seed (an int in [0, 2**64); a batch entry is a segment) and scales
    the kept ones by 1 / (1 - dropout_p); lse is the undropped one. sinks:
    None or (Hq,) learned logits, one more score per row that carries no
    value (gpt-oss): it starts each row's running max and sum, so lse
    includes it and a row that sees no key gives 0 and lse = its sink.
    """
    check_paths()
    announce_as("forward")  # planning compiles small helpers too: name the kernel in the notice first
    bf16 = bf16_products or np.dtype(q.dtype) == np.uint16
    if segments is None and mask is None and alibi is None and not dropout_p > 0:  # planned once per signature
        plan = dense_forward_plan(
            q.shape, k.shape, v.shape, np.dtype(q.dtype), bool(bf16), scale, causal, _hashable(window), softcap,
            align, f32_products, sinks is not None,
        )  # fmt: skip
        return plan.run(q, k, v, sinks=sinks)
    dtype, compute, q, k, v, flags, consts, table, extras = _prepare(
        q, k, v, scale, causal, window, softcap, bf16, segments, align, alibi, dropout_p, dropout_seed, sinks,
        kv_in_place=segments is None)  # ForwardPlan.run: a decode reads K and V in place where it can
    plan = ForwardPlan(q.shape, k.shape, v.shape, dtype, compute, bf16, table, segments is not None, flags, consts,
                       f32_products, mask, extras)  # fmt: skip
    return plan.run(q, k, v)


@functools.lru_cache(maxsize=256)
def dense_forward_plan(q_shape, k_shape, v_shape, q_dtype, bf16, scale, causal, window, softcap, align,
                       f32_products=None, has_sinks=False):  # fmt: skip
    """The ForwardPlan of a dense call without mask, ALiBi or dropout (cached by its arguments:
    shapes, the input dtype, bf16 products, the options as flash_forward takes them, window a tuple)."""
    dtype, compute, flags, consts = _static_prepare(q_dtype, bf16, scale, softcap, False, 0.0, has_sinks)
    table = _dense_table(q_shape[0], q_shape[2], k_shape[2], causal, window, align)
    extras = (_no_alibi(compute), _NO_DROPOUT, _no_alibi(compute)[0])
    return ForwardPlan(q_shape, k_shape, v_shape, dtype, compute, bf16, table, False, flags, consts, f32_products,
                       None, extras)  # fmt: skip


# Results smaller than this come as two np.empty arrays, not views of one block: laying out the
# block's views costs ~5-9 µs a call, which decode calls felt (B4 H32 Nq1 D128 fp32, 64 KiB of
# results: plan.run 1.09-1.15x faster with two arrays, the two ways taking turns in one process);
# from 1 MiB of results up the two were within 3% either way (bench/results/decode-bandwidth.md).
_SEPARATE_RESULTS_BYTES = 1 << 20


class ForwardPlan:
    """Everything a forward call does besides reading q, k, v: block sizes, the packed operands'
    layout, the kernel (decode or forward) and its thread count, its tables and constants.

    Made per call for masked, packed, ALiBi and dropout calls; planned once per signature for
    the plain dense ones (dense_forward_plan), whose run() is then the results' allocation and
    one kernel entry: what attnkit's planned calls (attnkit/planned.py) run on every call.
    """

    __slots__ = (
        "dtype", "compute", "bf16", "table", "masks", "flags", "consts", "mask", "micro", "block_q", "block_k",
        "decode", "operand", "operand_shapes", "small", "v_in_place", "result_shapes", "separate", "result_block",
        "empty", "no_keys", "unreached", "lo", "hi", "in_order_rows", "kernel_call", "serial",
        "k_shape",
    )  # fmt: skip

    def __init__(self, q_shape, k_shape, v_shape, dtype, compute, bf16, table, packed, flags, consts, f32_products,
                 mask, extras):  # fmt: skip
        batch, hq, nq, d = q_shape
        hkv, nk, dv = k_shape[1], k_shape[2], v_shape[3]
        self.dtype, self.compute, self.bf16, self.table, self.consts, self.mask = dtype, compute, bf16, table, consts, mask
        self.result_shapes = ((batch, hq, nq, dv), (batch, hq, nq))
        self.k_shape = k_shape
        # One block for both results saves page faults on large calls (arrays_together); small
        # ones are served from the heap's free lists either way.
        self.separate = bf16 or batch * hq * nq * (dv + 1) * np.dtype(dtype).itemsize < _SEPARATE_RESULTS_BYTES
        self.result_block = None if self.separate else BlockLayout(dtype, self.result_shapes)
        self.empty = batch * hq * nq == 0
        self.no_keys = nk == 0
        self.unreached = packed  # rows no segment holds: 0 and -inf
        longest_q, longest_k, work = _segment_sizes(table, table if packed else None, nq, nk)
        # float32 products (bf16 bits widened by the decode kernel too) on the FMA micro-kernel
        self.micro = compute == np.float32 and (f32_products or F32_PRODUCTS) == "fma"
        dense = not packed and not flags & (_HAS_ALIBI | _HAS_DROPOUT)
        (self.block_q, self.block_k, v_width, self.decode, self.operand, self.operand_shapes,
         self.small) = _forward_layout(batch, hq, nq, d, hkv, nk, dv, dtype, bf16, dense, longest_q, longest_k, work)
        self.v_in_place = not bf16 and v_width == dv
        masks, mask_flags = _mask_plan(mask, compute, nk, self.block_q, self.block_k, _rows_unrestricted(table, packed))
        self.masks, self.flags = masks + extras, flags | mask_flags
        # The decode kernel's visible key offsets: a dense call's one segment row (a packed call with
        # no sequence has no row, and never decodes).
        self.lo, self.hi = (int(table[0, 5]), int(table[0, 6])) if self.decode else (0, 0)
        kv_bytes = batch * hkv * nk * (d + dv) * np.dtype(dtype).itemsize
        self.in_order_rows = _in_order_rows(dtype, kv_bytes)
        if self.decode and kv_bytes > min(last_level_cache_bytes(), _CACHE_SHARE_BYTES):
            self.flags |= _READ_AHEAD
        # the kernel, its steps and its compiled entry, found at the first runs (KernelCall)
        self.kernel_call = _decode_call() if self.decode else KernelCall(_forward_kernel, forward_steps)
        self.serial = None  # run() of a small forward as one function, once its kernel entry is known

    def run(self, q, k, v, sinks=None):
        """(out, lse) for q, k, v of the planned shapes: used as they are when C-contiguous, writeable
        arrays of self.dtype, else copied into such (one compiled signature per dtype). sinks: the
        (Hq,) logits of a plan made with has_sinks (None otherwise), any float dtype."""
        serial = self.serial
        if serial is not None and sinks is None and enterable(q, k, v, self.dtype):
            result = serial(q, k, v)
            if result is not None:
                return result
        q = _kernel_array(q, self.dtype)
        k, v = _key_value_arrays(k, v, self.dtype, self.decode)  # a decode reads a cache in place
        masks = self.masks
        if sinks is not None:
            masks = masks[:6] + (_kernel_array(sinks, self.compute),)
        if self.separate:  # bf16 bits (or float32) and float32 lse; or small: two np.empty cost less
            out, lse = np.empty(self.result_shapes[0], self.dtype), np.empty(self.result_shapes[1], self.compute)
        else:
            out, lse = self.result_block.arrays()
        if self.empty:
            return out, lse
        if self.no_keys or self.unreached:  # rows no key reaches (or no segment holds): 0 and -inf
            out.fill(0)
            lse.fill(-np.inf)
            if self.no_keys:
                if self.flags & _HAS_SINKS:  # all the weight on the sink
                    lse[:] = masks[6][None, :, None]
                return out, lse
        # fewer threads when other programs hold the cores; 1 in a forked child (kernels/cpu/threads.py)
        n_workers = 1 if self.small else worker_count()
        if self.decode:
            _decode(q, k, v, self.mask, masks, self.consts, self.lo, self.hi, self.flags, self.micro, n_workers, out,
                    lse, self.kernel_call, self.in_order_rows)  # fmt: skip
            if (self.serial is None and self.kernel_call.entry and not self.flags & _HAS_SINKS
                    and not uses_process_threads()):  # fmt: skip
                self.serial = _serial_decode(self, self.kernel_call.entry, self.kernel_call.steps)
            return out, lse
        announce_as("forward")
        if self.small:
            # The calling thread alone, on packed operands of its own (a few KiB, from the heap's
            # free lists): no thread pool, no BLAS threads to pin, no shared workspace, so no lock.
            k_packed = np.empty(self.operand_shapes[0], self.operand)
            v_packed = v if self.v_in_place else np.empty(self.operand_shapes[1], self.operand)
            self._forward(q, k, v, masks, n_workers, k_packed, v_packed, out, lse)
            if self.serial is None and self.kernel_call.entry and not self.flags & _HAS_SINKS:
                self.serial = _serial_forward(self, self.kernel_call.entry, self.kernel_call.steps)
            return out, lse
        with _CALL_LOCK, _single_threaded_blas():
            k_packed, v_packed = WORKSPACE.arrays(self.operand, self.operand_shapes, zero=False)
            self._forward(q, k, v, masks, n_workers, k_packed, v if self.v_in_place else v_packed, out, lse)
        return out, lse

    def _forward(self, q, k, v, masks, n_workers, k_packed, v_packed, out, lse):
        if _RECORDINGS:
            _record("forward_serial" if n_workers == 1 else "forward", q, k, v, self.mask)
        self.kernel_call(q, k, v, self.table, masks, self.consts, self.flags, self.block_q, self.block_k, self.micro,
                         n_workers, k_packed, v_packed, out, lse)  # fmt: skip


def enterable(q, k, v, dtype):
    """Whether q, k, v are what a plan's serial function takes (ForwardPlan.serial): C-contiguous,
    aligned, writeable ndarrays of the plan's dtype, the types its kernel's entry was compiled for.
    Anything else goes through ForwardPlan.run, which copies it into such arrays."""
    ndarray = np.ndarray
    return (type(q) is ndarray and type(k) is ndarray and type(v) is ndarray and q.dtype == dtype
            and k.dtype == dtype and v.dtype == dtype and q.flags.carray and k.flags.carray and v.flags.carray)  # fmt: skip


def _serial_decode(plan, entry, steps):
    """plan.run(q, k, v) of a dense decode without sinks on C-contiguous K and V, as one function, for
    q, k, v that enterable() accepts: the thread count, the allocations and the kernel's compiled
    entry, under the thread pool's lock when it uses the pool. Each layer between two decode kernels costs several times its
    own instructions: the kernel has streamed K and V through the caches, and the next call's Python
    finds its code and data gone (fp32 MHA B4 H32 Nk64 D128: a minimal loop of the same steps took
    170 us a call where the layered path took 206). Returns None where run() must take the call:
    keys split across workers (partials to merge), a recording to make, or a kernel that did not run.
    run(q, k, v, want_lse=False) returns a spare lse, which the next such call overwrites."""
    dtype, compute = plan.dtype, plan.compute
    out_shape, lse_shape = plan.result_shapes
    batch, hkv, nk, _ = plan.k_shape
    fixed = (plan.masks, plan.consts, plan.lo, plan.hi, plan.flags, min(_DECODE_BLOCK_K, nk), plan.micro,
             plan.in_order_rows, _UNUSED_PARTIALS[np.dtype(compute).type])  # fmt: skip
    masks, consts, lo, hi, flags, block_k, micro, in_order_rows, (part_out, part_lse) = fixed
    empty, lock = np.empty, _CALL_LOCK
    spare_lse = empty(lse_shape, compute)  # written by calls whose caller drops lse (see _serial_forward)

    def run(q, k, v, want_lse=True):
        if _RECORDINGS:
            return None
        n_workers = worker_count()
        if _key_splits(batch, hkv, nk, n_workers) > 1:
            return None  # partials to merge: run() takes the call
        out, lse = empty(out_shape, dtype), empty(lse_shape, compute) if want_lse else spare_lse
        # the calling thread alone needs no lock (_decode's `alone`: no pool, no workspace)
        with _NOTHING_TO_PIN if n_workers == 1 else lock:
            status = entry(q, k, v, masks, consts, lo, hi, flags, block_k, 1, micro, in_order_rows, n_workers, out,
                           lse, part_out, part_lse, steps)  # fmt: skip
        return (out, lse) if status == RAN else None

    return run


def _serial_forward(plan, entry, steps):
    """plan.run(q, k, v) of a small dense forward without sinks (it runs on the calling thread, on
    packed operands of its own) as one function, for tiny calls, which feel every layer of Python:
    the allocations and the kernel's compiled entry, for q, k, v that enterable() accepts (the
    types `entry` was compiled for, launch.KernelCall). Returns None where run() itself must take
    the call: a recording to make, or a kernel that did not run (it then reports why).
    run(q, k, v, want_lse=False) returns a spare lse, which the next such call overwrites."""
    dtype, compute, operand, v_in_place = plan.dtype, plan.compute, plan.operand, plan.v_in_place
    (out_shape, lse_shape), (k_shape, v_shape) = plan.result_shapes, plan.operand_shapes
    fixed = (plan.table, plan.masks, plan.consts, plan.flags, plan.block_q, plan.block_k, plan.micro, 1)
    table, masks, consts, flags, block_q, block_k, micro, n_workers = fixed
    empty = np.empty
    # Scratch kept from call to call: the packed operands, and lse where the caller drops it
    # (want_lse=False: sdpa's calls). The kernels hold the GIL, so no other thread enters this
    # plan's kernel while one call uses them; a tiny call felt each allocation (~0.3 µs with its release).
    k_packed, spare_lse = empty(k_shape, operand), empty(lse_shape, compute)
    v_packed = None if v_in_place else empty(v_shape, operand)

    def run(q, k, v, want_lse=True):
        if _RECORDINGS:
            return None
        out, lse = empty(out_shape, dtype), empty(lse_shape, compute) if want_lse else spare_lse
        status = entry(q, k, v, table, masks, consts, flags, block_q, block_k, micro, n_workers, k_packed,
                       v if v_packed is None else v_packed, out, lse, steps)  # fmt: skip
        return (out, lse) if status == RAN else None

    return run


# Decode (flash-decoding): at most this many query rows per head, against at
# least _DECODE_MIN_KEYS keys, and at most 128 rows per GQA group in one tile.
# Short caches too: B4 Hq32 Nk64-200 D128 took 0.35-0.6x the prefill path's time
# (no K^T packing, a group's rows in one tile; bench/results/decode-bandwidth.md).
_DECODE_MAX_QUERIES = 16
_DECODE_MIN_KEYS = 16
_DECODE_BLOCK_K = 512


def _is_decode(nq, nk, group):
    return nq <= _DECODE_MAX_QUERIES and nk >= _DECODE_MIN_KEYS and group * nq <= 128


def runs_decode(nq, nk, group, dense):
    """Whether a call of these sizes runs the decode kernels (forward, and backward when it has a
    gradient: a GQA group's few rows against the keys) rather than the prefill ones. group: query
    heads per kv head; dense: one sequence per batch entry, no ALiBi, no dropout. Any Dv: the decode
    forward reads V in place, or a block at a time widened (bf16) or padded to 16 columns."""
    return dense and _is_decode(nq, nk, group)


# The decode kernel reads K and V a key at a time, rows in memory order, for tiles of fewer rows
# (GQA group x queries) than this; the micro-kernel takes larger tiles (kernels/cpu/decode.py).
# float32 caches larger than the last-level cache take tiles of up to 8 rows in order too: read
# from memory, in order ran 1.3-1.5x faster at 8 rows than the micro-kernel, which reads V in
# strips, but 1.3-1.4x slower from the cache (the same call repeated on an 8 MiB cache; docs/
# kernel-log.md v26). bf16 caches take tiles of up to 8 rows in order always: since each key's
# elements are widened once per four rows' dot products (v27), 5-8 rows in order ran 1.03-1.2x
# faster than the micro-kernel from memory and from the cache. Zen 3 VM.
_IN_ORDER_ROWS = 5
_IN_ORDER_ROWS_FROM_MEMORY = 9


# K and V larger than this (or than the last-level cache, if smaller) are read from memory, so the
# decode kernel prefetches them ahead of use (_READ_AHEAD, kernels/cpu/decode.py). Not the cache's
# size alone: a VM reports its host's whole cache (480 MiB on the Xeon VM), where 32 MiB of K and V
# still ran as from the cache (fp32 B4 H32/8 Nk1024 D128: 1.40-1.51x torch without the prefetches,
# 1.24-1.29x with them) and 64 MiB as from memory (Nk2048: 1.36x without, 1.73x with).
_CACHE_SHARE_BYTES = 32 << 20


def _in_order_rows(dtype, kv_bytes):
    """The decode kernel's in_order_rows for a call whose K and V (of dtype; bf16 as uint16 bits)
    take kv_bytes."""
    dtype = np.dtype(dtype)
    if dtype == np.uint16 or dtype == np.float32 and kv_bytes > last_level_cache_bytes():
        return _IN_ORDER_ROWS_FROM_MEMORY
    return _IN_ORDER_ROWS


# The decode kernel's partials when the keys are not split: never read nor written.
_UNUSED_PARTIALS = {
    dtype: (np.zeros((1, 1, 1, 1, 1), dtype), np.zeros((1, 1, 1, 1), dtype)) for dtype in (np.float32, np.float64)
}


def _key_splits(batch, hkv, nk, n_workers):
    """How many runs the decode kernel cuts each (batch, kv head)'s keys into: enough for twice the
    workers' tasks, at most one per key block; 1 on one thread (no OpenMP region, no split to merge)."""
    if n_workers == 1:
        return 1
    return max(1, min(-(-nk // _DECODE_BLOCK_K), -(-2 * n_workers // (batch * hkv))))


def _decode_call():
    """A KernelCall of the decode kernel, K and V typed as layout 'A' (its arguments 1 and 2): one
    compiled kernel for a C-contiguous cache and one read in place, as its worker already was."""
    return KernelCall(_decode_kernel, decode_steps, any_layout=(1, 2))


def _decode(q, k, v, mask, masks, consts, lo, hi, flags, micro, n_workers, out, lse, kernel_call=None,
            in_order_rows=_IN_ORDER_ROWS):  # fmt: skip
    """The decode kernel: keys split across cores when there are fewer (batch, kv head)
    pairs than twice the workers, partials merged by lse. kernel_call: the plan's KernelCall of
    _decode_kernel (None: a new one); returns the one it ran. in_order_rows: see _in_order_rows."""
    batch, hq, nq, _ = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    n_splits = _key_splits(batch, hkv, nk, n_workers)
    announce_as("decode")
    if _RECORDINGS:
        _record("decode_serial" if n_workers == 1 else "decode", q, k, v, mask, n_splits, in_order_rows,
                bool(flags & _READ_AHEAD))
    # The lock guards the workspace (the split partials), the thread pool and a process-wide BLAS
    # thread limit: one thread (no split) with a BLAS limited per thread needs none of them.
    alone = n_workers == 1 and not uses_process_threads()
    with _NOTHING_TO_PIN if alone else _CALL_LOCK, _single_threaded_blas():
        if n_splits > 1:  # the compute dtype: bf16 partials stay float32 until the merge rounds them
            shapes = ((n_splits, batch, hq, nq, dv), (n_splits, batch, hq, nq))
            part_out, part_lse = WORKSPACE.zeroed(consts.dtype, shapes)
        else:
            part_out, part_lse = _UNUSED_PARTIALS[consts.dtype.type]
        kernel_call = kernel_call or _decode_call()
        kernel_call(
            q, k, v, masks, consts, lo, hi, flags, min(_DECODE_BLOCK_K, nk), n_splits, micro, in_order_rows, n_workers,
            out, lse, part_out, part_lse,
        )  # fmt: skip
    return kernel_call


def flash_backward(
    q, k, v, mask, out, d_out, lse, *, scale, causal, window, softcap, bf16_products=False,
    segments=None, align=None, alibi=None, dropout_p=0.0, dropout_seed=None,
):  # fmt: skip
    """Gradients (dq, dk, dv) of flash_forward, shaped and typed like q, k, v.

    FlashAttention-2 style: probabilities recomputed from lse, delta = rowsum(dO * O).
    Deterministic: every accumulation has a fixed order. bf16 bits (uint16) and
    bf16_products run the five products in bf16 with float32 accumulation, as
    flash_forward does. segments, align, alibi and dropout as for flash_forward
    (the same seed regenerates the forward's mask); rows and keys outside every
    segment get zero gradients.
    """
    check_paths()
    announce_as("backward")
    bf16 = bf16_products or np.dtype(q.dtype) == np.uint16
    dtype, compute, q, k, v, flags, consts, table, extras = _prepare(
        q, k, v, scale, causal, window, softcap, bf16, segments, align, alibi, dropout_p, dropout_seed)
    out, d_out = (_kernel_array(x, dtype) for x in (out, d_out))
    lse = _kernel_array(lse, compute)
    batch, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    shapes = (q.shape, k.shape, v.shape)
    if nq == 0 or nk == 0 or batch * hq == 0:
        return arrays_together(dtype, shapes, zero=True)
    dense = segments is None and not flags & (_HAS_ALIBI | _HAS_DROPOUT)
    if runs_decode(nq, nk, hq // hkv, dense):
        announce_as("decode backward")
        dq, dk, dv_grad = arrays_together(dtype, shapes, zero=True)
        block_k = min(_DECODE_BACKWARD_BLOCK_K, nk)
        masks, mask_flags = _mask_plan(mask, compute, nk, _backward_block_sizes(nq, nk)[0], block_k,
                                       _rows_unrestricted(table, False))  # fmt: skip
        n_workers = worker_count()
        if _RECORDINGS:
            _record("decode_backward_serial" if n_workers == 1 else "decode_backward", q, k, v, mask)
        with _CALL_LOCK, _single_threaded_blas():
            launch(_decode_backward_kernel, (q, k, v, masks + extras, consts, int(table[0, 5]), int(table[0, 6]),
                                             flags | mask_flags, block_k, n_workers, out, d_out, lse, dq, dk, dv_grad),
                   decode_backward_steps)  # fmt: skip
        return dq, dk, dv_grad
    longest_q, longest_k, _ = _segment_sizes(table, segments, nq, nk)
    block_q, block_k = _backward_block_sizes(longest_q, longest_k)
    masks, mask_flags = _mask_plan(mask, compute, nk, block_q, block_k, _rows_unrestricted(table, segments is not None))
    masks, flags = masks + extras, flags | mask_flags
    n_chunks = _backward_chunks(len(table), hkv, longest_q, block_q)
    n_workers = worker_count()  # 1 when other programs fill the cores, and in a forked child
    micro = dtype == np.float32 and F32_PRODUCTS == "fma"
    # The workers write every row and key of every segment; those outside all of them (packed calls) stay zero.
    dq, dk, dv_grad = arrays_together(dtype, shapes, zero=segments is not None)
    operand_kind = _OPERAND_KINDS[np.dtype(np.uint16 if bf16 else compute)]
    with _CALL_LOCK, _single_threaded_blas():
        if n_chunks > 1:  # partial dK^T / dV^T per chunk, kept memory so a training loop faults no fresh pages in
            dk_t, dv_t = WORKSPACE.zeroed(compute, ((batch, hkv * n_chunks, d, nk + PAD), (batch, hkv * n_chunks, dv, nk + PAD)))
        else:  # each task owns its keys' gradients: no partials
            dk_t = dv_t = _NO_PARTIALS[np.dtype(compute)]
        if _RECORDINGS:
            _record("backward_serial" if n_workers == 1 else "backward", q, k, v, mask)
        launch(_backward_kernel, (q, k, v, table, masks, out, d_out, lse, consts, flags, block_q, block_k, n_chunks,
                                  micro, n_workers, operand_kind, dq, dk_t, dv_t, dk, dv_grad),
               backward_steps)  # fmt: skip
    return dq, dk, dv_grad


# The backward's operand dtype as a value the kernel's types come from (its own buffers are the worker's).
_OPERAND_KINDS = {np.dtype(t): np.zeros(1, t) for t in (np.uint16, np.float32, np.float64)}
# What the backward passes for dK^T / dV^T partials it does not use (one chunk per kv head).
_NO_PARTIALS = {np.dtype(t): np.zeros((1, 1, 1, 1), t) for t in (np.float32, np.float64)}
