"""Random calls of every entry point against the float64 reference (tests/random_calls.py), with a new
seed in every run: over runs the suite meets combinations no hand-written case lists. A failure
prints the seed and the command that runs the case again; ATTNKIT_TEST_SEED=N fixes the seed."""

from __future__ import annotations

import os

import numpy as np
import pytest

import random_calls

SEED = int(os.environ.get("ATTNKIT_TEST_SEED") or np.random.SeedSequence().entropy % 2**32)
CASES = {"dense": 40, "varlen": 25, "sdpa": 25, "kv_cache": 25, "flash_attn": 25, "triton_kernel": 10,
         "numpy_arrays": 25, "compiled": 4}


@pytest.mark.parametrize(
    ("entry_point", "index"),
    [(entry_point, index) for entry_point, count in CASES.items() for index in range(count)],
    ids=[f"{entry_point}-{index}" for entry_point, count in CASES.items() for index in range(count)],
)
def test_random_call_matches_the_reference(entry_point, index):
    if entry_point == "triton_kernel":
        pytest.importorskip("triton")  # attnkit[gpu]
    random_calls.run_case(entry_point, SEED, index)


def test_a_case_is_drawn_again_from_its_seed_and_index():
    """What the failure message's command relies on: the same seed and index draw the same call."""
    first, again, other = (random_calls.dense(random_calls.case_generator(SEED, i), False)[0] for i in (3, 3, 4))
    assert first == again
    assert first != other
