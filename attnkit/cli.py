"""The `attnkit` command line. Each subcommand adds its parser in one function."""

from __future__ import annotations

import argparse
import json
import sys


def _add_info(subparsers):
    parser = subparsers.add_parser(
        "info", help="library versions, CPU, CUDA devices and which backends can run"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(handler=_run_info)


def _run_info(args):
    from .info import collect, format_report

    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="attnkit", description="Exact attention: NumPy specification, fused kernels, benchmarks.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"attnkit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    from .bench.cli import add_bench_parser
    from .viz.cli import add_viz_parser

    for add in (_add_info, add_bench_parser, add_viz_parser):
        add(subparsers)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("attnkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
