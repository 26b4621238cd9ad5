"""`attnkit bench`: its arguments, and the run that ties sweep, report and charts together."""

from __future__ import annotations

import argparse
import datetime
import os
import sys

from .accounting import MODES, format_bytes
from .settings import DEFAULTS, DEVICES, DTYPES

RESULTS_JSON, RESULTS_CSV = "results.json", "results.csv"
DEFAULT_OUT = os.path.join("bench", "out")


def sequence_lengths(text):
    """'256,1000' -> [256, 1000]; 'A..B' -> A, 2A, 4A, ... up to B."""
    lengths = []
    for part in (p.strip() for p in text.split(",")):
        try:
            if ".." in part:
                low, high = (int(x) for x in part.split(".."))
                if low < 1 or high < low:
                    raise ValueError
                while low <= high:
                    lengths.append(low)
                    low *= 2
            elif part:
                lengths.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected positive integers or ranges A..B, comma-separated; got {text!r}") from None
    if not lengths or min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers; got {text!r}")
    return lengths


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive number; got {text!r}")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _backend_names(text):
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected backend names, comma-separated, or all")
    return "all" if names == ["all"] else names


def add_bench_parser(subparsers):
    cpu, cuda = DEFAULTS["cpu"], DEFAULTS["cuda"]

    def both(key, show=str):
        return f"default {show(cpu[key])} on cpu, {show(cuda[key])} on cuda"

    def lengths(ns):
        return f"{ns[0]}..{ns[-1]}"

    parser = subparsers.add_parser(
        "bench",
        help="time attnkit's backends and their peers as sequence length grows",
        description="Sweep sequence length N over attnkit's backends and the peers on this "
                    "machine (torch SDPA kernels, FlexAttention, flash-attn). Prints a table, "
                    "writes results.json, results.csv and PNG charts into --out.",
    )
    parser.add_argument("--device", choices=DEVICES, help="default cuda when available, else cpu")
    parser.add_argument("--n", type=sequence_lengths, metavar="LIST",
                        help="sequence lengths: comma-separated, A..B doubles from A to B "
                             f"({both('ns', lengths)})")
    parser.add_argument("--backends", type=_backend_names, metavar="LIST",
                        help="comma-separated attnkit backends and peers, or all "
                             "(default: everything available here except slow-to-compile peers)")
    parser.add_argument("--dtype", choices=DTYPES, help=both("dtype"))
    parser.add_argument("--batch", type=_positive(int), help=both("batch"))
    parser.add_argument("--heads", type=_positive(int), help=both("heads"))
    parser.add_argument("--kv-heads", type=_positive(int),
                        help="heads of k and v, a divisor of --heads (grouped-query attention; "
                             "default as many as --heads)")
    parser.add_argument("--head-dim", type=_positive(int), help=both("head_dim"))
    parser.add_argument("--query-len", type=_positive(int), default=None,
                        help="keep this many queries while N, the keys, grows (1: decode against an N-token "
                             "cache; default: as many queries as keys)")
    parser.add_argument("--causal", action="store_true", help="causal (top-left) masking")
    parser.add_argument("--mode", choices=MODES, default="forward",
                        help="time the forward pass, the backward pass, or both (default forward)")
    parser.add_argument("--repeats", type=_positive(int),
                        help=f"timed calls per point at least ({both('min_repeats')})")
    parser.add_argument("--min-time", type=_positive(float), metavar="SECONDS",
                        help=f"keep timing a point until its calls add up to this "
                             f"({both('min_time_s')})")
    parser.add_argument("--rounds", type=_positive(int), default=1,
                        help="measure every point this many times, the contenders taking turns "
                             "(A B A B ...), and pool the timings: on a machine whose speed "
                             "drifts, each contender sees the same conditions (default 1)")
    parser.add_argument("--time-limit", type=_positive(float), metavar="SECONDS",
                        help="skip a point whose call is predicted to take longer "
                             f"({both('time_limit_s')})")
    parser.add_argument("--memory-budget", type=_positive(float), metavar="GIB",
                        help="skip a point predicted to need more memory (default half the "
                             "available RAM on cpu, 90%% of the GPU's memory on cuda)")
    parser.add_argument("--out", metavar="DIR",
                        help=f"folder for results.json, results.csv and the charts "
                             f"(default {DEFAULT_OUT})")
    parser.add_argument("--plot", metavar="RESULTS_JSON",
                        help="draw the charts and table of saved results (even of an interrupted "
                             "run) instead of measuring; charts go beside the file unless --out is given")
    parser.add_argument("--ladder", action="store_true",
                        help="instead of the sweep, time the optimisation ladder (loops -> NumPy -> "
                             "Numba rows -> tiles -> exp2 -> threads -> Triton) on one input of "
                             "--n (default 512), --heads (default 2), --head-dim (default 64); "
                             "writes ladder.json and ladder.png into --out")
    parser.set_defaults(handler=_run_bench, bench_parser=parser)


