"""Attention dropout, forward and backward: attnkit against torch's SDPA, and what dropout costs attnkit.

    python -m attnkit.bench.dropout [--rounds 7]

For each case four contenders take turns in one process: attnkit and torch's
scaled_dot_product_attention, each with the case's dropout_p and without dropout. Each call is a
forward and a backward (out.sum().backward()). Prints the medians, torch's time over attnkit's
(above 1: attnkit is faster) with and without dropout, and dropout's cost to attnkit (with /
without - 1). The BERT case passes the padding mask transformers builds (half the batch padded to
64 of 128 tokens).
"""

from __future__ import annotations

import argparse
import statistics
import time

CASES = [  # (label, dtype, B, Hq, Hkv, N, D, causal, dropout_p, padded)
    ("flash-attn test shape", "float16", 60, 4, 4, 97, 64, False, 0.17, False),
    ("BERT layer, 16x128", "float32", 16, 12, 12, 128, 32, False, 0.1, True),
    ("causal prefill", "float32", 1, 8, 8, 1024, 64, True, 0.1, False),
    ("causal prefill bf16", "bfloat16", 1, 8, 8, 1024, 64, True, 0.1, False),
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

    print("| case | attnkit with dropout | torch with dropout | torch / attnkit | attnkit without | torch without "
          "| torch / attnkit without | dropout's cost to attnkit |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, dtype, b, hq, hkv, n, d, causal, p, padded in CASES:
        g = torch.Generator().manual_seed(0)
        dt = getattr(torch, dtype)
        q = torch.randn(b, hq, n, d, generator=g).to(dt).requires_grad_()
        k, v = (torch.randn(b, hkv, n, d, generator=g).to(dt).requires_grad_() for _ in range(2))
        mask = None
        if padded:  # (B, 1, N, N) bool, as transformers passes it: the second half of the batch padded
            mask = torch.ones(b, 1, n, n, dtype=torch.bool)
            mask[b // 2 :, :, :, n // 2 :] = False
        options = dict(attn_mask=mask, is_causal=causal)
        contenders = {
            "attnkit": lambda: attnkit.scaled_dot_product_attention(q, k, v, dropout_p=p, **options),
            "torch": lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=p, **options),
            "attnkit without": lambda: attnkit.scaled_dot_product_attention(q, k, v, **options),
            "torch without": lambda: F.scaled_dot_product_attention(q, k, v, **options),
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
        ours, theirs, plain, their_plain = (statistics.median(times[name]) for name in contenders)
        shape = f"{label}: B{b} H{hq} N{n} D{d} {dtype}" + (" causal" if causal else "") + f", p={p}"
        print(f"| {shape} | {1e3 * ours:.2f} ms | {1e3 * theirs:.2f} ms | {theirs / ours:.2f}× | "
              f"{1e3 * plain:.2f} ms | {1e3 * their_plain:.2f} ms | {their_plain / plain:.2f}× | "
              f"{100 * (ours / plain - 1):+.1f}% |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
