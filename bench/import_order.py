"""Does it matter whether attnkit or torch runs first? attnkit and torch SDPA taking turns, in fresh processes.

    python -m attnkit.bench.import_order [--calls 300] [--runs 2]

Each order runs in a process of its own:
  torch-first    `import torch`, then attnkit's first call (what most torch users do);
  attnkit-first  attnkit's first call on NumPy arrays (the kernel loads torch's MKL, Numba starts
                 its OpenMP threads), then `import torch`.
Then attnkit and torch SDPA take turns on fp32 B1 H8 N256 D64 (a call short enough for OpenMP's
spinning threads to matter) and the medians are printed. Both orders should give the same times:
with two OpenMP runtimes in one process (what attnkit-first gave before kernels/cpu_blas.py loaded
torch's global dependencies first), their thread teams spin against each other.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

_CHILD = """
import json, statistics, sys, time
import numpy as np
order, calls = sys.argv[1], int(sys.argv[2])
if order == "torch-first":
    import torch
import attnkit
q = np.random.default_rng(0).standard_normal((1, 8, 256, 64)).astype(np.float32)
attnkit.attention(q, q, q)  # numba_attention loads torch's MKL; Numba starts its threads
import torch
import torch.nn.functional as F
qt = torch.from_numpy(q)
contenders = (lambda: attnkit.scaled_dot_product_attention(qt, qt, qt),
              lambda: F.scaled_dot_product_attention(qt, qt, qt))
for _ in range(20):
    for call in contenders:
        call()
samples = ([], [])
for _ in range(calls):
    for call, times in zip(contenders, samples):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
print(json.dumps([statistics.median(times) for times in samples]))
"""

ORDERS = ("torch-first", "attnkit-first")


def run_order(order, calls):
    """(attnkit median s, torch median s) in a fresh process started in `order`."""
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, order, str(calls)], capture_output=True, text=True, timeout=900
    )
    if result.returncode != 0:
        raise RuntimeError(f"the {order} process failed:\n{result.stderr[-2000:]}")
    return tuple(json.loads(result.stdout.strip().splitlines()[-1]))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m attnkit.bench.import_order", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="calls of each contender per process")
    parser.add_argument("--runs", type=int, default=2, help="processes per order, the orders alternating")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.runs < 1:
        parser.error(f"--calls and --runs must be at least 1; got {args.calls} and {args.runs}")
    print("fp32 B1 H8 N256 D64, attnkit and torch SDPA taking turns (medians)")
    print("| order | run | attnkit | torch |")
    print("| --- | ---: | ---: | ---: |")
    for run in range(1, args.runs + 1):
        for order in ORDERS:
            ours, theirs = run_order(order, args.calls)
            print(f"| {order} | {run} | {ours * 1e3:.2f} ms | {theirs * 1e3:.2f} ms |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
