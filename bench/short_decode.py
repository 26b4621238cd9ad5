"""Decode on short caches (Nk < 256): attnkit against torch's SDPA, taking turns in one process.

    python -m attnkit.bench.short_decode [--min-keys 16] [--dtype bfloat16] [--shape 4,32,8,4096,128 ...] [--layers]

--min-keys sets kernels.numba_attention._DECODE_MIN_KEYS for this process (the shortest cache
the decode kernel takes; 256 was the value before #24's change) to compare the two paths.
--shape B,Hq,Hkv,Nk,D (repeatable) replaces the short-cache cases, for long caches too.
Prints the median of 300 calls of each, one query, and the K/V bytes attnkit read per second.

--layers also times a planned call's layers as the call meets them: right after a kernel has
streamed K and V through the caches, so each layer's code and data come back from memory (a
layer timed in a loop of its own runs from the caches, several times faster). The contenders
take turns call by call: the plan's kernel-level run on NumPy views (ForwardPlan.run, which
enters the compiled kernel), the same after making the views (Tensor.numpy x 3), the same
returning tensors (PlannedCall.run: torch.from_numpy), the whole call (the entry point, its
key and lookup), and torch's SDPA.
"""

from __future__ import annotations

import argparse
import statistics
import time

CASES = [(4, 32, 32, 64, 128), (4, 32, 8, 64, 128), (1, 32, 8, 128, 128), (4, 32, 8, 200, 128)]  # B, Hq, Hkv, Nk, D


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m attnkit.bench.short_decode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--min-keys", type=int, default=None, help="the decode kernel's shortest cache (default: attnkit's)")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--shape", action="append", default=None, metavar="B,Hq,Hkv,Nk,D",
                        help="a case instead of the short-cache ones (repeatable)")
    parser.add_argument("--layers", action="store_true", help="also time a planned call's layers (see above)")
    args = parser.parse_args(argv)
    cases = CASES
    if args.shape:
        try:
            cases = [tuple(int(part) for part in shape.split(",")) for shape in args.shape]
        except ValueError:
            cases = None
        if cases is None or any(len(case) != 5 or min(case) < 1 for case in cases):
            parser.error(f"--shape takes five positive integers B,Hq,Hkv,Nk,D; got {args.shape}")
    import torch
    import torch.nn.functional as F

    import attnkit
    from attnkit.kernels import numba_attention

    if args.min_keys is not None:
        numba_attention._DECODE_MIN_KEYS = args.min_keys
    print(f"decode kernel from Nk >= {numba_attention._DECODE_MIN_KEYS}")
    dtype = getattr(torch, args.dtype)
    layers = []
    print("| case | attnkit | torch | torch / attnkit | attnkit's K/V read rate |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for batch, hq, hkv, nk, d in cases:
        q = torch.randn(batch, hq, 1, d).to(dtype)
        k, v = torch.randn(batch, hkv, nk, d).to(dtype), torch.randn(batch, hkv, nk, d).to(dtype)
        contenders = (lambda: attnkit.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                      lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        ours, theirs = _medians_us(contenders, args.calls)
        rate = (k.nbytes + v.nbytes) / ours / 1e3  # bytes per microsecond / 1e3: GB/s
        print(f"| B{batch} H{hq}/{hkv} Nk{nk} D{d} {args.dtype} | {ours:.0f} us | {theirs:.0f} us | {theirs / ours:.2f} "
              f"| {rate:.1f} GB/s |")
        if args.layers:
            layers.append((f"B{batch} H{hq}/{hkv} Nk{nk} D{d} {args.dtype}", _layers(q, k, v, args.calls)))
    if args.layers:
        print("\nA planned call's layers, each right after a kernel call (median us; + what the layer adds):\n")
        print("| case | kernel-level run | + NumPy views | + result tensors | whole call | torch |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name, times in layers:
            base = times[0]
            cells = [f"{times[0]:.0f}"] + [f"{t:.0f} (+{t - base:.0f})" for t in times[1:4]] + [f"{times[4]:.0f}"]
            print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


def _layers(q, k, v, n_calls):
    """Median µs of each layer of a planned decode call, the contenders taking turns call by call."""
    import torch.nn.functional as F

    import attnkit
    from attnkit import planned

    def whole():
        return attnkit.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    whole()
    options = ("sdpa", False, None, type(None), True, "auto")  # the entry point's key options for this call
    call = planned.lookup(planned.key(options, q, k, v))
    if call is None:
        raise SystemExit("short_decode --layers: the call was not planned")
    arrays = planned._arrays(q, k, v)
    contenders = (
        lambda: call.plan.run(*arrays[:3]),
        lambda: call.plan.run(*planned._arrays(q, k, v)[:3]),
        lambda: call.run(planned._arrays(q, k, v), False),
        whole,
        lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
    )  # fmt: skip
    return _medians_us(contenders, n_calls)


def _medians_us(contenders, n_calls):
    """Each contender's median µs over n_calls calls, the contenders taking turns call by call
    (after 20 calls each to warm up)."""
    for _ in range(20):
        for contender in contenders:
            contender()
    times = [[] for _ in contenders]
    for _ in range(n_calls):
        for contender, samples in zip(contenders, times):
            start = time.perf_counter()
            contender()
            samples.append(time.perf_counter() - start)
    return [1e6 * statistics.median(samples) for samples in times]


if __name__ == "__main__":
    raise SystemExit(main())
