"""Rank-side code of tests/test_distributed.py, in a module of its own: spawned processes
import the function they run by its module's name, and this one is importable by name
in them (pytest's pythonpath puts tests/ on sys.path, and spawn hands sys.path on),
where the test module itself, under --import-mode=importlib, is not."""

from __future__ import annotations

import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist

TIMEOUT_S = 60  # per collective (the process group's timeout)


def init(rank, world, port):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    import numba

    numba.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}",
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


# (B, Hq, Hkv, N, D, causal, layout, dtype, method)
CASES = [
    (1, 4, 4, 64, 32, False, "contiguous", torch.float32, "ring"),
    (1, 4, 2, 96, 32, True, "contiguous", torch.float32, "ring"),
    (2, 4, 1, 64, 16, True, "zigzag", torch.float32, "ring"),
    (1, 4, 2, 128, 32, False, "zigzag", torch.float32, "ring"),
    (1, 4, 2, 96, 32, True, "zigzag", torch.bfloat16, "ring"),
    (1, 4, 4, 64, 32, True, "zigzag", torch.float32, "ulysses"),
    (2, 4, 2, 64, 16, False, "contiguous", torch.float32, "ulysses"),
    (1, 4, 2, 64, 32, True, "contiguous", torch.bfloat16, "ulysses"),
    # float64 end to end: the ring merged and accumulated in float32 (errors ~1e-7) before
    (1, 4, 2, 96, 32, True, "zigzag", torch.float64, "ring"),
    (2, 2, 1, 64, 16, False, "contiguous", torch.float64, "ring"),
    (1, 4, 4, 64, 32, True, "zigzag", torch.float64, "ulysses"),
]
# Relative error allowed where the whole-sequence call runs in the same dtype
FULL_PRECISION = {torch.float32: 1e-5, torch.float64: 1e-12}


def check_cases(rank, world, port):
    init(rank, world, port)
    import attnkit
    from attnkit.distributed import ring_attention, shard_sequence, ulysses_attention, unshard_sequence
    from attnkit.testing import torch_attention

    try:
        for index, (b, hq, hkv, n, d, causal, layout, dtype, method) in enumerate(CASES):
            if method == "ulysses" and hq % world:
                continue
            n = n * world // 2  # long enough for 2P zigzag chunks at any world size
            generator = torch.Generator().manual_seed(index)
            full = [torch.randn(b, h, n, d, generator=generator) for h in (hq, hkv, hkv)]
            d_out = torch.randn(b, hq, n, d, generator=generator)
            label = f"case {index} ({method}, {layout}, causal={causal}, {dtype}, world {world})"

            # One process, the whole sequence.
            if dtype in FULL_PRECISION:
                expected_inputs = [x.to(dtype).clone().requires_grad_() for x in full]
                expected = attnkit.attention(*expected_inputs, causal=causal)
            else:
                expected_inputs = [x.to(dtype).double().requires_grad_() for x in full]
                expected = attnkit.attention(*expected_inputs, causal=causal)
                plain_inputs = [x.to(dtype).requires_grad_() for x in full]
                plain, _ = torch_attention(*plain_inputs, scale=d ** -0.5, causal="top_left" if causal else None)
                plain.backward(d_out.to(dtype))
            expected.backward(d_out.to(expected.dtype))

            # This rank's shard, through the distributed path.
            local = [shard_sequence(x.to(dtype), layout=layout).requires_grad_() for x in full]
            fn = ring_attention if method == "ring" else ulysses_attention
            out = fn(*local, causal=causal, layout=layout)
            out.backward(shard_sequence(d_out.to(dtype), layout=layout))
            results = [out] + [x.grad for x in local]
            wanted = [expected] + [x.grad for x in expected_inputs]
            assert unshard_sequence(out.detach(), layout=layout).shape == expected.shape
            for name, got, want_full, factor in zip(("out", "dq", "dk", "dv"), results, wanted, (2, 3, 3, 3)):
                want = shard_sequence(want_full.detach(), layout=layout)
                if dtype in FULL_PRECISION:
                    error, allowed = relative_error(got, want), FULL_PRECISION[dtype]
                    assert got.dtype == dtype, f"{label}: {name} is {got.dtype}"
                    assert error <= allowed, f"{label}: {name} relative error {error:.3g} > {allowed}"
                else:
                    plain_full = plain if name == "out" else plain_inputs["out dq dk dv".split().index(name) - 1].grad
                    plain_error = (shard_sequence(plain_full.detach(), layout=layout).double() - want.double()).abs().max()
                    error = (got.double() - want.double()).abs().max()
                    assert error <= factor * plain_error + 1e-3, (
                        f"{label}: {name} error {error:.3g} > {factor} x plain bf16's {plain_error:.3g}")
        if world == 2:
            check_refusals(rank)
    finally:
        dist.destroy_process_group()


def check_refusals(rank):
    from attnkit.distributed import ring_attention, shard_sequence, ulysses_attention

    x = torch.randn(1, 3, 10, 8)
    with pytest.raises(ValueError, match="must be a multiple of 4"):
        shard_sequence(torch.randn(1, 2, 10, 8), layout="zigzag")
    local = torch.randn(1, 2, 8 + 2 * rank, 8)  # rank 1 holds a different length
    with pytest.raises(ValueError, match="the ranks called with different shapes"):
        ring_attention(local, local, local)
    with pytest.raises(ValueError, match="head count must divide by the number of ranks"):
        ulysses_attention(x, x, x)
    with pytest.raises(ValueError, match="layout must be one of"):
        ring_attention(x, x, x, layout="striped")


def dying_rank(rank, world, port, report):
    init(rank, world, port)
    from attnkit.distributed import ring_attention

    if rank == 1:
        os._exit(0)  # dies without a word
    x = torch.randn(1, 2, 64, 16)
    started = time.monotonic()
    try:
        ring_attention(x, x, x)
    except Exception as error:  # what the survivor sees: gloo's error, within the group's timeout
        with open(report, "w") as f:
            f.write(f"{time.monotonic() - started:.1f} {type(error).__name__}")
        os._exit(0)
    os._exit(3)  # finished as if nothing happened: wrong
