"""A training step with a learned additive bias (T5's position bias as SDPA's attn_mask): attnkit
against torch's SDPA, with and without the bias's gradient, taking turns in one process.

    python -m attnkit.bench.mask_gradient [--shape 2,8,512,64] [--dtype float32] [--dropout 0.1] [--rounds 7]

Each step: the forward with the (1, H, N, N) bias, then the backward of out.sum(). Prints the
median step of each contender, and what the kernels' host-side plan of the bias costs a call.
attnkit computes the bias's gradient with the NumPy specification beside its kernels' backward
(README: the mask), which this measures.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main(argv=None):
    import torch

    import attnkit

    parser = argparse.ArgumentParser(prog="python -m attnkit.bench.mask_gradient", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="2,8,512,64", metavar="B,H,N,D")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--dropout", type=float, default=0.0, help="attention dropout (T5 trains with 0.1)")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    try:
        batch, heads, n, d = (int(part) for part in args.shape.split(","))
    except ValueError:
        parser.error(f"--shape must be B,H,N,D integers; got {args.shape!r}")
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, n, d, generator=generator).to(dtype).requires_grad_() for _ in range(3))
    bias = torch.randn(1, heads, n, n, generator=generator).to(dtype)
    contenders = {"attnkit": attnkit.scaled_dot_product_attention,
                  "torch": torch.nn.functional.scaled_dot_product_attention}  # fmt: skip

    def step(function, bias_grad):
        mask = bias.clone().requires_grad_(bias_grad)
        function(q, k, v, attn_mask=mask, dropout_p=args.dropout).sum().backward()

    attnkit.warmup([args.dtype])
    times = {}
    for round_ in range(args.rounds + 1):  # the first round warms up, uncounted
        for name, function in contenders.items():
            for bias_grad in (False, True):
                start = time.perf_counter()
                step(function, bias_grad)
                if round_:
                    times.setdefault((name, bias_grad), []).append(time.perf_counter() - start)
    print(f"B{batch} H{heads} N{n} D{d} {args.dtype}, a (1, H, N, N) bias, dropout {args.dropout}; "
          f"median of {args.rounds} steps")
    print("| contender | bias without grad | bias with grad |")
    print("| --- | ---: | ---: |")
    for name in contenders:
        cells = [f"{1e3 * statistics.median(times[name, grad]):.1f} ms" for grad in (False, True)]
        print(f"| {name} | {cells[0]} | {cells[1]} |")
    # The host-side summary of the bias the kernels' forward makes (and the backward again)
    from attnkit.kernels.numba_attention import plan_mask

    bias_array = bias.float().numpy()
    plans = []
    for _ in range(args.rounds * 3):
        start = time.perf_counter()
        plan_mask(bias_array, n, n)
        plans.append(time.perf_counter() - start)
    print(f"the kernels' mask plan of the bias: {1e3 * statistics.median(plans):.2f} ms a call (median of "
          f"{len(plans)}; once in the forward, once in the backward)")


if __name__ == "__main__":
    main()
