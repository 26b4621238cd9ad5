"""Tiny calls: attnkit's planned call against torch's SDPA, taking turns in one process, and where
a planned call's microseconds go.

    python -m attnkit.bench.tiny_calls [--calls 2000] [--rounds 7] [--out bench/results/tiny-calls.json]

Cases: #24's three tiny forward calls (B1 H4 N32 D32, B2 H8 N16 D64, B1 H1 N1 D64) and a decode
step on a short cache (B4 H32 Nk64 D128), fp32, no gradient. Each round times `--calls` calls of
each contender in turn (attnkit on tensors, torch on the same tensors, attnkit on NumPy arrays);
the figure is the round with the lowest mean per call (the machine's noise only ever adds).

The breakdown times each layer of a planned tensor call on its own, the same way: the key
(attnkit.planned.key: made from the NumPy views, so their cost is in it), the NumPy views alone
(Tensor.numpy x 3), the kernel-level plan (ForwardPlan.run: allocation and one kernel entry), of
which the compiled kernel alone, and the result's tensor (torch.from_numpy).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

CASES = [  # (name, q shape, kv shape)
    ("B1 H4 N32 D32", (1, 4, 32, 32), (1, 4, 32, 32)),
    ("B2 H8 N16 D64", (2, 8, 16, 64), (2, 8, 16, 64)),
    ("B1 H1 N1 D64", (1, 1, 1, 64), (1, 1, 1, 64)),
    ("decode B4 H32 Nk64 D128", (4, 32, 1, 128), (4, 32, 64, 128)),
]


def _best_mean_us(calls, n_calls, rounds):
    """Per contender, the lowest per-call mean (µs) over the rounds; contenders take turns each round."""
    for call in calls:
        for _ in range(min(200, n_calls)):
            call()
    best = [float("inf")] * len(calls)
    for _ in range(rounds):
        for i, call in enumerate(calls):
            start = time.perf_counter()
            for _ in range(n_calls):
                call()
            best[i] = min(best[i], (time.perf_counter() - start) / n_calls * 1e6)
    return best


def _kernel_arguments(plan, q, k, v):
    """(the compiled kernel's entry as a planned call enters it, its arguments) of one ForwardPlan.run."""
    kernel_call, serial, caught = plan.kernel_call, plan.serial, []
    plan.run(q, k, v)
    plan.run(q, k, v)  # the second call looks the kernel's entry up (launch.KernelCall)
    entry = kernel_call.entry
    assert entry, "the plan does not enter its kernel directly"
    kernel_call.entry, plan.serial = lambda *arguments: caught.append(arguments) or entry(*arguments), None
    try:
        plan.run(q, k, v)
    finally:
        kernel_call.entry, plan.serial = entry, serial
    return entry, caught[-1]


def measure(n_calls, rounds):
    import numpy as np
    import torch
    import torch.nn.functional as F

    import attnkit
    from attnkit import planned

    rows = []
    for name, q_shape, kv_shape in CASES:
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(q_shape, generator=gen)
        k, v = torch.randn(kv_shape, generator=gen), torch.randn(kv_shape, generator=gen)
        qn, kn, vn = q.numpy(), k.numpy(), v.numpy()
        ours, torch_time, ours_numpy = _best_mean_us(
            [lambda: attnkit.scaled_dot_product_attention(q, k, v),
             lambda: F.scaled_dot_product_attention(q, k, v),
             lambda: attnkit.scaled_dot_product_attention(qn, kn, vn)], n_calls, rounds)  # fmt: skip
        options = ("sdpa", False, None, type(None), False, "auto")
        call = planned.lookup(planned.key(options, q, k, v))
        assert call is not None, "the call was not planned"
        kernel = _kernel_arguments(call.plan, qn, kn, vn)
        out = np.empty(q_shape[:-1] + kv_shape[-1:], np.float32)
        parts = dict(zip(
            ("key", "numpy views", "ForwardPlan.run", "compiled kernel", "result tensor"),
            _best_mean_us([
                lambda: planned.key(options, q, k, v),
                lambda: (q.numpy(), k.numpy(), v.numpy()),
                lambda: call.plan.run(qn, kn, vn),
                lambda: kernel[0](*kernel[1]),
                lambda: torch.from_numpy(out),
            ], n_calls, rounds),
        ))  # fmt: skip
        rows.append(dict(case=name, attnkit_us=ours, torch_us=torch_time, attnkit_numpy_us=ours_numpy,
                         cost_vs_torch=ours / torch_time, parts_us=parts))  # fmt: skip
    return rows


def report(rows):
    lines = ["| case | attnkit (tensors) | torch SDPA | attnkit / torch | attnkit (NumPy) |",
             "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for row in rows:
        lines.append(f"| {row['case']} | {row['attnkit_us']:.1f} µs | {row['torch_us']:.1f} µs | "
                     f"{row['cost_vs_torch']:.2f}× | {row['attnkit_numpy_us']:.1f} µs |")  # fmt: skip
    lines += ["", "Layers of a planned tensor call, each timed alone (µs):", "",
              "| case | key (views included) | NumPy views | ForwardPlan.run | of which the compiled kernel | result tensor |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for row in rows:
        p = row["parts_us"]
        lines.append(f"| {row['case']} | {p['key']:.1f} | {p['numpy views']:.1f} | {p['ForwardPlan.run']:.1f} | "
                     f"{p['compiled kernel']:.1f} | {p['result tensor']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m attnkit.bench.tiny_calls", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per contender per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = measure(args.calls, args.rounds)
    print(report(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(machine=platform.processor() or platform.machine(), torch=torch.__version__,
                           calls=args.calls, rounds=args.rounds, rows=rows), f, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