def _settings(args, parser):
    from .settings import Settings, default_device, default_memory_budget

    device = args.device or default_device()
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device here")
    defaults = DEFAULTS[device]
    chosen = {
        "dtype": args.dtype, "batch": args.batch, "heads": args.heads, "head_dim": args.head_dim,
        "ns": args.n, "min_repeats": args.repeats, "min_time_s": args.min_time,
        "time_limit_s": args.time_limit,
    }
    values = {**defaults, **{key: value for key, value in chosen.items() if value is not None}}
    budget = (int(args.memory_budget * 2**30) if args.memory_budget
              else default_memory_budget(device))
    if args.kv_heads and values["heads"] % args.kv_heads:
        parser.error(f"--kv-heads must divide --heads ({values['heads']}); got {args.kv_heads}")
    return Settings(device=device, causal=args.causal, mode=args.mode, kv_heads=args.kv_heads,
                    query_len=args.query_len, memory_budget_bytes=budget, rounds=args.rounds, **values)


def _options(args):
    return {key: value for key, value in vars(args).items()
            if key not in ("handler", "bench_parser", "command")}


def _machine_line(machine, device):
    """'Intel Xeon (2 cores), torch 2.13.0, numpy 2.4.6' or the GPU's name on cuda."""
    cpu = machine["cpu"]
    devices = machine["cuda"]["devices"]
    where = (devices[0]["name"] if device == "cuda" and devices
             else f"{cpu['model']} ({cpu['logical_cores']} cores)")
    versions = machine["versions"]
    return f"{where}, torch {versions['torch']}, numpy {versions['numpy']}"


def _now():
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _write_outputs(document, out_dir):
    from . import report

    report.write_json(document, os.path.join(out_dir, RESULTS_JSON))
    report.write_csv(document, os.path.join(out_dir, RESULTS_CSV))


