"""Attention dropout, forward and backward: attnkit against torch's SDPA, and what dropout costs attnkit.

    python -m attnkit.bench.dropout [--rounds 7]

For each case three contenders take turns in one process: attnkit with dropout, torch's
scaled_dot_product_attention with the same dropout_p, and attnkit without dropout. Each call is a
forward and a backward (out.sum().backward()). Prints the medians, torch's time over attnkit's
(above 1: attnkit is faster) and dropout's cost to attnkit (with / without - 1).
"""

from __future__ import annotations

import argparse
import statistics
import time

CASES = [  # (label, dtype, B, Hq, Hkv, N, D, causal, dropout_p)
    ("flash-attn test shape", "float16", 60, 4, 4, 97, 64, False, 0.17),
    ("BERT layer, 16x128", "float32", 16, 12, 12, 128, 32, False, 0.1),
    ("causal prefill", "float32", 1, 8, 8, 1024, 64, True, 0.1),
    ("causal prefill bf16", "bfloat16", 1, 8, 8, 1024, 64, True, 0.1),
]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m attnkit.bench.dropout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1; got {args.rounds}")
    import torch
    import torch.nn.functional as F

    import attnkit

    print("| case | attnkit with dropout | torch sdpa with dropout | torch / attnkit | attnkit without | dropout's cost |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, dtype, b, hq, hkv, n, d, causal, p in CASES:
        g = torch.Generator().manual_seed(0)
        dt = getattr(torch, dtype)
        q = torch.randn(b, hq, n, d, generator=g).to(dt).requires_grad_()
        k, v = (torch.randn(b, hkv, n, d, generator=g).to(dt).requires_grad_() for _ in range(2))
        contenders = {
            "attnkit": lambda: attnkit.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal),
            "torch": lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal),
            "attnkit without": lambda: attnkit.scaled_dot_product_attention(q, k, v, is_causal=causal),
        }
        times = {name: [] for name in contenders}
        for fn in contenders.values():  # compile, warm
            fn().float().sum().backward()
        start = time.perf_counter()
        contenders["attnkit"]().float().sum().backward()
        repeats = max(1, int(0.2 / max(time.perf_counter() - start, 1e-6)))
        for _ in range(args.rounds):
            for name, fn in contenders.items():
                start = time.perf_counter()
                for _ in range(repeats):
                    fn().float().sum().backward()
                times[name].append((time.perf_counter() - start) / repeats)
        ours, theirs, plain = (statistics.median(times[name]) for name in contenders)
        shape = f"{label}: B{b} H{hq} N{n} D{d} {dtype}" + (" causal" if causal else "") + f", p={p}"
        print(f"| {shape} | {1e3 * ours:.2f} ms | {1e3 * theirs:.2f} ms | {theirs / ours:.2f}× | "
              f"{1e3 * plain:.2f} ms | {100 * (ours / plain - 1):+.1f}% |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
