"""The decode kernels' work queue (kernels/cpu/schedule.py run_queue): tasks in order, claimed in runs
of consecutive tasks; every task is claimed exactly once, however the workers' claims interleave."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from attnkit.kernels.cpu.schedule import _RUNS_PER_WORKER, _claim_in_runs, run_queue


@numba.njit
def _claims_taking_turns(n_tasks, n_workers, turns):
    """Each worker's claims, the workers taking turns as `turns` (worker indices, cycled) orders them:
    (claimed (n_tasks,) of the worker that claimed each task, -1 none; how many times each was
    claimed; the run length)."""
    order, next_task = run_queue(n_tasks, n_workers)
    runs = np.zeros((n_workers, 2), np.int64)
    claimed_by = np.full(n_tasks, -1, np.int64)
    times = np.zeros(n_tasks, np.int64)
    done = np.zeros(n_workers, np.bool_)
    step = 0
    while not done.all():
        w = turns[step % turns.shape[0]]
        step += 1
        if done[w]:
            continue
        t = _claim_in_runs(order, next_task, runs[w])
        if t < 0:
            done[w] = True
            continue
        claimed_by[t] = w
        times[t] += 1
    return claimed_by, times, next_task[1]


@numba.njit(parallel=True)
def _claims_in_parallel(n_tasks, n_workers):
    """How many times each task was claimed by n_workers workers on Numba's threads."""
    order, next_task = run_queue(n_tasks, n_workers)
    times = np.zeros((n_workers, n_tasks), np.int64)
    for w in numba.prange(n_workers):
        run = np.zeros(2, np.int64)
        while True:
            t = _claim_in_runs(order, next_task, run)
            if t < 0:
                break
            times[w, t] += 1
    return times.sum(axis=0)


@pytest.mark.parametrize("n_workers", [1, 2, 3])
@pytest.mark.parametrize("n_tasks", [0, 1, 5, 16, 17, 50, 128, 1001])
@pytest.mark.parametrize("turns", ["round-robin", "first-worker-twice", "random"])
def test_every_task_is_claimed_once_in_runs_of_consecutive_tasks(n_tasks, n_workers, turns):
    rng = np.random.default_rng(n_tasks * 7 + n_workers)
    order = {
        "round-robin": np.arange(n_workers),
        "first-worker-twice": np.array([0, 0] + list(range(1, n_workers))),
        "random": rng.integers(0, n_workers, 97),
    }[turns]
    claimed_by, times, run_length = _claims_taking_turns(n_tasks, n_workers, order)
    assert run_length == max(1, n_tasks // (_RUNS_PER_WORKER * n_workers))
    np.testing.assert_array_equal(times, np.ones(n_tasks, np.int64))
    # runs: each stretch [r * length, (r + 1) * length) went to one worker
    for start in range(0, n_tasks, run_length):
        assert len(set(claimed_by[start : start + run_length].tolist())) == 1


@pytest.mark.parametrize("n_tasks", [0, 3, 128, 4099])
def test_workers_on_numbas_threads_claim_every_task_once(n_tasks):
    n_workers = max(2, numba.get_num_threads())
    np.testing.assert_array_equal(_claims_in_parallel(n_tasks, n_workers), np.ones(n_tasks, np.int64))
