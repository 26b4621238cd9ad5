"""PNG charts of a results document (matplotlib, Agg: no display needed).

    time.png    median time vs N, log-log, 20-80th percentile band, each backend's
                fitted exponent in the legend (N^2 is the score matrix showing)
    memory.png  measured peak memory vs N, log-log, with fitted exponents
    flops.png   achieved FLOP/s vs N, with the matrix-multiply rate measured in
                the same run drawn as the roofline
"""

from __future__ import annotations

import os

from .report import FIT_POINTS, exponents, ok_points

CHARTS = ("time.png", "memory.png", "flops.png")


def _title(document, what):
    from .settings import Settings

    machine = document["machine"]
    devices = machine.get("cuda", {}).get("devices") or []
    settings = Settings.from_dict(document["settings"])
    where = devices[0]["name"] if settings.device == "cuda" and devices else (
        f"{machine['cpu']['model']}, {machine['cpu']['logical_cores']} cores")
    partial = " (interrupted run)" if not document["complete"] else ""
    from .report import busy_rows

    busy = busy_rows(document)
    load = f" - machine busy during {len(busy)} points: not this machine's figures" if busy else ""
    return f"{what}{partial}\n{settings.describe()}\n{where}{load}"


def _label(backend, fitted):
    if backend not in fitted:
        return backend
    slope, from_n = fitted[backend]
    return f"{backend}: ~N^{slope:.2f} (fit N >= {from_n})"


def _figure(plt, document, what, ylabel):
    figure, axes = plt.subplots(figsize=(8, 5.5), dpi=100)
    axes.set_title(_title(document, what), fontsize=9)
    axes.set_xlabel("sequence length N")
    axes.set_ylabel(ylabel)
    axes.set_xscale("log", base=2)
    axes.grid(True, which="both", alpha=0.3)
    return figure, axes


def _legend(axes, **options):
    if axes.get_legend_handles_labels()[0]:  # nothing measured (all skipped): no legend
        axes.legend(fontsize=8, **options)


def _left_out_note(rows):
    notes = [f"{r['backend']} N={r['N']}: {r['status']}" for r in rows if r["status"] != "ok"]
    if len(notes) > 6:
        notes = notes[:6] + [f"and {len(notes) - 6} more"]
    return "not measured: " + "; ".join(notes) if notes else ""


def plot(document, out_dir):
    """Draw the three charts of a results document into out_dir; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    rows = document["results"]
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    paths = []

    def save(figure, name, note=""):
        if note:
            figure.text(0.01, 0.01, note, fontsize=7, wrap=True)
        figure.tight_layout(rect=(0, 0.04 if note else 0, 1, 1))
        path = os.path.join(out_dir, name)
        figure.savefig(path)
        plt.close(figure)
        paths.append(path)

    fitted = exponents(rows, "median_s")
    figure, axes = _figure(plt, document, "time per call", "median time per call (s)")
    axes.set_yscale("log")
    for backend in backends:
        ns, medians = ok_points(rows, backend, "median_s")
        if not ns:
            continue
        _, p20 = ok_points(rows, backend, "p20_s")
        _, p80 = ok_points(rows, backend, "p80_s")
        line, = axes.plot(ns, medians, marker="o", label=_label(backend, fitted))
        axes.fill_between(ns, p20, p80, color=line.get_color(), alpha=0.2)
    _legend(axes, title=f"exponent fitted over the largest {FIT_POINTS} N", title_fontsize=8)
    save(figure, "time.png", _left_out_note(rows))

    fitted = exponents(rows, "peak_memory_bytes")
    figure, axes = _figure(plt, document, "peak memory per call (measured)",
                           "peak memory above inputs (MiB)")
    axes.set_yscale("log")
    for backend in backends:
        ns, peaks = ok_points(rows, backend, "peak_memory_bytes")
        shown = [(n, p / 2**20) for n, p in zip(ns, peaks) if p > 0]  # 0 has no place on a log axis
        if shown:
            axes.plot([n for n, _ in shown], [p for _, p in shown], marker="o",
                      label=_label(backend, fitted))
    _legend(axes, title=f"exponent fitted over the largest {FIT_POINTS} N", title_fontsize=8)
    save(figure, "memory.png", document.get("memory_method", ""))

    figure, axes = _figure(plt, document, "achieved FLOP/s", "GFLOP/s at the median time")
    highest = 0.0
    for backend in backends:
        ns, rates = ok_points(rows, backend, "flops_per_s")
        if ns:
            axes.plot(ns, [r / 1e9 for r in rates], marker="o", label=backend)
            highest = max([highest] + [r / 1e9 for r in rates])
    roofline = document.get("roofline")
    if roofline:
        highest = max(highest, roofline["flops_per_s"] / 1e9)
        axes.axhline(roofline["flops_per_s"] / 1e9, color="black", linestyle="--",
                     label=f"roofline {roofline['flops_per_s'] / 1e9:.0f} GFLOP/s "
                           f"({roofline['what']})")
    bf16_line = (roofline or {}).get("bf16")
    if bf16_line:
        highest = max(highest, bf16_line["flops_per_s"] / 1e9)
        axes.axhline(bf16_line["flops_per_s"] / 1e9, color="gray", linestyle=":",
                     label=f"bf16 roofline {bf16_line['flops_per_s'] / 1e9:.0f} GFLOP/s ({bf16_line['what']})")
    axes.set_ylim(0, 1.5 * highest or 1)  # the legend sits above the roofline
    _legend(axes, loc="upper left")
    save(figure, "flops.png", "FLOPs: forward 4*B*H*N*N*D, halved when causal; backward 2.5x")
    return paths
