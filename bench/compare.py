"""One markdown table comparing a backend with its peers across saved `attnkit bench` runs.

    python -m attnkit.bench.compare bench/results/cpu-numba-vs-torch/*/results.json \
        [--subject numba] [--peers torch-sdpa-flash,reference]

Each row is one (run, N): the subject's GFLOP/s, each peer's (with --best: only the
fastest peer's, named), the speed ratio
subject / peer (time of the peer over time of the subject, from the medians of
the same run), and the subject's peak extra memory. Runs measured with
`--rounds` > 1 had the contenders take turns, so their ratios are the fair ones
on a machine whose speed drifts. The figures are read from results.json as
written by the bench; nothing is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import os

from .accounting import format_bytes


def _runs(paths):
    for path in paths:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
        yield os.path.basename(os.path.dirname(os.path.abspath(path))), document


def _ok(rows, backend, n):
    for row in rows:
        if row["backend"] == backend and row["N"] == n and row["status"] == "ok":
            return row
    return None


def table(paths, subject, peers):
    """The markdown table (a string) for the results.json files in `paths`."""
    header = ["run", "mode", "N", f"{subject} GFLOP/s"]
    for peer in peers:
        header += [f"{peer} GFLOP/s", f"{subject} / {peer}"]
    header += [f"{subject} peak extra memory", "rounds"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, document in _runs(paths):
        rows = document["results"]
        settings = document["settings"]
        for n in settings["ns"]:
            mine = _ok(rows, subject, n)
            if mine is None:
                continue
            cells = [name, settings["mode"], str(n), f"{mine['flops_per_s'] / 1e9:.1f}"]
            for peer in peers:
                theirs = _ok(rows, peer, n)
                if theirs is None:
                    cells += ["–", "–"]
                else:
                    cells += [f"{theirs['flops_per_s'] / 1e9:.1f}", f"{theirs['median_s'] / mine['median_s']:.2f}×"]
            memory = mine.get("peak_memory_bytes")
            cells += [format_bytes(memory) if memory is not None else "–", str(settings.get("rounds", 1))]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_peer_table(paths, subject, peers):
    """One line per (run, N): the subject against the fastest of `peers` measured at that point."""
    lines = [f"| run | N | {subject} GFLOP/s | fastest peer | its GFLOP/s | {subject} / fastest peer |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, document in _runs(paths):
        rows = document["results"]
        for n in document["settings"]["ns"]:
            mine = _ok(rows, subject, n)
            theirs = [row for row in (_ok(rows, peer, n) for peer in peers) if row is not None]
            if mine is None or not theirs:
                continue
            best = min(theirs, key=lambda row: row["median_s"])
            lines.append(f"| {name} | {n} | {mine['flops_per_s'] / 1e9:.1f} | {best['backend']} | "
                         f"{best['flops_per_s'] / 1e9:.1f} | {best['median_s'] / mine['median_s']:.2f}× |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m attnkit.bench.compare", description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", help="results.json files written by attnkit bench")
    parser.add_argument("--subject", default="numba", help="the backend compared (default numba)")
    parser.add_argument("--peers", default="torch-sdpa-flash,reference",
                        help="comma-separated peers (default torch-sdpa-flash,reference)")
    parser.add_argument("--best", action="store_true",
                        help="one column for the fastest peer at each point instead of one per peer")
    args = parser.parse_args(argv)
    for path in args.results:
        if not os.path.isfile(path):
            parser.error(f"results: no such file {path!r}")
    peers = [p for p in args.peers.split(",") if p]
    print((best_peer_table if args.best else table)(args.results, args.subject, peers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
