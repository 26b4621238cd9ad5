"""Decode on short caches (Nk < 256): attnkit against torch's SDPA, taking turns in one process.

    python -m attnkit.bench.short_decode [--min-keys 16]

--min-keys sets kernels.numba_attention._DECODE_MIN_KEYS for this process (the shortest cache
the decode kernel takes; 256 was the value before #24's change) to compare the two paths.
Prints the median of 300 calls of each, fp32, one query.
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
    args = parser.parse_args(argv)
    import torch
    import torch.nn.functional as F

    import attnkit
    from attnkit.kernels import numba_attention

    if args.min_keys is not None:
        numba_attention._DECODE_MIN_KEYS = args.min_keys
    print(f"decode kernel from Nk >= {numba_attention._DECODE_MIN_KEYS}")
    print("| case | attnkit | torch | torch / attnkit |")
    print("| --- | ---: | ---: | ---: |")
    for batch, hq, hkv, nk, d in CASES:
        q = torch.randn(batch, hq, 1, d)
        k, v = torch.randn(batch, hkv, nk, d), torch.randn(batch, hkv, nk, d)
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
        print(f"| B{batch} H{hq}/{hkv} Nk{nk} D{d} fp32 | {ours:.0f} us | {theirs:.0f} us | {theirs / ours:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
