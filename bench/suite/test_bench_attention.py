"""pytest-benchmark suite: each contender of the default sweep at a few lengths.

Not part of `make test` (setup.cfg's testpaths is tests/). Run it explicitly:

    .venv/bin/pytest bench/suite/ --benchmark-save=NAME      # store under .benchmarks/
    .venv/bin/pytest bench/suite/ --benchmark-compare        # against the last stored run
    .venv/bin/pytest bench/suite/ --benchmark-compare=0001 --benchmark-compare-fail=median:10%
    .venv/bin/pytest bench/suite/ -k "numba and 1024"        # one contender, one length

Results are grouped by N. Each benchmark's extra_info carries flops (of one
call), gflops_per_s (at the median) and peak_memory_bytes (measured in this
process as in `attnkit bench`, see attnkit.bench.measure).

Environment: ATTNKIT_BENCH_N (comma-separated lengths, default 512,1024,2048),
ATTNKIT_BENCH_DEVICE (cpu or cuda), ATTNKIT_BENCH_MODE (forward, backward,
both), ATTNKIT_BENCH_BACKENDS (comma-separated names, or all).
"""

from __future__ import annotations

import math
import os

import pytest

from attnkit.bench import contenders, measure
from attnkit.bench.settings import DEFAULTS, Settings, default_device, default_memory_budget
from attnkit.bench.sweep import make_row, predicted_need, select_contenders


def _settings():
    device = os.environ.get("ATTNKIT_BENCH_DEVICE") or default_device()
    ns = [int(n) for n in os.environ.get("ATTNKIT_BENCH_N", "512,1024,2048").split(",") if n.strip()]
    defaults = {**DEFAULTS[device], "ns": ns}
    return Settings(device=device, mode=os.environ.get("ATTNKIT_BENCH_MODE", "forward"),
                    memory_budget_bytes=default_memory_budget(device), **defaults)


SETTINGS = _settings()
_requested = os.environ.get("ATTNKIT_BENCH_BACKENDS")
_requested = None if not _requested else (
    "all" if _requested == "all" else [name.strip() for name in _requested.split(",")])
CONTENDERS, _ = select_contenders(SETTINGS, contenders.all_contenders(), _requested)
TARGET_SECONDS = 0.5  # of timed calls per benchmark, between 5 and 100 rounds


@pytest.mark.parametrize("n", SETTINGS.ns)
@pytest.mark.parametrize("contender", CONTENDERS, ids=lambda c: c.name)
def test_attention(benchmark, contender, n):
    need = predicted_need(contender, SETTINGS, n, [])
    if need > SETTINGS.memory_budget_bytes:
        pytest.skip(f"{contender.name} at N={n} would need {need / 2**30:.1f} GiB")

    forward = contender.forward_function(SETTINGS, n)
    inputs = measure.make_inputs(SETTINGS, n, contender.layout)
    setup, run = measure.make_step(forward, inputs, SETTINGS.mode)

    def synchronize():  # pytest-benchmark reads a host clock: wait for the GPU around the call
        if SETTINGS.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def prepare():
        state = setup()
        synchronize()
        return (state,), {}

    def target(state):
        run(state)
        synchronize()

    first = measure.time_once(setup, run, SETTINGS.device)  # compiles, if anything does
    steady = measure.time_once(setup, run, SETTINGS.device)  # sizes the rounds
    rounds = min(max(math.ceil(TARGET_SECONDS / max(steady, 1e-6)), 5), 100)
    benchmark.group = f"N={n}"
    benchmark.pedantic(target, setup=prepare, rounds=rounds, warmup_rounds=1)

    stats = getattr(benchmark.stats, "stats", None)  # None under --benchmark-disable
    measurement = {"median_s": stats.median} if stats else {}
    row = make_row(contender.name, n, SETTINGS, "ok", measurement=measurement)
    benchmark.extra_info.update(
        settings=SETTINGS.describe(), flops=row["flops"],
        gflops_per_s=row["flops_per_s"] / 1e9 if row["flops_per_s"] else None,
        first_call_s=first,
        peak_memory_bytes=measure.peak_memory(setup, run, SETTINGS.device),
    )
