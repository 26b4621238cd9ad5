"""The sequence-length sweep: which contenders run, which points are skipped, the rows.

sweep() yields one row per (N, contender), smallest N first, so an interrupted
sweep still holds every contender at the lengths it reached. A row is

    backend, N, status ("ok", "skipped" or "failed"), note (why skipped / the error),
    median_s, p20_s, p80_s, first_call_s, compile_s, repeats  (seconds, calls)
    flops (of one call), flops_per_s (at the median), peak_memory_bytes

with None for what a skipped or failed point lacks.
"""

from __future__ import annotations

import statistics

from .accounting import ITEMSIZE, attention_flops, extrapolate, format_bytes, format_seconds

ROW_FIELDS = ("backend", "N", "status", "note", "median_s", "p20_s", "p80_s", "first_call_s",
              "compile_s", "repeats", "flops", "flops_per_s", "peak_memory_bytes", "cpu_pressure",
              "load_average",  # the most load seen before or after the point's rounds
              "round_medians_s", "rounds_disagree",  # with --rounds: each round's median, and rounds_disagree
              "kv_bytes", "kv_bytes_per_s",  # decode sweeps: the K/V cache's bytes, read per second
              "read_bytes_per_s")  # decode sweeps: the machine's read bandwidth, measured after each round
# Fields records written before them lack (read as None)
LATER_ROW_FIELDS = ("read_bytes_per_s",)


def select_contenders(settings, contenders, requested=None):
    """Split contenders into (to_run, left_out) for this sweep.

    requested: names the user asked for, "all" for everything that can run, or
    None for the default set. left_out is [(name, reason)] for the record: what
    could not run here, or is not in the default set (not what was left unrequested).
    A requested contender that cannot run here raises ValueError.
    """
    by_name = {c.name: c for c in contenders}
    if requested not in (None, "all"):
        unknown = [name for name in requested if name not in by_name]
        if unknown:
            raise ValueError(f"unknown backend(s) {', '.join(unknown)}; "
                             f"choose from {', '.join(by_name)} or all")
    to_run, left_out = [], []
    for contender in contenders:
        if requested not in (None, "all") and contender.name not in requested:
            continue
        reason = contender.unavailable_reason(settings)
        if reason is None and requested is None:
            reason = contender.default_reason(settings)
            if reason:
                reason = f"not in the default set: {reason} (ask for it with --backends)"
        if reason is None:
            to_run.append(contender)
        elif requested not in (None, "all"):
            raise ValueError(f"backend {contender.name} cannot run this sweep: {reason}")
        else:
            left_out.append((contender.name, reason))
    return to_run, left_out


def predicted_need(contender, settings, n, earlier):
    """Bytes the process would hold at this point: the inputs plus the call's peak.

    The call's peak is extrapolated from the contender's last two measured
    points, and is at least what the call returns (the output, or the three
    gradients) plus, for a contender that holds the score matrix, that matrix.
    """
    held = 3 if settings.mode == "forward" else 5  # q, k, v (+ grad_out and the saved output)
    returned = {"forward": 1, "backward": 3, "both": 4}[settings.mode]
    floor = returned * settings.tensor_bytes(n)
    if contender.materializes_scores:
        floor += settings.score_matrix_bytes(n)
    measured = [(r["N"], r["peak_memory_bytes"]) for r in earlier if r["status"] == "ok"]
    peak = extrapolate([m for m, _ in measured], [b for _, b in measured], n)
    return held * settings.tensor_bytes(n) + max(floor, peak or 0)


def skip_reason(contender, settings, n, earlier):
    """Why the point (contender, n) should not run, or None.

    earlier: this contender's rows at smaller N. A point is skipped when its
    predicted memory exceeds the budget, or one call is predicted to take longer
    than the time limit (both extrapolated from the last two measured points).
    """
    need = predicted_need(contender, settings, n, earlier)
    if need > settings.memory_budget_bytes:
        return (f"{contender.name} at N={n} would need {format_bytes(need)} "
                f"(memory budget {format_bytes(settings.memory_budget_bytes)})")
    measured = [(r["N"], r["median_s"]) for r in earlier if r["status"] == "ok"]
    seconds = extrapolate([m for m, _ in measured], [s for _, s in measured], n)
    if seconds is not None and seconds > settings.time_limit_s:
        return (f"{contender.name} at N={n} would take about {format_seconds(seconds)} per call "
                f"(time limit {format_seconds(settings.time_limit_s)})")
    return None


