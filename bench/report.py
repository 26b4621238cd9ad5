"""The results of a sweep as a table, a JSON document and a CSV file.

JSON document (SCHEMA):
    schema        "attnkit-bench/1"
    complete      false when the sweep was interrupted
    started, finished   ISO 8601 local times
    command       the command line
    settings      Settings.as_dict()
    machine       attnkit.info.collect(): versions, CPU, CUDA devices, backends
    roofline      {"flops_per_s", "what", "rates": {how: FLOP/s}} measured in the run
    memory_method what peak_memory_bytes measures
    contenders    {"run": [names], "left_out": {name: reason}}
    results       rows as described in sweep.py

The CSV has one line per row, with the sweep's settings and the machine's main
facts repeated on every line so that files from several machines concatenate.
"""

from __future__ import annotations

import csv
import json
import os

from .accounting import fit_exponent, format_bytes
from .measure import is_busy
from .settings import Settings
from .sweep import LATER_ROW_FIELDS, ROW_FIELDS

SCHEMA = "attnkit-bench/1"
REQUIRED_KEYS = ("schema", "complete", "settings", "machine", "roofline", "contenders", "results")
NOTE_WIDTH = 160  # characters of a skip reason or error in the table (the JSON keeps it whole)
FIT_POINTS = 3  # exponents are fitted over the largest N measured, where the N^2 term dominates

COLUMNS = (  # header, width, function of a row giving the cell
    ("N", 6, lambda r: str(r["N"])),
    ("backend", 20, lambda r: r["backend"]),
    ("median ms", 10, lambda r: f"{r['median_s'] * 1e3:.3f}"),
    ("p20 ms", 10, lambda r: f"{r['p20_s'] * 1e3:.3f}"),
    ("p80 ms", 10, lambda r: f"{r['p80_s'] * 1e3:.3f}"),
    ("compile s", 9, lambda r: f"{r['compile_s']:.2f}"),
    ("GFLOP/s", 8, lambda r: f"{r['flops_per_s'] / 1e9:.1f}"),
    ("peak mem", 10, lambda r: format_bytes(r["peak_memory_bytes"])),
)


def table_header():
    header = "  ".join(f"{name:>{width}}" if i != 1 else f"{name:<{width}}"
                       for i, (name, width, _) in enumerate(COLUMNS))
    return header + "\n" + "-" * len(header)


def table_line(row):
    """One row of the table; a skipped or failed point shows its reason instead of figures."""
    if row["status"] != "ok":
        note = row["note"] if len(row["note"]) <= NOTE_WIDTH else row["note"][:NOTE_WIDTH - 3] + "..."
        return f"{row['N']:>6}  {row['backend']:<20}  {row['status']}: {note}"
    cells = []
    for i, (_, width, cell) in enumerate(COLUMNS):
        text = cell(row)
        cells.append(f"{text:<{width}}" if i == 1 else f"{text:>{width}}")
    line = "  ".join(cells) + ("  busy: " + _load_text(row) if is_busy(row, os.cpu_count() or 1) else "")
    if row.get("rounds_disagree"):
        line += "  rounds disagree: medians " + ", ".join(f"{m * 1e3:.3f}" for m in row["round_medians_s"]) + " ms"
    return line


def _load_text(row):
    if row.get("cpu_pressure") is not None:
        return f"CPU pressure {row['cpu_pressure']:.0f}%"
    return f"load average {row['load_average']:.1f}"


def busy_rows(document):
    """The measured rows taken while another program competed for the CPU (measure.is_busy)."""
    cores = document["machine"].get("cpu", {}).get("logical_cores") or os.cpu_count() or 1
    return [row for row in document["results"] if row["status"] == "ok" and is_busy(row, cores)]


def format_table(rows):
    return "\n".join([table_header()] + [table_line(r) for r in rows])


def ok_points(rows, backend, field):
    """(Ns, values) of a backend's successful points that have `field`, N ascending."""
    pairs = sorted((r["N"], r[field]) for r in rows
                   if r["backend"] == backend and r["status"] == "ok" and r[field] is not None)
    return [n for n, _ in pairs], [v for _, v in pairs]


def exponents(rows, field, points=FIT_POINTS):
    """{backend: (slope, smallest N fitted)} of `field` against N over the largest `points` N."""
    fitted = {}
    for backend in dict.fromkeys(r["backend"] for r in rows):
        ns, values = ok_points(rows, backend, field)
        slope = fit_exponent(ns[-points:], values[-points:])
        if slope is not None:
            fitted[backend] = (slope, ns[-points:][0])
    return fitted


