"""Random ring_attention / ulysses_attention calls on gloo ranks against attnkit.attention on the whole
sequence (outputs, lse, gradients): tests/random_calls.py's idea for attnkit.distributed, whose calls
need a process group, so a run of its own (tests/test_distributed.py holds the fixed cases).

    python tests/random_distributed_calls.py --world 2 --cases 100 [--seed S] [--first I]

A failure names the case; --first I --cases 1 with the same seed runs it again.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Error allowed per unit of the expected values' size (gradients 4x), by dtype
TOLERANCE = {torch.float32: 2e-4, torch.bfloat16: 4e-2, torch.float64: 1e-9}


def draw(rng, world):
    """One call's arguments: method, layout, dtype, shapes (N a whole number of the layout's chunks),
    causal, scale, return_lse."""
    method, layout = ["ring", "ulysses"][rng.integers(2)], ["contiguous", "zigzag"][rng.integers(2)]
    hkv = int(rng.choice([1, 2, 3])) * (world if method == "ulysses" else 1)  # Ulysses splits the heads
    chunks = world * (2 if layout == "zigzag" else 1)
    return dict(
        method=method, layout=layout, dtype=[torch.float32, torch.bfloat16, torch.float64][rng.integers(3)],
        batch=int(rng.integers(1, 3)), hq=hkv * int(rng.choice([1, 2])), hkv=hkv,
        n=chunks * int(rng.choice([1, 3, 8, 17, 40])), d=int(rng.choice([8, 32, 64, 80])),
        causal=bool(rng.random() < 0.5), scale=None if rng.random() < 0.7 else float(rng.uniform(0.1, 1.0)),
        with_lse=bool(rng.random() < 0.5),
    )  # fmt: skip


def run_case(call, seed, index):
    """This rank's part of one case; raises AssertionError on every rank when a result is off."""
    import attnkit
    from attnkit.distributed import ring_attention, shard_sequence, ulysses_attention, unshard_sequence

    generator = torch.Generator().manual_seed(seed * 100_003 + index)
    shapes = [(call["batch"], h, call["n"], call["d"]) for h in (call["hq"], call["hkv"], call["hkv"], call["hq"])]
    q, k, v, d_out = (torch.randn(shape, generator=generator).to(call["dtype"]) for shape in shapes)
    layout, options = call["layout"], dict(causal=call["causal"], scale=call["scale"])

    local = [shard_sequence(x, layout=layout).clone().requires_grad_() for x in (q, k, v)]
    attend = ring_attention if call["method"] == "ring" else ulysses_attention
    out_local, lse_local = attend(*local, layout=layout, return_lse=True, **options)
    out_local.backward(shard_sequence(d_out, layout=layout))
    got = [unshard_sequence(x, layout=layout) for x in (out_local.detach(), *(x.grad for x in local))]
    got.append(unshard_sequence(lse_local[..., None], layout=layout)[..., 0])

    whole = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = attnkit.attention(*whole, return_lse=True, **options)
    out.backward(d_out)
    want = [out.detach(), *(x.grad for x in whole), lse]
    for name, a, e in zip(("out", "dq", "dk", "dv", "lse"), got, want):
        assert a.dtype == e.dtype, f"{name}: {a.dtype}, whole-sequence {e.dtype}"
        error, size = (a.double() - e.double()).abs().max().item(), max(1.0, e.double().abs().max().item())
        allowed = TOLERANCE[call["dtype"]] * size * (4 if name.startswith("d") else 1)
        assert error <= allowed, f"{name}: error {error:.3g} > {allowed:.3g}"


def rank_main(rank, world, port, seed, first, cases, failures):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    import numba

    numba.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}",
                            timeout=datetime.timedelta(seconds=120))  # fmt: skip
    try:
        for index in range(first, first + cases):
            call = draw(np.random.default_rng([seed, index]), world)
            try:
                run_case(call, seed, index)
            except AssertionError as error:
                if rank == 0:
                    failures.put(index)
                    print(f"FAIL case {index} (world {world}) {call}\n  {error}", flush=True)
    finally:
        dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2, help="ranks (default 2)")
    parser.add_argument("--cases", type=int, default=50)
    parser.add_argument("--seed", type=int, default=None, help="the run's seed (default: a new one)")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--port", type=int, default=29517)
    args = parser.parse_args(argv)
    if args.world < 2:
        parser.error(f"--world must be at least 2; got {args.world}")
    seed = np.random.SeedSequence().entropy % 2**32 if args.seed is None else args.seed
    failures = mp.get_context("spawn").SimpleQueue()
    mp.spawn(rank_main, args=(args.world, args.port, seed, args.first, args.cases, failures), nprocs=args.world)
    failed = []
    while not failures.empty():
        failed.append(failures.get())
    print(f"{args.cases} cases from {args.first} on {args.world} ranks, seed {seed}: {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
