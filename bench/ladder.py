"""`attnkit bench --ladder`: every rung of kernels/ladder.py timed on one input.

Each rung is first checked against the float64 reference on that input, then
timed (median of repeats, the first call reported apart as compile time), and
drawn as a bar chart of GFLOP/s with the speed-up over the rung below.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..kernels.ladder import RUNGS, TOLERANCES, bf16_unavailable
from ..reference import attention as reference_attention

TOLERANCE = 1e-4  # float32 rungs against the float64 reference (errors seen: ~4e-7)


def _gpu_reason():
    try:
        import torch
    except ImportError:
        return "needs torch with a CUDA GPU"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "needs triton"
    return None


def _inputs_for(name, q, k, v):
    if name != "triton":
        return q, k, v
    import torch

    return tuple(torch.from_numpy(x).cuda() for x in (q, k, v))


def run_ladder(n=512, heads=2, head_dim=64, repeats=3, seed=0, progress=True):
    """Time each rung on q, k, v of shape (1, heads, n, head_dim), float32.

    Returns one dict per rung: name, idea, status ("ok", "skipped", "failed"),
    compile_s, median_s, gflops, max_error, speedup (over the last measured rung).
    """
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, heads, n, head_dim), dtype=np.float32) for _ in range(3))
    expected = reference_attention(*(x.astype(np.float64) for x in (q, k, v)))  # (1, H, N, D)
    flops = 4 * heads * n * n * head_dim
    rows, previous = [], None
    for name, fn, idea in tqdm(RUNGS, desc="ladder", unit="rung", disable=not progress, file=sys.stderr):
        row = {"name": name, "idea": idea}
        rows.append(row)
        reason = _gpu_reason() if name == "triton" else bf16_unavailable() if name == "bf16_products" else None
        if reason:
            row.update(status="skipped", reason=reason)
            continue
        args = _inputs_for(name, q, k, v)
        try:
            start = time.perf_counter()
            out = fn(*args)
            first = time.perf_counter() - start
            out = np.asarray(out.cpu() if hasattr(out, "cpu") else out, dtype=np.float64)
            error = float(np.abs(out - expected).max())
            tolerance = TOLERANCES.get(name, TOLERANCE)
            if not error <= tolerance:
                raise AssertionError(f"max error {error:.3g} against the reference exceeds {tolerance}")
            times = []
            for _ in range(1 if name == "python_loops" else repeats):  # the loops take seconds
                start = time.perf_counter()
                fn(*args)
                times.append(time.perf_counter() - start)
        except Exception as error:  # a failing rung is reported; the rest still run
            row.update(status="failed", reason=f"{type(error).__name__}: {error}")
            continue
        median = statistics.median(times)
        row.update(status="ok", median_s=median, compile_s=max(0.0, first - median),
                   gflops=flops / median / 1e9, max_error=error)
        row["speedup"] = previous["median_s"] / median if previous else None
        previous = row
    return rows


def format_ladder(rows, n, heads, head_dim):
    lines = [f"optimisation ladder: forward, float32, B=1, H={heads}, N={n}, D={head_dim}",
             f"{'rung':<18} {'median ms':>10} {'GFLOP/s':>9} {'x prev':>7} {'compile s':>9}  idea"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['name']:<18} {r['status']}: {r['reason']}")
            continue
        speedup = f"{r['speedup']:.3g}" if r["speedup"] else "-"
        lines.append(f"{r['name']:<18} {r['median_s'] * 1e3:>10.2f} {r['gflops']:>9.3g} {speedup:>7} "
                     f"{r['compile_s']:>9.2f}  {r['idea']}")
    return "\n".join(lines)


def plot_ladder(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    bars = ax.bar([r["name"] for r in measured], [r["gflops"] for r in measured], color="#4c72b0")
    for bar, r in zip(bars, measured):
        label = f"{r['gflops']:.2g}" + (f"\n×{r['speedup']:.3g}" if r["speedup"] else "")
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("GFLOP/s (log scale)")
    ax.set_title(title, fontsize=10)
    skipped = [f"{r['name']}: {r['reason']}" for r in rows if r["status"] != "ok"]
    if skipped:
        ax.text(0.01, 0.97, "not run: " + "; ".join(skipped), transform=ax.transAxes, fontsize=7,
                va="top")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(n, heads, head_dim, repeats, out_dir):
    """Run, print, and save ladder.json and ladder.png into out_dir."""
    rows = run_ladder(n=n, heads=heads, head_dim=head_dim, repeats=repeats)
    print(format_ladder(rows, n, heads, head_dim))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from ..info import collect

    config = {"n": n, "heads": heads, "head_dim": head_dim, "batch": 1, "dtype": "float32"}
    (out_dir / "ladder.json").write_text(json.dumps({"config": config, "machine": collect(), "rungs": rows},
                                                    indent=2))
    plot_ladder(rows, out_dir / "ladder.png",
                f"attention forward, B=1, H={heads}, N={n}, D={head_dim}, float32: GFLOP/s per rung")
    print(f"wrote {out_dir / 'ladder.json'} and {out_dir / 'ladder.png'}", file=sys.stderr)
    return 0 if all(r["status"] != "failed" for r in rows) else 1
