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
def _fetch_add(typingctx, counter):
    """Atomically counter[0] += 1; returns the old value (counter: 1-D int64 array)."""
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64):
        return None

    def codegen(context, builder, signature, args):
        pointer = context.make_array(signature.args[0])(context, builder, args[0]).data
        return builder.atomic_rmw("add", pointer, ir.Constant(ir.IntType(64), 1), "monotonic")

    return types.int64(counter), codegen


@_jit_inner()
def _claim(order, next_task):
    """The next task of the queue (order, shared counter next_task[0]), or -1 once it is empty."""
    claimed = _fetch_add(next_task)
    return order[claimed] if claimed < order.shape[0] else -1


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
# kernels' types from (kernels/cpu/launch.py compiles the workers for them before any call)
TASK_QUEUE = (np.empty((0, 3), np.int64), np.empty(0, np.int64), np.zeros(1, np.int64))
