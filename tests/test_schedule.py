"""The decode kernels' work queue (kernels/cpu/schedule.py run_queue): tasks in order, claimed in runs
of consecutive tasks, each worker from a home stretch of its own first, then from the others';
every task is claimed exactly once, however the workers' claims interleave."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from attnkit.kernels.cpu.schedule import _RUNS_PER_WORKER, _claim_in_runs, run_queue


@numba.njit
def _claims_taking_turns(n_tasks, n_workers, turns):
    """The workers' claims, taking turns as `turns` (worker indices, cycled) orders them:
    (the worker that claimed each task, -1 none; how many times each was claimed; the order in
    which they were claimed; the queue's stretches)."""
    stretches, counters = run_queue(n_tasks, n_workers)
    runs = np.zeros((n_workers, 2), np.int64)
    claimed_by = np.full(n_tasks, -1, np.int64)
    times = np.zeros(n_tasks, np.int64)
    sequence = np.full(n_tasks, -1, np.int64)
    done = np.zeros(n_workers, np.bool_)
    step = claims = 0
    while not done.all():
        w = turns[step % turns.shape[0]]
        step += 1
        if done[w]:
            continue
        t = _claim_in_runs(stretches, counters, runs[w], w)
        if t < 0:
            done[w] = True
            continue
        claimed_by[t] = w
        times[t] += 1
        if claims < n_tasks:
            sequence[claims] = t
        claims += 1
    return claimed_by, times, sequence, stretches


@numba.njit(parallel=True)
def _claims_in_parallel(n_tasks, n_workers):
    """How many times each task was claimed by n_workers workers on Numba's threads."""
    stretches, counters = run_queue(n_tasks, n_workers)
    times = np.zeros((n_workers, n_tasks), np.int64)
    for w in numba.prange(n_workers):
        run = np.zeros(2, np.int64)
        while True:
            t = _claim_in_runs(stretches, counters, run, w)
            if t < 0:
                break
            times[w, t] += 1
    return times.sum(axis=0)


def _home(t, n_tasks, n_workers):
    return max(w for w in range(n_workers) if n_tasks * w // n_workers <= t)


@pytest.mark.parametrize("n_workers", [1, 2, 3])
@pytest.mark.parametrize("n_tasks", [0, 1, 5, 16, 17, 50, 128, 1001])
@pytest.mark.parametrize("turns", ["round-robin", "first-worker-twice", "random"])
def test_every_task_is_claimed_once_in_runs_from_the_workers_own_stretches_first(n_tasks, n_workers, turns):
    rng = np.random.default_rng(n_tasks * 7 + n_workers)
    order = {
        "round-robin": np.arange(n_workers),
        "first-worker-twice": np.array([0, 0] + list(range(1, n_workers))),
        "random": rng.integers(0, n_workers, 97),
    }[turns]
    claimed_by, times, sequence, stretches = _claims_taking_turns(n_tasks, n_workers, order)
    np.testing.assert_array_equal(times, np.ones(n_tasks, np.int64))
    length = max(1, n_tasks // (_RUNS_PER_WORKER * n_workers))
    assert stretches[0] == length
    np.testing.assert_array_equal(stretches[1:], [n_tasks * w // n_workers for w in range(n_workers + 1)])
    homes = [_home(t, n_tasks, n_workers) for t in range(n_tasks)]
    if turns == "round-robin" and n_tasks % n_workers == 0:  # equal stretches, equal turns: no worker steals
        assert claimed_by.tolist() == homes
    # a worker's claims within a stretch come in runs of `length` consecutive tasks from its start
    for w in range(n_workers):
        start, stop = stretches[1 + w], stretches[2 + w]
        for run_start in range(start, stop, length):
            assert len(set(claimed_by[run_start : min(run_start + length, stop)].tolist())) == 1
    # each worker claims its own stretch's runs before any other's
    first_claims = {}
    for t in sequence.tolist():
        first_claims.setdefault(claimed_by[t], t)
    for w, t in first_claims.items():
        if stretches[1 + w] < stretches[2 + w]:
            assert homes[t] == w


@pytest.mark.parametrize("n_tasks", [0, 3, 128, 4099])
def test_workers_on_numbas_threads_claim_every_task_once(n_tasks):
    n_workers = max(2, numba.get_num_threads())
    np.testing.assert_array_equal(_claims_in_parallel(n_tasks, n_workers), np.ones(n_tasks, np.int64))