def format_summary(document):
    """The roofline, the fitted exponents and what was left out, as text."""
    rows = document["results"]
    roofline = document["roofline"]
    lines = []
    if roofline:
        lines.append(f"roofline: {roofline['flops_per_s'] / 1e9:.1f} GFLOP/s ({roofline['what']})")
        if roofline.get("bf16"):
            lines.append(f"bf16 roofline: {roofline['bf16']['flops_per_s'] / 1e9:.1f} GFLOP/s "
                         f"({roofline['bf16']['what']})")
        above = [row for row in rows if row["status"] == "ok" and (row.get("flops_per_s") or 0) > roofline["flops_per_s"]]
        for row in above:
            lines.append(f"warning: {row['backend']} at N={row['N']} ({row['flops_per_s'] / 1e9:.1f} GFLOP/s) is above "
                         "the roofline measured here: the machine's speed changed during the run")  # fmt: skip
    bandwidth = document.get("bandwidth")
    decode_rows = [row for row in rows if row["status"] == "ok" and row.get("kv_bytes_per_s")]
    if bandwidth and decode_rows:
        lines.append(f"read bandwidth: {bandwidth['bytes_per_s'] / 1e9:.1f} GB/s ({bandwidth['what']}), before the sweep")
        for backend in dict.fromkeys(row["backend"] for row in decode_rows):
            longest = max((row for row in decode_rows if row["backend"] == backend), key=lambda row: row["N"])
            rate, beside = longest["kv_bytes_per_s"], longest.get("read_bytes_per_s")
            # the bandwidth measured in turns with the point's rounds where there is one: a VM's read
            # rate moved by up to 1.7x between runs, so one figure from before the sweep misjudged it
            yardstick = beside or bandwidth["bytes_per_s"]
            lines.append(f"decode: {backend} reads the K/V cache at {rate / 1e9:.1f} GB/s at N={longest['N']}, "
                         f"{100 * rate / yardstick:.0f}% of the read bandwidth" +
                         (f" measured after each of its rounds ({beside / 1e9:.1f} GB/s)" if beside else ""))
    for field, label in (("median_s", "time"), ("peak_memory_bytes", "memory")):
        fitted = exponents(rows, field)
        if fitted:
            lines.append(f"{label} ~ N^k over the largest {FIT_POINTS} N: " + ", ".join(
                f"{backend} {slope:.2f}" for backend, (slope, _) in fitted.items()))
    busy = busy_rows(document)
    if busy:
        worst = max(busy, key=lambda row: row.get("cpu_pressure") or row.get("load_average") or 0)
        lines.append(f"warning: the machine was busy during {len(busy)} of the measured points (up to "
                     f"{_load_text(worst)}): another program took CPU time, so those times and the fitted "
                     "exponents are not this machine's; rerun on a quiet machine, or with --rounds to see the spread")
    disagreeing = [row for row in rows if row["status"] == "ok" and row.get("rounds_disagree")]
    if disagreeing:
        lines.append(f"warning: at {len(disagreeing)} points the rounds disagree (a round's median outside the pooled "
                     "20-80% band): the machine's speed changed during the run; compare contenders within one N only")
    for name, reason in document["contenders"]["left_out"].items():
        lines.append(f"left out {name}: {reason}")
    if not document["complete"]:
        lines.append("interrupted: these results are partial")
    return "\n".join(lines)


def machine_columns(machine):
    """The few machine facts repeated on every CSV line."""
    devices = machine.get("cuda", {}).get("devices") or []
    versions = machine.get("versions", {})
    return {
        "cpu": machine.get("cpu", {}).get("model"),
        "logical_cores": machine.get("cpu", {}).get("logical_cores"),
        "gpu": ", ".join(d["name"] for d in devices) or None,
        "attnkit": machine.get("attnkit"),
        "torch": versions.get("torch"),
        "numpy": versions.get("numpy"),
    }


def write_csv(document, path):
    settings = {k: v for k, v in document["settings"].items() if k != "ns"}
    machine = machine_columns(document["machine"])
    fields = list(ROW_FIELDS) + list(settings) + list(machine)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in document["results"]:
            writer.writerow({**row, **settings, **machine})


def write_json(document, path):
    """Write atomically: an interrupted write never leaves half a file."""
    partial = f"{path}.partial"
    with open(partial, "w", encoding="utf-8") as f:
        json.dump(document, f, indent=1)
    os.replace(partial, path)


def load_json(path):
    """A results document, checked against the schema; ValueError says what is wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not JSON: {error}") from None
    if not isinstance(document, dict) or document.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not an attnkit bench result (schema {SCHEMA!r} expected)")
    missing = [key for key in REQUIRED_KEYS if key not in document]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}")
    for i, row in enumerate(document["results"]):
        for key in LATER_ROW_FIELDS:
            row.setdefault(key, None)
        absent = [key for key in ROW_FIELDS if key not in row]
        if absent:
            raise ValueError(f"{path}: result {i} lacks {', '.join(absent)}")
    Settings.from_dict(document["settings"])  # raises ValueError on nonsense
    return document
