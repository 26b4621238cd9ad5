"""A small sequence-length sweep: attnkit's backends against torch's SDPA.

The first, modest form of `attnkit bench`: forward time and achieved FLOP/s per
backend as N grows, on the CPU, printed as a table (progress on stderr) and
optionally saved as JSON.
"""

from __future__ import annotations

import json
import statistics
import time

import numpy as np
from tqdm import tqdm

PEERS = ("torch-sdpa",)


def attention_flops(batch, heads, nq, nk, head_dim, causal=False):
    """Forward FLOPs as everyone counts them: 4 * B * H * Nq * Nk * D, halved if causal."""
    flops = 4 * batch * heads * nq * nk * head_dim
    return flops // 2 if causal else flops


def _runner(name, q, k, v, causal):
    """A no-argument function running one forward pass of `name`."""
    if name == "torch-sdpa":
        import torch
        import torch.nn.functional as F

        tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))

        def run():
            with torch.no_grad():
                F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)

        return run
    import attnkit

    return lambda: attnkit.attention(q, k, v, causal=causal, backend=name)


def time_call(fn, repeats, warmup=1):
    """Median, 20th and 80th percentile wall time of fn() in seconds, after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    cuts = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else times * 4
    return {"median_s": statistics.median(times), "p20_s": cuts[0], "p80_s": cuts[3]}


def run_sweep(ns, backends, *, batch=1, heads=8, head_dim=64, causal=False, repeats=5, seed=0):
    """Time every backend at every N. Returns one dict per (N, backend)."""
    rng = np.random.default_rng(seed)
    rows = []
    points = [(n, name) for n in ns for name in backends]
    for n, name in tqdm(points, desc="bench", unit="point", leave=False):
        q, k, v = (rng.standard_normal((batch, heads, n, head_dim), dtype=np.float32) for _ in range(3))
        row = {"backend": name, "N": n, "batch": batch, "heads": heads, "head_dim": head_dim,
               "causal": causal, "dtype": "float32"}
        try:
            row.update(time_call(_runner(name, q, k, v, causal), repeats))
            flops = attention_flops(batch, heads, n, n, head_dim, causal)
            row["gflops"] = flops / row["median_s"] / 1e9
        except Exception as error:  # one failing point is reported, the sweep goes on
            row["error"] = f"{type(error).__name__}: {error}"
        rows.append(row)
    return rows


def format_table(rows):
    header = f"{'N':>6}  {'backend':<12} {'median ms':>10} {'p20 ms':>9} {'p80 ms':>9} {'GFLOP/s':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['N']:>6}  {r['backend']:<12} failed: {r['error']}")
            continue
        lines.append(
            f"{r['N']:>6}  {r['backend']:<12} {r['median_s'] * 1e3:>10.2f} {r['p20_s'] * 1e3:>9.2f} "
            f"{r['p80_s'] * 1e3:>9.2f} {r['gflops']:>8.1f}"
        )
    return "\n".join(lines)


def save_json(rows, path, machine):
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"machine": machine, "results": rows}, f, indent=2)
