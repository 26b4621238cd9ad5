"""The Numba kernel of one checkout against another's, in alternating processes (native target).

    git worktree add /tmp/base REV && python scripts/compare-checkouts.py /tmp/base .   # run it 3 times

Each run imports attnkit from the checkout given first on sys.path and prints the
median of 7 timed calls of flash_forward / flash_backward, fp32 and bf16 bits,
B1 H8 N2048 D64 causal, both cores. Same process = same checkout (module names
collide), so the contenders alternate by process; compare the medians across runs.
"""

import subprocess
import sys

SCRIPT = r"""
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

if __name__ == "__main__":
    for checkout in sys.argv[1:]:
        subprocess.run([sys.executable, "-c", SCRIPT, checkout], check=True)
