"""Kernel speed across the CPU kernel's main paths, for comparing two builds of the same code.

    ATTNKIT_LAZY_OPTIMIZATION=0 python -m attnkit.bench.speed_check [--rounds 3]
    ATTNKIT_LAZY_OPTIMIZATION=1 python -m attnkit.bench.speed_check [--rounds 3]

A change to how the kernels compile (kernels/jit.py's switches, an inlining choice) can change
the machine code that runs without changing a line of a kernel. This times one case per path
(prefill fp32 and bf16, a training step, decode from memory and from the cache, GQA and MHA,
tiny calls) on torch tensors through attnkit.scaled_dot_product_attention, kernels compiled or
loaded first. Each figure is the lowest of `--rounds` medians. The machine drifts: run the two
builds in alternate processes, several pairs, each with its own NUMBA_CACHE_DIR, and compare
the pairs (kernel log v59 did so).
"""

from __future__ import annotations

import argparse
import statistics
import time

# (name, q shape, kv shape, dtype, causal, backward, calls per median)
CASES = [
    ("fp32 causal B1 H8 N2048 D64", (1, 8, 2048, 64), (1, 8, 2048, 64), "float32", True, False, 15),
    ("bf16 causal B1 H8 N2048 D64", (1, 8, 2048, 64), (1, 8, 2048, 64), "bfloat16", True, False, 15),
    ("fp32 causal forward + backward B1 H8 N1024 D64", (1, 8, 1024, 64), (1, 8, 1024, 64), "float32", True, True, 10),
    ("fp32 decode B4 H32/8 Nk4096 D128", (4, 32, 1, 128), (4, 8, 4096, 128), "float32", False, False, 40),
    ("bf16 decode B4 H32/8 Nk4096 D128", (4, 32, 1, 128), (4, 8, 4096, 128), "bfloat16", False, False, 40),
    ("fp32 decode B4 H32/8 Nk512 D128", (4, 32, 1, 128), (4, 8, 512, 128), "float32", False, False, 200),
    ("bf16 decode B4 H32/32 Nk64 D128", (4, 32, 1, 128), (4, 32, 64, 128), "bfloat16", False, False, 300),
    ("fp32 tiny B1 H4 N32 D32", (1, 4, 32, 32), (1, 4, 32, 32), "float32", False, False, 2000),
    ("fp32 tiny B1 H1 N1 D64", (1, 1, 1, 64), (1, 1, 1, 64), "float32", False, False, 3000),
]


def _median_of(call, calls):
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m attnkit.bench.speed_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="medians per case; the lowest is reported (default 3)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1; got {args.rounds}")
    import torch

    import attnkit

    attnkit.warmup()
    generator = torch.Generator().manual_seed(0)
    print("| case | median |\n| --- | ---: |")
    for name, q_shape, kv_shape, dtype, causal, backward, calls in CASES:
        q, k, v = (torch.randn(shape, generator=generator).to(getattr(torch, dtype))
                   for shape in (q_shape, kv_shape, kv_shape))  # fmt: skip
        if backward:
            q, k, v = (x.requires_grad_() for x in (q, k, v))

            def call():
                attnkit.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True).sum().backward()
        else:

            def call():
                attnkit.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

        for _ in range(3):
            call()
        best = min(_median_of(call, calls) for _ in range(args.rounds))
        figure = f"{best * 1e6:.1f} µs" if best < 1e-3 else f"{best * 1e3:.3f} ms"
        print(f"| {name} | {figure} |", flush=True)


if __name__ == "__main__":
    main()