def make_row(contender_name, n, settings, status, note="", measurement=None):
    """A result row with the FLOP accounting filled in (see the module docstring)."""
    row = dict.fromkeys(ROW_FIELDS)
    row.update(backend=contender_name, N=n, status=status, note=note)
    row["flops"] = attention_flops(settings.batch, settings.heads, settings.queries(n), n, settings.head_dim,
                                   settings.causal, settings.mode)
    if settings.query_len is not None:  # a decode step reads the whole K/V cache once
        row["kv_bytes"] = 2 * settings.batch * settings.key_heads * n * settings.head_dim * ITEMSIZE[settings.dtype]
    if measurement:
        row.update({key: measurement[key] for key in ROW_FIELDS if key in measurement})
        if row["median_s"]:
            row["flops_per_s"] = row["flops"] / row["median_s"]
            if row["kv_bytes"]:
                row["kv_bytes_per_s"] = row["kv_bytes"] / row["median_s"]
    return row


def pool_rounds(results):
    """One measurement from the same point's rounds: their timings pooled.

    The first round's first call (the one that compiled) gives first_call_s;
    the median and percentiles are over every round's steady-state samples;
    peak memory is the largest seen. A failed round fails the point.

    The rounds disagree (rounds_disagree) when a round's median lies outside the
    pooled samples' 20th-80th percentile band: its conditions differed from the
    others' by more than the noise within them (the machine changed speed).
    """
    from .measure import summarize

    failed = [r for r in results if r.get("status") != "ok"]
    if failed:
        return failed[0]
    if len(results) == 1:
        return results[0]
    first = results[0]
    samples = [s for r in results for s in r["samples_s"]]
    pooled = {**first, **summarize(samples), "repeats": len(samples)}
    pooled["compile_s"] = max(first["first_call_s"] - pooled["median_s"], 0.0)
    pooled["round_medians_s"] = [r["median_s"] for r in results]
    pooled["rounds_disagree"] = any(not pooled["p20_s"] <= m <= pooled["p80_s"] for m in pooled["round_medians_s"])
    read_rates = [r["read_bytes_per_s"] for r in results if r.get("read_bytes_per_s")]
    pooled["read_bytes_per_s"] = statistics.median(read_rates) if read_rates else None
    for field in ("cpu_pressure", "load_average"):  # the busiest round speaks for the point
        seen = [r[field] for r in results if r.get(field) is not None]
        pooled[field] = max(seen) if seen else None
    memories = [r.get("peak_memory_bytes") for r in results if r.get("peak_memory_bytes") is not None]
    pooled["peak_memory_bytes"] = max(memories) if memories else None
    return pooled


def sweep(settings, contenders, measure):
    """Yield one row per (N, contender), N ascending.

    measure(contender, n) returns {"status": "ok", median_s, samples_s, ...} or
    {"status": "failed", "error": ...}; a failed point is a row and the sweep
    goes on. With settings.rounds > 1 the contenders of one N take turns round
    after round, and each row pools its rounds (pool_rounds).
    """
    rows_by_contender = {c.name: [] for c in contenders}
    for n in settings.ns:
        rows, results = {}, {}
        for contender in contenders:
            reason = skip_reason(contender, settings, n, rows_by_contender[contender.name])
            if reason:
                rows[contender.name] = make_row(contender.name, n, settings, "skipped", reason)
            else:
                results[contender.name] = []
        for _ in range(settings.rounds):
            for contender in contenders:
                runs = results.get(contender.name)
                if runs is not None and (not runs or runs[-1].get("status") == "ok"):
                    runs.append(measure(contender, n))
        for contender in contenders:
            if contender.name in results:
                result = pool_rounds(results[contender.name])
                if result.get("status") == "ok":
                    row = make_row(contender.name, n, settings, "ok", measurement=result)
                else:
                    row = make_row(contender.name, n, settings, "failed", result.get("error", "?"))
            else:
                row = rows[contender.name]
            rows_by_contender[contender.name].append(row)
            yield row
