"""attnkit and torch on a machine that is doing something else: each one's slowdown against the quiet machine.

    python -m attnkit.bench.busy_machine [--seconds 6] [--block-seconds 0.25] [--loads spin torch attnkit]
        [--json FILE]

The cases are #24's (fp32 B1 H8 N256 D64; fp32 and bf16 B1 H8 N2048 D64 causal; fp32 decode B4
GQA 32/8 Nk4096 D128), each called through scaled_dot_product_attention, attnkit and torch taking
turns in this process for --seconds per case, a block of calls each (measure: the first call of a
block is not counted). They are measured on the quiet machine, then beside
each load, a second process started for the purpose:
  spin     one Python process spinning (one core taken);
  torch    torch's SDPA, fp32 B1 H8 N1024 D64, in a loop on 2 threads;
  attnkit  attnkit's, the same call, in a loop (two processes each running attnkit);
then on the quiet machine again. A contender's slowdown is its median beside the load over its
quiet median (the mean of the two quiet rounds). #24's target: attnkit's slowdown at most
max(1.25 x torch's, 2.5).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = {  # name -> (dtype, B, Hq, Hkv, Nq, Nk, D, causal)
    "fp32 B1 H8 N256 D64": ("float32", 1, 8, 8, 256, 256, 64, False),
    "fp32 B1 H8 N2048 D64 causal": ("float32", 1, 8, 8, 2048, 2048, 64, True),
    "bf16 B1 H8 N2048 D64 causal": ("bfloat16", 1, 8, 8, 2048, 2048, 64, True),
    "fp32 decode B4 GQA 32/8 Nk4096 D128": ("float32", 4, 32, 8, 1, 4096, 128, False),
}

_LOAD_SETUP = "import torch\ntorch.set_num_threads(2)\nq = torch.randn(1, 8, 1024, 64)\n"
LOADS = {  # name -> the code the load process runs
    "spin": "while True:\n    pass\n",
    "torch": _LOAD_SETUP + "import torch.nn.functional as F\nwhile True:\n    F.scaled_dot_product_attention(q, q, q)\n",
    "attnkit": _LOAD_SETUP + "import attnkit\nwhile True:\n    attnkit.scaled_dot_product_attention(q, q, q)\n",
}
TARGET_FACTOR, TARGET_FLOOR = 1.25, 2.5
BLOCK_SECONDS = 0.25  # a contender's turn (measure)


def _inputs(torch, case):
    dtype, batch, hq, hkv, nq, nk, d, _ = case
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(batch, hq, nq, d, generator=generator).to(getattr(torch, dtype))
    k, v = (torch.randn(batch, hkv, nk, d, generator=generator).to(q.dtype) for _ in range(2))
    return q, k, v


def measure(seconds, block_seconds=BLOCK_SECONDS):
    """{case: (attnkit median s, torch median s)}, the two taking turns for `seconds` per case.

    A turn is a block of calls of one contender lasting block_seconds (at least 3 calls), and the
    first call of each block is not counted: the other contender's threads may still be spinning
    then. Taking turns call by call, each one's calls ran beside the other's spinning threads: fp32
    decode B4 GQA 32/8 Nk4096 beside a spinning process took 8.4 ms alone and 13.5 ms taking turns
    with torch's SDPA (torch's own 31.3 ms) (bench/results/busy-machine.md)."""
    import torch
    import torch.nn.functional as F

    import attnkit

    medians = {}
    for name, case in CASES.items():
        q, k, v = _inputs(torch, case)
        causal = case[-1]
        contenders = (
            lambda: attnkit.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True),
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True),
        )
        for call in contenders:
            call()
        times = ([], [])
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(times[0]) < 3:
            for call, samples in zip(contenders, times):
                call()  # the block's first call: not counted
                block_end = time.perf_counter() + block_seconds
                n_calls = 0
                while n_calls < 3 or time.perf_counter() < block_end:
                    start = time.perf_counter()
                    call()
                    samples.append(time.perf_counter() - start)
                    n_calls += 1
        medians[name] = tuple(statistics.median(samples) for samples in times)
    return medians


def _start_load(load):
    process = subprocess.Popen([sys.executable, "-c", LOADS[load]], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(5)  # imported, compiled or loaded from the cache, and running
    if process.poll() is not None:
        raise RuntimeError(f"the {load!r} load process exited with status {process.returncode}")
    return process


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m attnkit.bench.busy_machine",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument("--seconds", type=float, default=6.0, help="per case and situation (default 6)")
    parser.add_argument("--loads", nargs="+", choices=list(LOADS), default=list(LOADS))
    parser.add_argument("--block-seconds", type=float, default=BLOCK_SECONDS,
                        help=f"a contender's turn, its first call not counted (default {BLOCK_SECONDS})")
    parser.add_argument("--json", help="also write the medians and slowdowns here")
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error(f"--seconds must be positive; got {args.seconds}")
    if args.block_seconds < 0:
        parser.error(f"--block-seconds must be 0 or more; got {args.block_seconds}")

    import torch  # noqa: F401  - first, as user code imports it (see bench/results/busy-machine.md)

    import attnkit

    attnkit.warmup(("float32", "bfloat16"), backward=False)
    print(f"quiet (1/2)... ({os.cpu_count()} CPUs)", file=sys.stderr, flush=True)
    quiet_before = measure(args.seconds, args.block_seconds)
    beside = {}
    for load in args.loads:
        print(f"beside {load}...", file=sys.stderr, flush=True)
        process = _start_load(load)
        try:
            beside[load] = measure(args.seconds, args.block_seconds)
        finally:
            process.kill()
            process.wait()
    print("quiet (2/2)...", file=sys.stderr, flush=True)
    quiet_after = measure(args.seconds, args.block_seconds)
    quiet = {name: tuple((a + b) / 2 for a, b in zip(quiet_before[name], quiet_after[name])) for name in CASES}

    header = "| call | quiet: attnkit / torch | " + " | ".join(f"beside {load}: attnkit, torch" for load in args.loads)
    print(header + " |")
    print("| --- | ---: |" + " ---: |" * len(args.loads))
    rows, misses = [], 0
    for name in CASES:
        cells = [f"{1e3 * quiet[name][0]:.2f} / {1e3 * quiet[name][1]:.2f} ms"]
        row = dict(case=name, quiet_attnkit_s=quiet[name][0], quiet_torch_s=quiet[name][1],
                   quiet_before=quiet_before[name], quiet_after=quiet_after[name])  # fmt: skip
        for load in args.loads:
            slow_a, slow_t = (beside[load][name][i] / quiet[name][i] for i in range(2))
            met = slow_a <= max(TARGET_FACTOR * slow_t, TARGET_FLOOR)
            misses += not met
            cells.append(f"x{slow_a:.2f} ({1e3 * beside[load][name][0]:.2f} ms), x{slow_t:.2f}" + ("" if met else " **miss**"))
            row[load] = dict(attnkit_s=beside[load][name][0], torch_s=beside[load][name][1],
                             attnkit_slowdown=slow_a, torch_slowdown=slow_t, target_met=met)  # fmt: skip
        rows.append(row)
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\ntarget: attnkit's slowdown <= max({TARGET_FACTOR} x torch's, {TARGET_FLOOR}); missed on {misses} of "
          f"{len(CASES) * len(args.loads)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(command=" ".join(["python -m attnkit.bench.busy_machine"] + (argv or sys.argv[1:])),
                           cpus=os.cpu_count(), seconds=args.seconds, block_seconds=args.block_seconds,
                           rows=rows), f, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
