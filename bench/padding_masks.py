"""Padding masks as transformers passes them: attnkit against torch's SDPA, taking turns in one process.

    python -m attnkit.bench.padding_masks [--rounds 30] [--shape B H N D]

The call is a BERT fine-tuning step's attention (default MiniLM's: B16 H12 N128 D32, the second
half of the batch padded to N/2), fp32, with the padding given three ways: transformers' additive
(B, 1, N, N) mask of 0 and finfo(float32).min, the same as a boolean mask expanded from (B, 1, 1, N),
and no mask; forward alone and forward + backward (attention dropout 0 and 0.1). Prints medians
and torch's time over attnkit's.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m attnkit.bench.padding_masks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="calls of each contender per case, taking turns")
    parser.add_argument("--shape", type=int, nargs=4, default=(16, 12, 128, 32), metavar=("B", "H", "N", "D"))
    args = parser.parse_args(argv)
    if args.rounds < 1 or min(args.shape) < 1:
        parser.error(f"--rounds and --shape must be positive; got {args.rounds} and {args.shape}")
    import torch
    import torch.nn.functional as F

    import attnkit

    batch, heads, n, d = args.shape
    generator = torch.Generator().manual_seed(0)
    q, k, v, d_out = (torch.randn(batch, heads, n, d, generator=generator) for _ in range(4))
    real = torch.ones(batch, n, dtype=torch.bool)
    real[batch // 2 :, n // 2 :] = False
    additive = torch.zeros(batch, 1, n, n).masked_fill(~real[:, None, None, :], torch.finfo(torch.float32).min)
    masks = {"additive (transformers)": additive, "bool": real[:, None, None, :].expand(batch, 1, n, n), "none": None}
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]

    def forward(fn, mask, p):
        with torch.no_grad():
            fn(q, k, v, attn_mask=mask, dropout_p=p)

    def both(fn, mask, p):
        fn(*leaves, attn_mask=mask, dropout_p=p).backward(d_out)

    print(f"B{batch} H{heads} N{n} D{d} fp32, half the batch padded to N/2; medians of {args.rounds} calls")
    print("| mask | pass | attnkit | torch | torch / attnkit |")
    print("| --- | --- | ---: | ---: | ---: |")
    contenders = (attnkit.scaled_dot_product_attention, F.scaled_dot_product_attention)
    for label, mask in masks.items():
        for pass_name, run, p in (("forward", forward, 0.0), ("fwd+bwd", both, 0.0), ("fwd+bwd, dropout 0.1", both, 0.1)):
            for fn in contenders:
                run(fn, mask, p)  # warm
            samples = ([], [])
            for _ in range(args.rounds):
                for fn, times in zip(contenders, samples):
                    start = time.perf_counter()
                    run(fn, mask, p)
                    times.append(time.perf_counter() - start)
            ours, theirs = (1e3 * statistics.median(times) for times in samples)
            print(f"| {label} | {pass_name} | {ours:.2f} ms | {theirs:.2f} ms | {theirs / ours:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
