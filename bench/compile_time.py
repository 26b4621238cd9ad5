"""Where a first call's time goes: Numba compilation, per kernel function, cold and with a warm cache.

    python -m attnkit.bench.compile_time [--kinds fp32 fp32-wait fp32-backward bf16 fp64 decode warmup ...]

Each kind runs in a fresh Python process with an empty NUMBA_CACHE_DIR (cold), then in a second
fresh process that finds the cache the first one wrote (warm). A process times its first call;
while helper processes compile kernels for it (the reference standing in: attnkit.backends), it
repeats the call until they are done; then it times the next call (the kernel's first, loading
what the helpers compiled) and one more. It records Numba's "numba:compile" events in the process
itself: which functions compiled, how often (one per signature), and for how long (inclusive: a
function compiled inside another's compilation counts in both). "-wait" kinds compile in the call
(ATTNKIT_WHILE_COMPILING=wait), as attnkit did before the stand-in. Prints one table per kind.

`import attnkit` does not import Numba; a process's first call does. The table times that import
(Numba and the kernel modules) on its own, before the first call, so a user's first call costs
that column plus the first call's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

KINDS = {  # kind -> the call, as code run in the child (q, k, v and attnkit are defined there)
    "fp32": "attnkit.attention(q, k, v, causal=True)",
    "fp32-wait": "attnkit.attention(q, k, v, causal=True)",
    "fp32-backward": "attnkit.attention(*(x.requires_grad_() for x in (q, k, v)), causal=True).sum().backward()",
    "fp32-backward-wait": "attnkit.attention(*(x.requires_grad_() for x in (q, k, v)), causal=True).sum().backward()",
    "bf16": "attnkit.attention(*(x.bfloat16() for x in (q, k, v)), causal=True)",
    "fp64": "attnkit.attention(*(x.double() for x in (q, k, v)), causal=True)",
    "decode": "attnkit.attention(q[:, :, -1:], k[:, :8], v[:, :8])",
    "warmup": "attnkit.warmup()",  # helper processes compile from the back of the job list (kernels/warmup.py)
    "warmup-one-process": "attnkit.warmup(processes=1)",
}

_CHILD = r"""
import json, sys, time
start = time.perf_counter()
import torch, attnkit
imported = time.perf_counter() - start
start = time.perf_counter()
from attnkit.kernels import warmup  # Numba and the kernel modules: what a first call would import
kernel_modules = time.perf_counter() - start
import numba.core.event as event
g = torch.Generator().manual_seed(0)
q = torch.randn(1, 32, 1024, 64, generator=g)
k, v = (torch.randn(1, 8, 1024, 64, generator=g) for _ in range(2))
with event.install_recorder("numba:compile") as recorder:
    start = time.perf_counter()
    CALL
    first = time.perf_counter() - start
    meanwhile = 0
    while warmup.compiling():  # the reference stands in until the helpers are done
        CALL
        meanwhile += 1
    ready = time.perf_counter() - start
    start = time.perf_counter()
    CALL
    second = time.perf_counter() - start
start = time.perf_counter()
CALL
third = time.perf_counter() - start
begun, spent = {}, {}
for timestamp, item in recorder.buffer:
    name = getattr(item.data["dispatcher"], "py_func", None)
    name = f"{name.__module__}.{name.__qualname__}" if name else str(item.data["dispatcher"])
    key = (name, str(item.data.get("args")))
    if item.is_start:
        begun[key] = timestamp
    elif key in begun:
        total, count = spent.get(name, (0.0, 0))
        spent[name] = (total + timestamp - begun.pop(key), count + 1)
print(json.dumps(dict(imported=imported, kernel_modules=kernel_modules, first=first, meanwhile=meanwhile, ready=ready, second=second, third=third,
                      compiled=spent)))
"""


def run_kind(kind, cache_dir):
    code = _CHILD.replace("CALL", KINDS[kind])
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    env.pop("ATTNKIT_WHILE_COMPILING", None)
    if kind.endswith("-wait"):
        env["ATTNKIT_WHILE_COMPILING"] = "wait"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{kind}: the child process failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m attnkit.bench.compile_time", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    parser.add_argument("--top", type=int, default=8, help="functions listed per kind (default 8)")
    args = parser.parse_args(argv)
    print("| kind | cache | import torch, attnkit | import numba, kernels | first call | calls meanwhile | kernel from | "
          "next call | one more | functions compiled here | signatures here |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    details = []
    for kind in args.kinds:
        with tempfile.TemporaryDirectory(prefix="attnkit-numba-cache-") as cache_dir:
            for state in ("cold", "warm"):
                print(f"{kind} ({state})...", file=sys.stderr, flush=True)
                result = run_kind(kind, cache_dir)
                compiled = result["compiled"]
                print(f"| {kind} | {state} | {result['imported']:.2f} s | {result['kernel_modules']:.2f} s | "
                      f"{result['first']:.2f} s | "
                      f"{result['meanwhile']} | {result['ready']:.1f} s | {1e3 * result['second']:.1f} ms | "
                      f"{1e3 * result['third']:.1f} ms | {len(compiled)} | "
                      f"{sum(count for _, count in compiled.values())} |", flush=True)
                if state == "cold":
                    details.append((kind, compiled))
    for kind, compiled in details:
        print(f"\n{kind}, cold: the longest compilations (inclusive seconds, signatures)\n")
        print("| function | seconds | signatures |")
        print("| --- | ---: | ---: |")
        for name, (seconds, count) in sorted(compiled.items(), key=lambda item: -item[1][0])[: args.top]:
            print(f"| `{name.replace('attnkit.kernels.', '')}` | {seconds:.2f} | {count} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
