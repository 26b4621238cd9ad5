"""attnkit against torch SDPA on the calls a sweep never makes, in one process, taking turns.

    python -m attnkit.bench.cpu_dtypes [--suite dtypes|dropin|targets] [--rounds 5] [--threads 2]

Suite "dtypes": bf16, fp16, fp32 under torch's "medium" and "highest" matmul
precision, bf16 decode steps, forward and forward+backward. Suite "dropin":
the calls of real models: key-padding masks as transformers builds them
((B, 1, Nq, Nk) boolean), decode steps (Nq = 1 against a long cache), tiny calls.
Suite "targets": the rows measured on every CPU target (scripts/cpu-targets-record.sh
runs them with Numba and torch limited to AVX2, to AVX-512F, and natively).
For each case it times attnkit's scaled_dot_product_attention and torch's
alternately, `--rounds` times each, and prints the medians, the ratio torch /
attnkit (above 1: attnkit is faster) and both errors against a float64
computation on the same inputs. The sweep (`attnkit bench`) covers sequence
lengths; this covers dtypes, precision settings, masks and call sizes.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from importlib import resources

from .measure import parse_turns



def _load_suites():
    """{suite: [(label, dtype, matmul precision, B, Hq, Hkv, Nq, Nk, D, causal, mode, mask)]} from
    cpu_dtypes_cases.csv beside this file. mask: None, or "key_padding": a (B, 1, Nq, Nk) boolean
    mask, sequence lengths spread between Nk / 4 and Nk, materialised as transformers' sdpa_mask does."""
    suites = {}
    with (resources.files(__package__ or "attnkit.bench") / "cpu_dtypes_cases.csv").open() as table:
        for row in csv.DictReader(table):
            sizes = tuple(int(row[name]) for name in ("B", "Hq", "Hkv", "Nq", "Nk", "D"))
            case = (row["label"], row["dtype"], row["precision"], *sizes, row["causal"] == "causal", row["mode"],
                    None if row["mask"] == "-" else row["mask"])  # fmt: skip
            suites.setdefault(row["suite"], []).append(case)
    return suites


SUITES = _load_suites()


def _flops(b, hq, nq, nk, d, causal, mode):
    forward = 4 * b * hq * nq * nk * d * (0.5 if causal else 1.0)
    return forward * (3.5 if mode == "forward+backward" else 1.0)


def run_case(case, rounds):
    import torch
    import torch.nn.functional as F

    import attnkit

    label, dtype, precision, b, hq, hkv, nq, nk, d, causal, mode, mask_kind = case
    torch.set_float32_matmul_precision(precision)
    generator = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    q = torch.randn(b, hq, nq, d, generator=generator).to(dt)
    k, v = (torch.randn(b, hkv, nk, d, generator=generator).to(dt) for _ in range(2))
    d_out = torch.randn(b, hq, nq, d, generator=generator).to(dt)
    grad = mode == "forward+backward"
    for x in (q, k, v):
        x.requires_grad_(grad)
    options = dict(is_causal=causal, enable_gqa=hq != hkv)
    if mask_kind == "key_padding":
        lengths = torch.linspace(nk // 4, nk, b).round().long()  # one unpadded sequence, the rest padded
        keys = torch.arange(nk)[None, :] < lengths[:, None]  # (B, Nk)
        options["attn_mask"] = keys[:, None, None, :].expand(b, 1, nq, nk).contiguous()
    contenders = {"attnkit": attnkit.scaled_dot_product_attention, "torch": F.scaled_dot_product_attention}

    def step(fn):
        out = fn(q, k, v, **options)
        if grad:
            out.backward(d_out)
        return out

    outputs = {name: step(fn).detach() for name, fn in contenders.items()}  # warm-up (and compile)
    exact = F.scaled_dot_product_attention(*(x.detach().double() for x in (q, k, v)), **options)
    errors = {name: (out.double() - exact).abs().max().item() for name, out in outputs.items()}
    # Small calls are timed in batches of `calls`, so that one sample lasts ~20 ms.
    start = time.perf_counter()
    step(contenders["torch"])
    calls = max(1, int(0.02 / max(time.perf_counter() - start, 1e-7)))
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            start = time.perf_counter()
            for _ in range(calls):
                step(fn)
            times[name].append((time.perf_counter() - start) / calls)
    medians = {name: statistics.median(t) for name, t in times.items()}
    flops = _flops(b, hq, nq, nk, d, causal, mode)
    torch.set_float32_matmul_precision("highest")
    shape = f"B{b} H{hq}" + (f"/{hkv}" if hkv != hq else "") + f" Nq{nq} Nk{nk} D{d}" + (" causal" if causal else "")
    return {
        "case": f"{label} {mode}, {shape}",
        "attnkit_ms": medians["attnkit"] * 1e3,
        "torch_ms": medians["torch"] * 1e3,
        "attnkit_gflops": flops / medians["attnkit"] / 1e9,
        "torch_gflops": flops / medians["torch"] / 1e9,
        "ratio": medians["torch"] / medians["attnkit"],
        "attnkit_error": errors["attnkit"],
        "torch_error": errors["torch"],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m attnkit.bench.cpu_dtypes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="dtypes", help="which cases (default dtypes)")
    parser.add_argument("--only", default=None, help="run only the cases whose label contains this text")
    args = parse_turns(parser, argv)
    cases = [c for c in SUITES[args.suite] if args.only is None or args.only in c[0]]
    header = f"{'case':<58} {'attnkit ms':>10} {'torch ms':>9} {'ratio':>6} {'GF/s ours':>9} {'GF/s torch':>10}" \
             f" {'err ours':>9} {'err torch':>9}"
    print(header)
    for index, case in enumerate(cases, 1):
        print(f"[{index}/{len(cases)}] {case[0]} {case[-1]}", file=sys.stderr)
        r = run_case(case, args.rounds)
        print(f"{r['case']:<58} {r['attnkit_ms']:>10.3f} {r['torch_ms']:>9.3f} {r['ratio']:>6.2f} "
              f"{r['attnkit_gflops']:>9.0f} {r['torch_gflops']:>10.0f} {r['attnkit_error']:>9.2g} "
              f"{r['torch_error']:>9.2g}", flush=True)


if __name__ == "__main__":
    main()
