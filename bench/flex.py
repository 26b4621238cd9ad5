"""FlexAttention on the CPU: attnkit against torch's compiled flex_attention, taking turns in one process.

    python -m attnkit.bench.flex [--lengths 2048 8192] [--head-dims 64 128] [--dtypes float32 bfloat16]
                                 [--heads 4] [--repeats 5] [--json PATH]

Forward: a relative-position bias (score_mod reading a (H, 2N) table) and document masking (a
BlockMask from mask_mod over random document boundaries), attnkit's flex_attention against
torch.compile(flex_attention) with the same block mask. Forward + backward (torch has none on the
CPU): attnkit's flex against attnkit's own built-in path for the same feature (ALiBi as a score_mod
against alibi_slopes=, causal as a mask_mod against causal=True). Then the compile time of a new
score_mod in a fresh process, and in the next process (the on-disk cache).
Prints a Markdown table; the median of --repeats calls each, contenders alternating.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _median_pair(first, second, repeats):
    """Medians of two callables, called in turn (after one warm call each)."""
    first(), second()
    times = ([], [])
    for _ in range(repeats):
        for call, samples in zip((first, second), times):
            start = time.perf_counter()
            call()
            samples.append(time.perf_counter() - start)
    return tuple(statistics.median(samples) for samples in times)


def _documents(torch, n, generator):
    """Document ids of n tokens with random boundaries (8 documents on average)."""
    starts = torch.zeros(n, dtype=torch.int64)
    starts[torch.randperm(n - 1, generator=generator)[:7] + 1] = 1
    return torch.cumsum(starts, 0)


def forward_rows(args, torch, attnkit):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    rows = []
    generator = torch.Generator().manual_seed(0)
    for n in args.lengths:
        table = torch.randn(args.heads, 2 * n, generator=generator)
        docs = _documents(torch, n, generator)

        def relative(score, b, h, q_idx, kv_idx):
            return score + table[h, q_idx - kv_idx + n]

        def document(b, h, q_idx, kv_idx):
            return docs[q_idx] == docs[kv_idx]

        torch_mask = create_block_mask(document, None, None, n, n, device="cpu")
        our_mask = attnkit.create_block_mask(document, None, None, n, n)
        for d in args.head_dims:
            for dtype_name in args.dtypes:
                dtype = getattr(torch, dtype_name)
                q, k, v = (torch.randn(1, args.heads, n, d, generator=generator).to(dtype) for _ in range(3))
                # A fresh compilation per shape: past Dynamo's recompile limit (8) torch would run its
                # eager flex (the whole score matrix) and the comparison would flatter attnkit.
                torch._dynamo.reset()
                compiled = torch.compile(flex_attention)
                for case, ours, theirs in (
                    ("relative bias", lambda: attnkit.flex_attention(q, k, v, score_mod=relative),
                     lambda: compiled(q, k, v, score_mod=relative)),
                    ("document mask", lambda: attnkit.flex_attention(q, k, v, block_mask=our_mask),
                     lambda: compiled(q, k, v, block_mask=torch_mask)),
                ):
                    ours_s, theirs_s = _median_pair(ours, theirs, args.repeats)
                    rows.append({"pass": "forward", "case": case, "n": n, "d": d, "dtype": dtype_name,
                                 "heads": args.heads, "attnkit_s": ours_s, "peer": "torch compiled flex_attention",
                                 "peer_s": theirs_s, "ratio": theirs_s / ours_s})
                    print(_row(rows[-1]), flush=True)
    return rows


def training_rows(args, torch, attnkit):
    rows = []
    generator = torch.Generator().manual_seed(1)
    for n in args.lengths:
        causal_mask = attnkit.create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, n, n)
        slopes = torch.rand(args.heads, generator=generator)

        def alibi(score, b, h, q_idx, kv_idx):
            return score - slopes[h] * torch.abs(q_idx - kv_idx)

        for d in args.head_dims:
            for dtype_name in args.dtypes:
                dtype = getattr(torch, dtype_name)
                q, k, v = (torch.randn(1, args.heads, n, d, generator=generator).to(dtype).requires_grad_()
                           for _ in range(3))

                def step(call):
                    def run():
                        out = call()
                        torch.autograd.grad(out.float().sum(), (q, k, v))
                    return run

                for case, ours, built_in in (
                    ("ALiBi score_mod vs alibi_slopes=", step(lambda: attnkit.flex_attention(q, k, v, score_mod=alibi)),
                     step(lambda: attnkit.attention(q, k, v, alibi_slopes=slopes))),
                    ("causal mask_mod vs causal=True", step(lambda: attnkit.flex_attention(q, k, v, block_mask=causal_mask)),
                     step(lambda: attnkit.attention(q, k, v, causal=True))),
                ):
                    ours_s, theirs_s = _median_pair(ours, built_in, args.repeats)
                    rows.append({"pass": "forward+backward", "case": case, "n": n, "d": d, "dtype": dtype_name,
                                 "heads": args.heads, "attnkit_s": ours_s, "peer": "attnkit built-in",
                                 "peer_s": theirs_s, "ratio": theirs_s / ours_s})
                    print(_row(rows[-1]), flush=True)
    return rows


_COMPILE_PROBE = """
import time, torch, attnkit
table = torch.randn(4, 512)
def score_mod(score, b, h, q_idx, kv_idx):
    return score * {constant!r} + table[h, q_idx - kv_idx + 256]
q = torch.randn(1, 4, 256, 64, requires_grad=True)
start = time.perf_counter()
out = attnkit.flex_attention(q, q, q, score_mod=score_mod)
forward = time.perf_counter() - start
start = time.perf_counter()
out.sum().backward()
print(forward, time.perf_counter() - start)
"""


def compile_rows():
    """A score_mod never seen before (a new constant makes new source), in a new process, twice."""
    constant = 1.0 + (time.time_ns() % 1_000_000) / 1e9
    probe = _COMPILE_PROBE.format(constant=constant)
    rows = []
    for label in ("new score_mod, first process", "same score_mod, next process (disk cache)"):
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                                env={**os.environ, "ATTNKIT_COMPILE_NOTICE": "0"})
        forward, backward = (float(x) for x in result.stdout.split())
        rows.append({"pass": "compile", "case": label, "forward_first_call_s": forward, "backward_first_call_s": backward})
        print(f"| {label} | first forward {forward:.2f} s | first backward {backward:.2f} s |", flush=True)
    return rows


def _row(row):
    return (f"| {row['pass']} | {row['case']} | N{row['n']} D{row['d']} H{row['heads']} {row['dtype']} | "
            f"{1e3 * row['attnkit_s']:.1f} ms | {row['peer']} {1e3 * row['peer_s']:.1f} ms | {row['ratio']:.2f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m attnkit.bench.flex", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip", nargs="*", default=[], choices=["forward", "training", "compile"])
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    import torch

    import attnkit

    torch.set_num_threads(os.cpu_count() or 1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| pass | case | shape | attnkit | peer | peer time / attnkit time |")
    print("| --- | --- | --- | ---: | --- | ---: |")
    rows = []
    if "forward" not in args.skip:
        rows += forward_rows(args, torch, attnkit)
    if "training" not in args.skip:
        rows += training_rows(args, torch, attnkit)
    if "compile" not in args.skip:
        rows += compile_rows()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"command": " ".join(["python -m attnkit.bench.flex", *(argv or sys.argv[1:])]), "rows": rows},
                      handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
