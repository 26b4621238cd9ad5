"""`attnkit bench`: its arguments and what it runs."""

from __future__ import annotations

import argparse
import sys


def _positive_ints(text):
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_bench_parser(subparsers):
    parser = subparsers.add_parser(
        "bench", help="time attnkit's backends against torch SDPA as sequence length grows"
    )
    parser.add_argument("--n", type=_positive_ints, default=[256, 512, 1024, 2048],
                        help="sequence lengths, comma-separated (default 256,512,1024,2048)")
    parser.add_argument("--backends", default="reference,torch-sdpa",
                        help="comma-separated: attnkit backends and peers (default reference,torch-sdpa)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per point (default 5)")
    parser.add_argument("--json", dest="json_path", metavar="PATH", help="also write results as JSON")
    parser.set_defaults(handler=_run_bench)


def _run_bench(args):
    from .. import available_backends
    from .sweep import PEERS, format_table, run_sweep, save_json
    from ..info import collect

    known = list(available_backends()) + list(PEERS)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in known]
    if unknown:
        print(f"attnkit bench: unknown backend(s) {', '.join(unknown)}; choose from {', '.join(known)}",
              file=sys.stderr)
        return 2
    for name in ("batch", "heads", "head_dim", "repeats"):
        if getattr(args, name) < 1:
            print(f"attnkit bench: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    rows = run_sweep(args.n, backends, batch=args.batch, heads=args.heads,
                     head_dim=args.head_dim, causal=args.causal, repeats=args.repeats)
    print(f"forward, float32, B={args.batch}, H={args.heads}, D={args.head_dim}, "
          f"causal={args.causal}")
    print(format_table(rows))
    if args.json_path:
        save_json(rows, args.json_path, collect())
        print(f"wrote {args.json_path}", file=sys.stderr)
    return 0
