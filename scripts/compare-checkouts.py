"""One checkout of attnkit against another's, in alternating processes (native target).

    git worktree add /tmp/base REV
    python scripts/compare-checkouts.py [--suite kernel|api] [--runs 3] /tmp/base .

Each process imports attnkit from the checkout it is given (first on sys.path)
and prints medians; module names collide, so the contenders alternate by
process, `--runs` times each, and the medians are compared across runs.

Suite "kernel": flash_forward / flash_backward, fp32 and bf16 bits, B1 H8
N2048 D64 causal, both cores (median of 7 calls).
Suite "api": what a user calls, torch tensors through the public functions:
tiny calls (B1 H4 N32 D32, B2 H8 N16 D64, B1 H1 N1 D64; median of 300),
decode (B4 GQA 32/8 Nk4096 D128, fp32 and bf16), fp32 and bf16 causal
forward+backward (B1 H8 N2048 D64) through scaled_dot_product_attention, and
varlen_attention forward+backward (8 sequences of 64..1024 tokens, H8 D64,
causal) and flash_attn_func (B4 N512 H8 D64 causal, fp16 forward).
"""

import argparse
import subprocess
import sys

KERNEL = r"""
import sys, time, numpy as np
sys.path.insert(0, sys.argv[1])
from attnkit.kernels.numba_attention import flash_forward, flash_backward
from attnkit.kernels import microkernels as mk
rng = np.random.default_rng(0)
f32 = [rng.standard_normal((1, 8, 2048, 64)).astype(np.float32) for _ in range(4)]
b16 = [mk.bf16_bits(x) for x in f32]
opts = dict(scale=0.125, causal="top_left", window=None, softcap=None)
def both(x):
    o, l = flash_forward(*x[:3], None, **opts)
    flash_backward(*x[:3], None, o, x[3], l, **opts)
runs = {"f32 fwd": lambda: flash_forward(*f32[:3], None, **opts), "f32 fwd+bwd": lambda: both(f32),
        "bf16 fwd": lambda: flash_forward(*b16[:3], None, **opts), "bf16 fwd+bwd": lambda: both(b16)}
for run in runs.values():
    run()
times = {name: [] for name in runs}
for _ in range(7):
    for name, run in runs.items():
        start = time.perf_counter(); run(); times[name].append(time.perf_counter() - start)
print(f"{sys.argv[1]:<24}", "  ".join(f"{n} {1e3 * sorted(t)[3]:6.1f} ms" for n, t in times.items()), flush=True)
"""

API = r"""
import statistics, sys, time, torch
sys.path.insert(0, sys.argv[1])
import attnkit
from attnkit.flash_attn import flash_attn_func
torch.manual_seed(0)
sdpa = attnkit.scaled_dot_product_attention

def tensors(*shapes, dtype=torch.float32, grad=False):
    return [torch.randn(s).to(dtype).requires_grad_(grad) for s in shapes]

def train(q, k, v, **kw):
    sdpa(q, k, v, **kw).float().sum().backward()

cases = {}
for b, h, n, d in ((1, 4, 32, 32), (2, 8, 16, 64), (1, 1, 1, 64)):
    x = tensors((b, h, n, d), (b, h, n, d), (b, h, n, d))
    cases[f"tiny B{b}H{h}N{n}D{d} us"] = (300, 1e6, lambda x=x: sdpa(*x))
for dtype in (torch.float32, torch.bfloat16):
    x = tensors((4, 32, 1, 128), (4, 8, 4096, 128), (4, 8, 4096, 128), dtype=dtype)
    cases[f"decode {str(dtype)[6:]} ms"] = (20, 1e3, lambda x=x: sdpa(*x, enable_gqa=True))
    y = tensors((1, 8, 2048, 64), (1, 8, 2048, 64), (1, 8, 2048, 64), dtype=dtype, grad=True)
    cases[f"fwd+bwd {str(dtype)[6:]} ms"] = (5, 1e3, lambda y=y: train(*y, is_causal=True))
lengths = torch.tensor([64, 1024, 300, 512, 77, 900, 128, 640])
cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).int()])
z = tensors((8, int(lengths.sum()), 64), (8, int(lengths.sum()), 64), (8, int(lengths.sum()), 64), grad=True)
cases["varlen fwd+bwd ms"] = (5, 1e3, lambda: attnkit.varlen_attention(*z, cu, cu, causal=True).sum().backward())
w = tensors((4, 512, 8, 64), (4, 512, 8, 64), (4, 512, 8, 64), dtype=torch.float16)
cases["flash_attn_func fp16 ms"] = (10, 1e3, lambda: flash_attn_func(*w, causal=True))
for reps, unit, run in cases.values():
    run()
line = []
for name, (reps, unit, run) in cases.items():
    times = []
    for _ in range(reps):
        start = time.perf_counter(); run(); times.append(time.perf_counter() - start)
    line.append(f"{name} {unit * statistics.median(times):.1f}")
print(f"{sys.argv[1]:<12}", " | ".join(line), flush=True)
"""

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=("kernel", "api"), default="kernel")
    parser.add_argument("--runs", type=int, default=1, help="rounds of alternation")
    parser.add_argument("checkouts", nargs="+")
    args = parser.parse_args()
    for _ in range(args.runs):
        for checkout in args.checkouts:
            subprocess.run([sys.executable, "-c", KERNEL if args.suite == "kernel" else API, checkout], check=True)
