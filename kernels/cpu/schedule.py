"""Task lists heaviest first and the shared work queue the workers claim tasks from."""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from ..jit import jit_inner as _jit_inner
from .tile import _key_block_range


@_jit_inner()
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
def _fetch_add(typingctx, counter, index, amount):
    """Atomically counter[index] += amount; returns the old value (counter: 1-D int64 array)."""
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64 and isinstance(index, types.Integer)
            and isinstance(amount, types.Integer)):  # fmt: skip
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        pointer = builder.gep(data, [context.cast(builder, args[1], signature.args[1], types.int64)])
        increment = context.cast(builder, args[2], signature.args[2], types.int64)
        return builder.atomic_rmw("add", pointer, increment, "monotonic")

    return types.int64(counter, index, amount), codegen


@_jit_inner()
def _claim(order, next_task):
    """The next task of the queue (order, shared counter next_task[0]), or -1 once it is empty."""
    claimed = _fetch_add(next_task, 0, 1)
    return order[claimed] if claimed < order.shape[0] else -1


# Queues whose consecutive tasks read consecutive memory (decode's (batch, kv head, split) tasks)
# are claimed in runs: a core's hardware prefetchers run on from one task's K and V into the next
# task's, which is then its own. Claimed one at a time, the two cores took turns and each ran on
# into the other's task: a naive parallel decode of B4 H32 Nk64 D128 fp32 (128 tasks of 64 KiB,
# from the L3) took 202-214 us claiming one task at a time, 175-184 claiming 8, 169-177 split in
# two halves (/tmp experiment, the Xeon VM). Each worker first takes runs from a home stretch of
# its own, the same one call after call (a worker is one thread of Numba's pool), so a cache that
# fits in the cores' L2 caches stays where it was read; then it takes runs from the others'
# stretches. Eight runs a worker keep the balance a loaded core needs (#24): a worker stalled on
# a taken core holds one run, and the rest of its stretch goes to the others.
_RUNS_PER_WORKER = 8
_COUNTER_STRIDE = 8  # int64s: each worker's counter on a cache line of its own


@_jit_inner()
def run_queue(n_tasks, n_workers):
    """(stretches, counters) of a queue of tasks 0 .. n_tasks - 1 for n_workers workers, claimed in
    runs (_claim_in_runs): stretches[0] the run length, worker w's home stretch the tasks from
    stretches[1 + w] up to stretches[2 + w]; counters[w * _COUNTER_STRIDE] the next unclaimed task
    of stretch w."""
    workers = max(1, n_workers)
    stretches = np.empty(workers + 2, np.int64)
    stretches[0] = max(1, n_tasks // (_RUNS_PER_WORKER * workers))
    counters = np.zeros(workers * _COUNTER_STRIDE, np.int64)
    for w in range(workers + 1):
        stretches[1 + w] = n_tasks * w // workers
        if w < workers:
            counters[w * _COUNTER_STRIDE] = stretches[1 + w]
    return stretches, counters


@_jit_inner()
def _claim_in_runs(stretches, counters, run, worker):
    """The next task of a run_queue queue for `worker`, or -1 once it is empty: from the worker's
    home stretch while it lasts, then from the next workers'. run: the worker's own (2,) int64
    array, zeros at first: (next task, end) of the run it holds."""
    if run[0] >= run[1]:
        workers = stretches.shape[0] - 2
        length = stretches[0]
        found = False
        for i in range(workers):
            w = (worker + i) % workers
            stop = stretches[2 + w]
            if counters[w * _COUNTER_STRIDE] >= stop:  # read first: no atomic write to an empty stretch
                continue
            start = _fetch_add(counters, w * _COUNTER_STRIDE, length)
            if start < stop:
                run[0], run[1] = start, min(start + length, stop)
                found = True
                break
        if not found:
            return -1
    t = run[0]
    run[0] += 1
    return t


@_jit_inner()
def _next_task(order, next_task, tasks):
    """(t, the task's three fields) of the next task of the queue; t is -1 once it is empty."""
    t = _claim(order, next_task)
    if t < 0:
        return t, 0, 0, 0
    return t, tasks[t, 0], tasks[t, 1], tasks[t, 2]


@_jit_inner()
def _segment(segments, seg):
    """(b, qs, Nq, ks, Nk, lo, hi, diagonal) of segment seg (see _segment_table)."""
    row = segments[seg]
    return row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7]


@_jit_inner()
def _forward_runs(segments, hq, block_q, n_workers):
    """Query blocks per forward task come in runs: a task takes a run of one (segment, head)'s
    consecutive blocks, so one core reads that head's keys and values for all of them (two cores
    taking a head's blocks in turn each read them: B16 H12 N128 D64 fp32 ran 13% slower on two threads
    with 64-row tasks than with whole heads, equal on one; docs/kernel-log.md v42). Runs per (segment,
    head): whole heads when there are 16 tasks per worker that way, else enough runs to make them."""
    longest = 0
    for seg in range(segments.shape[0]):
        longest = max(longest, (segments[seg, 2] + block_q - 1) // block_q)
    heads = segments.shape[0] * hq
    return max(1, min(longest, -(-(16 * n_workers) // max(1, heads))))


@_jit_inner()
def _run_schedule(segments, heads, block_q, block_k, n_runs):
    """(tasks (T, 3) of (segment, head, run), their order heaviest first): a run is one of n_runs
    stretches of a segment's consecutive query blocks, its cost their visible key blocks. The
    forward's heads are the query heads; the backward's are the kv heads (a task covers the GQA
    group, every head of which costs the same), its runs the query chunks."""
    n_tasks = segments.shape[0] * heads * n_runs
    tasks = np.empty((n_tasks, 3), np.int64)
    costs = np.zeros(n_tasks, np.int64)
    t = 0
    for seg in range(segments.shape[0]):
        _, _, nq, _, nk, lo_offset, hi_offset, _ = _segment(segments, seg)
        n_qblocks = (nq + block_q - 1) // block_q
        blocks_per_run = (n_qblocks + n_runs - 1) // n_runs
        for head in range(heads):
            for run in range(n_runs):
                tasks[t, 0], tasks[t, 1], tasks[t, 2] = seg, head, run
                for qb in range(run * blocks_per_run, min(n_qblocks, (run + 1) * blocks_per_run)):
                    i0 = qb * block_q
                    first, stop = _key_block_range(i0, min(i0 + block_q, nq), nk, lo_offset, hi_offset, block_k)
                    costs[t] += stop - first
                t += 1
    return tasks, _heaviest_first(costs)


# A schedule's tasks and order, and the shared next_task counter, as values numba.typeof reads the
# kernels' types from (kernels/cpu/launch.py compiles the workers for them before any call); the
# last two also stand for run_queue's stretches and counters (int64 vectors too)
TASK_QUEUE = (np.empty((0, 3), np.int64), np.empty(0, np.int64), np.zeros(1, np.int64))
