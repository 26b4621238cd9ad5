"""Context parallelism (attnkit.distributed) with 2 and 4 gloo ranks on this machine.

Each rank computes, from the same seed, the full attention in one process
(attnkit.attention) and checks its own shard of the ring / Ulysses result and
gradients against it: relative error <= 1e-5 in float32, bf16 by the 2x / 3x
rule against float64. Processes are spawned with free ports and bounded
timeouts: a hung collective fails the test instead of hanging the suite.
"""

from __future__ import annotations

import socket
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from distributed_workers import TIMEOUT_S, check_cases, dying_rank  # noqa: E402

JOIN_S = 240  # per spawned group, all cases


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn, world, *args):
    """Run fn(rank, world, port, *args) in `world` spawned processes; fail on any error or on a hang."""
    context = mp.start_processes(fn, args=(world, free_port(), *args), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + JOIN_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{world} ranks did not finish within {JOIN_S} s")


def test_two_ranks():
    run_ranks(check_cases, 2)


def test_four_ranks():
    run_ranks(check_cases, 4)


def test_a_dead_rank_fails_the_others_within_the_timeout(tmp_path):
    report = tmp_path / "report.txt"
    run_ranks(dying_rank, 2, str(report))
    seconds, error = report.read_text().split()
    assert float(seconds) <= TIMEOUT_S + 5, f"the survivor waited {seconds} s"
