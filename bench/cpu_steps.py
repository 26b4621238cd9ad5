"""Training-loop steps on the CPU, in one process: attnkit's numba backend and torch SDPA taking turns.

    python -m attnkit.bench.cpu_steps [--n 1024] [--heads 8] [--kv-heads H] [--head-dim 64]
                                      [--causal] [--threads 2] [--steps 8]

A step is what a training loop does: gradients of the last step dropped, a
forward, then a backward through autograd, on the same inputs every time.
The backward alone is timed (the forward is timed as well), and the minor page
faults of the whole step are counted (getrusage): a kernel whose temporaries
go back to the system every step pays for them again in faults.

Unlike `attnkit bench`, which measures each contender in a process of its own
(for its peak memory), both run here in one process, one step each in turn,
so `--threads 1` compares the two kernels core for core.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import numba
import torch

from . import contenders
from .accounting import attention_flops
from .measure import make_inputs
from .settings import Settings

CONTENDERS = ("numba", "torch-sdpa-flash")


def _faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(n, heads, kv_heads, head_dim, causal, steps, warmup=2):
    """{contender: (forward seconds, backward seconds, faults per step)}, medians over `steps`.

    Inputs and forward functions are the sweep's own (measure.make_inputs,
    contenders.*.forward_function), float32 on the CPU, batch 1.
    """
    settings = Settings(heads=heads, kv_heads=kv_heads, head_dim=head_dim, causal=causal,
                        mode="both", ns=(n,))
    q, k, v, d_out = make_inputs(settings, n)
    forwards = {name: contenders.by_name(name).forward_function(settings, n) for name in CONTENDERS}
    samples = {name: ([], [], []) for name in forwards}
    for step in range(warmup + steps):
        for name, forward in forwards.items():  # taking turns: both see the same drift
            for x in (q, k, v):
                x.grad = None
            faults, start = _faults(), time.perf_counter()
            out = forward(q, k, v)
            middle = time.perf_counter()
            out.backward(d_out)
            end = time.perf_counter()
            if step >= warmup:
                for series, value in zip(samples[name], (middle - start, end - middle, _faults() - faults)):
                    series.append(value)
    return {name: tuple(statistics.median(series) for series in runs) for name, runs in samples.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m attnkit.bench.cpu_steps", description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1024, help="sequence length (default 1024)")
    parser.add_argument("--heads", type=int, default=8, help="query heads (default 8)")
    parser.add_argument("--kv-heads", type=int, help="heads of k and v, a divisor of --heads (default --heads)")
    parser.add_argument("--head-dim", type=int, default=64, help="default 64")
    parser.add_argument("--causal", action="store_true", help="causal (top-left) masking")
    parser.add_argument("--threads", type=int, help="threads for both kernels (default: numba's default)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per contender (default 8)")
    args = parser.parse_args(argv)
    kv_heads = args.kv_heads or args.heads
    for name in ("n", "heads", "kv_heads", "head_dim", "steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}")
    if args.heads % kv_heads:
        parser.error(f"--kv-heads must divide --heads ({args.heads}); got {args.kv_heads}")
    if args.threads is not None and not 1 <= args.threads <= numba.config.NUMBA_NUM_THREADS:
        parser.error(f"--threads must be 1..{numba.config.NUMBA_NUM_THREADS}; got {args.threads}")
    threads_before = numba.get_num_threads(), torch.get_num_threads()
    if args.threads is not None:
        numba.set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    try:
        return _report(args, kv_heads)
    finally:  # main() may run inside another program (the tests): leave its threads as they were
        numba.set_num_threads(threads_before[0])
        torch.set_num_threads(threads_before[1])


def _report(args, kv_heads):
    flops = attention_flops(1, args.heads, args.n, args.n, args.head_dim, args.causal, "backward")
    print(f"steps through autograd: B=1, H={args.heads} (kv {kv_heads}), N={args.n}, D={args.head_dim}, "
          f"{'causal' if args.causal else 'non-causal'}, float32, {numba.get_num_threads()} thread(s), "
          f"median of {args.steps}")
    results = measure(args.n, args.heads, kv_heads, args.head_dim, args.causal, args.steps)
    for name, (forward_s, backward_s, faults) in results.items():
        print(f"  {name:17} forward {forward_s * 1e3:8.2f} ms   backward {backward_s * 1e3:8.2f} ms "
              f"({flops / backward_s / 1e9:6.1f} GFLOP/s)   {faults:7.0f} page faults per step")
    ratio = results["torch-sdpa-flash"][1] / results["numba"][1]
    print(f"  backward: numba {ratio:.2f}x torch (torch's time over numba's)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
