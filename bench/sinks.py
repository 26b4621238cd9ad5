"""What learned sinks cost: attnkit.attention with and without `sinks`, taking turns in one process.

    python -m attnkit.bench.sinks [--rounds 7] [--only "tiny fp32" ...]

Cases: B1 H8 N2048 D64 causal forward and forward+backward (fp32 and bf16), a decode step (B4 GQA
32/8, one query against 4096 keys, D128) and a tiny call (B1 H4 N32 D32). Prints each median and the
cost of the sinks (with / without - 1).
"""

from __future__ import annotations

import argparse
import statistics
import time

CASES = [  # (label, dtype, B, Hq, Hkv, Nq, Nk, D, causal, backward)
    ("prefill fp32", "float32", 1, 8, 8, 2048, 2048, 64, True, False),
    ("prefill fp32 fwd+bwd", "float32", 1, 8, 8, 2048, 2048, 64, True, True),
    ("prefill bf16", "bfloat16", 1, 8, 8, 2048, 2048, 64, True, False),
    ("decode fp32", "float32", 4, 32, 8, 1, 4096, 128, False, False),
    ("tiny fp32", "float32", 1, 4, 4, 32, 32, 32, False, False),
]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m attnkit.bench.sinks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", nargs="+", default=None, help="the case labels to run (default: all)")
    args = parser.parse_args(argv)
    import torch

    import attnkit

    print("| case | without sinks | with sinks | cost |")
    print("| --- | ---: | ---: | ---: |")
    for label, dtype, b, hq, hkv, nq, nk, d, causal, backward in CASES:
        if args.only and label not in args.only:
            continue
        g = torch.Generator().manual_seed(0)
        dt = getattr(torch, dtype)
        q = torch.randn(b, hq, nq, d, generator=g).to(dt).requires_grad_(backward)
        k, v = (torch.randn(b, hkv, nk, d, generator=g).to(dt).requires_grad_(backward) for _ in range(2))
        sinks = torch.randn(hq, generator=g).requires_grad_(backward)

        def call(with_sinks):
            out = attnkit.attention(q, k, v, causal=causal, sinks=sinks if with_sinks else None)
            if backward:
                out.float().sum().backward()

        repeats = 200 if nq * nk < 10_000 else 1
        times = {False: [], True: []}
        for with_sinks in (False, True):
            call(with_sinks)  # compile, warm
        for _ in range(args.rounds):
            for with_sinks in (False, True):
                start = time.perf_counter()
                for _ in range(repeats):
                    call(with_sinks)
                times[with_sinks].append((time.perf_counter() - start) / repeats)
        without, with_ = statistics.median(times[False]), statistics.median(times[True])
        unit, scale = ("µs", 1e6) if without < 1e-3 else ("ms", 1e3)
        print(f"| {label} | {scale * without:.1f} {unit} | {scale * with_:.1f} {unit} | {100 * (with_ / without - 1):+.1f}% |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