def _replot(args, parser):
    from . import plots, report

    try:
        document = report.load_json(args.plot)
    except (OSError, ValueError) as error:
        parser.error(f"--plot: {error}")
    out_dir = args.out or os.path.dirname(args.plot) or "."
    print(report.format_table(document["results"]))
    print(report.format_summary(document))
    for path in plots.plot(document, out_dir):
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _run_bench(args):
    parser = args.bench_parser
    if args.plot:
        return _replot(args, parser)
    if args.ladder:
        from . import ladder

        if args.n and len(args.n) != 1:
            parser.error("--ladder runs one input: give a single --n")
        ignored = [flag for flag, given in (
            ("--kv-heads", args.kv_heads), ("--query-len", args.query_len), ("--causal", args.causal),
            ("--mode", args.mode != "forward"),
            ("--dtype", args.dtype), ("--batch", args.batch), ("--backends", args.backends),
            ("--rounds", args.rounds != 1)) if given]
        if ignored:
            parser.error(f"--ladder times one non-causal float32 forward input (batch 1) on every rung; "
                         f"it takes no {', '.join(ignored)}")
        return ladder.main(n=args.n[0] if args.n else 512, heads=args.heads or 2,
                           head_dim=args.head_dim or 64, repeats=args.repeats or 3,
                           out_dir=args.out or DEFAULT_OUT)

    from tqdm import tqdm

    from ..info import collect
    from . import contenders as contenders_module
    from . import plots, report
    from .measure import machine_load, matmul_rate, memory_method, read_bandwidth
    from .sweep import select_contenders, sweep
    from .worker import WorkerPool

    settings = _settings(args, parser)
    try:
        to_run, left_out = select_contenders(settings, contenders_module.all_contenders(),
                                             args.backends)
    except ValueError as error:
        parser.error(str(error))
    if not to_run:
        parser.error("no backend can run this sweep here: " +
                     "; ".join(f"{name}: {reason}" for name, reason in left_out))
    out_dir = args.out or DEFAULT_OUT
    os.makedirs(out_dir, exist_ok=True)

    machine = collect()
    print(f"attnkit bench: {settings.describe()}, N = {', '.join(map(str, settings.ns))}")
    print(f"on {_machine_line(machine, settings.device)}")
    print(f"memory budget {format_bytes(settings.memory_budget_bytes)}, "
          f"time limit {settings.time_limit_s:g} s per call")
    for name, reason in left_out:
        print(f"  left out {name}: {reason}")
    print("measuring the matrix-multiply roofline", file=sys.stderr)
    document = {
        "schema": report.SCHEMA, "complete": False, "started": _now(), "finished": None,
        "options": _options(args), "settings": settings.as_dict(), "machine": machine,
        "roofline": matmul_rate(settings.device, settings.dtype),
        "bandwidth": read_bandwidth(settings.device) if settings.query_len is not None else None,
        "memory_method": memory_method(settings.device),
        "contenders": {"run": [c.name for c in to_run], "left_out": dict(left_out)},
        "results": [],
    }
    print(report.table_header())

    exit_code = 0
    total = len(settings.ns) * len(to_run) * settings.rounds
    progress = tqdm(total=total, desc="bench", unit="measurement", file=sys.stderr, leave=False,
                    disable=not sys.stderr.isatty())  # a log file gets the table, not progress bars
    try:
        with WorkerPool(settings) as pool:
            def measure(contender, n):
                progress.set_postfix_str(f"{contender.name} N={n}")
                before = machine_load()
                result = pool.measure(contender, n)
                if document["bandwidth"] is not None and result.get("status") == "ok":
                    # the yardstick in turns with the contenders, as they take turns with each other
                    result["read_bytes_per_s"] = read_bandwidth(settings.device)["bytes_per_s"]
                after = machine_load()
                for field, values in ((f, [before[f], after[f]]) for f in before):
                    values = [v for v in values if v is not None]
                    result[field] = max(values) if values else None
                progress.update()
                return result

            for row in sweep(settings, to_run, measure):
                if row["status"] == "skipped":
                    progress.update(settings.rounds)
                document["results"].append(row)
                _write_outputs(document, out_dir)  # so that even a killed run leaves its results
                tqdm.write(report.table_line(row), file=sys.stdout)
        document["complete"] = True
    except KeyboardInterrupt:
        exit_code = 130
    finally:
        progress.close()
        document["finished"] = _now()
        _write_outputs(document, out_dir)

    print()
    print(report.format_summary(document))
    for path in [os.path.join(out_dir, RESULTS_JSON), os.path.join(out_dir, RESULTS_CSV)] + \
            plots.plot(document, out_dir):
        print(f"wrote {path}", file=sys.stderr)
    if exit_code:
        print("attnkit bench: interrupted; the results so far are saved", file=sys.stderr)
    return exit_code
