"""Decode on short caches (Nk < 256): attnkit against torch's SDPA, taking turns in one process.

    python -m attnkit.bench.short_decode [--min-keys 16] [--dtype bfloat16] [--shape 4,32,8,4096,128 ...]

--min-keys sets kernels.numba_attention._DECODE_MIN_KEYS for this process (the shortest cache
the decode kernel takes; 256 was the value before #24's change) to compare the two paths.
--shape B,Hq,Hkv,Nk,D (repeatable) replaces the short-cache cases, for long caches too.
Prints the median of 300 calls of each, one query, and the K/V bytes attnkit read per second.
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
    print("| case | attnkit | torch | torch / attnkit | attnkit's K/V read rate |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for batch, hq, hkv, nk, d in cases:
        q = torch.randn(batch, hq, 1, d).to(dtype)
        k, v = torch.randn(batch, hkv, nk, d).to(dtype), torch.randn(batch, hkv, nk, d).to(dtype)
        contenders = (lambda: attnkit.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                      lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        for _ in range(20):
            for call in contenders:
                call()
        times = ([], [])
        for _ in range(args.calls):
            for call, samples in zip(contenders, times):
                start = time.perf_counter()
                call()
                samples.append(time.perf_counter() - start)
        ours, theirs = (1e6 * statistics.median(samples) for samples in times)
        rate = (k.nbytes + v.nbytes) / ours / 1e3  # bytes per microsecond / 1e3: GB/s
        print(f"| B{batch} H{hq}/{hkv} Nk{nk} D{d} {args.dtype} | {ours:.0f} us | {theirs:.0f} us | {theirs / ours:.2f} "
              f"| {rate:.1f} GB/s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
