"""The Numba kernel on AArch64 against the reference, NumPy only (scripts/aarch64-smoke.sh runs it under qemu).

Prints the target, one `ok NAME max-error` line per check and `done`; a failed
check raises. Covers the NEON float32 micro-kernel (forward and backward, GQA,
causal), the widened bf16 micro-kernel with integer bf16 rounding (forward and
backward on bf16 bits), float64 through the BLAS and a packed call.
"""

from __future__ import annotations

import platform

import numpy as np

import attnkit
from attnkit import reference
from attnkit.kernels import microkernels
from attnkit.kernels.numba_attention import flash_backward, flash_forward
from attnkit.kernels.target import TARGET, describe
from attnkit.testing import assert_close, max_error


def report(name, actual, expected, atol):
    assert_close(actual, expected, atol=atol, name=name)
    print(f"ok {name} {max_error(actual, expected):.3g}", flush=True)


def main():
    print("machine", platform.machine(), "| target", describe(TARGET), flush=True)
    print("paths", microkernels.BF16_PRODUCTS, microkernels.F32_PRODUCTS, microkernels.BLOCKS, flush=True)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((1, 4, 70, 40), (1, 2, 90, 40), (1, 2, 90, 40)))
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    want, lse = reference.attention(q64, k64, v64, causal="bottom_right", return_lse=True)
    report("float32_forward", attnkit.attention(q, k, v, causal="bottom_right"), want, 2e-5)
    report("float64_forward", attnkit.attention(q64, k64, v64, causal="bottom_right"), want, 1e-11)

    d_out = rng.standard_normal(want.shape)
    options = dict(scale=40**-0.5, causal="bottom_right", window=None, softcap=None)
    out, kernel_lse = flash_forward(q, k, v, None, **options)
    grads = flash_backward(q, k, v, None, out, d_out.astype(np.float32), kernel_lse, **options)
    for name, got, expected in zip(("dq", "dk", "dv"), grads,
                                   reference.attention_backward(q64, k64, v64, want, d_out, lse, causal="bottom_right")):
        report(f"float32_{name}", got, expected, 1e-4)

    bits = [microkernels.bf16_bits(x) for x in (q, k, v)]
    rounded = [microkernels.bf16_to_float32(b).astype(np.float64) for b in bits]
    want16, lse16 = reference.attention(*rounded, causal="bottom_right", return_lse=True)
    out16, kernel_lse16 = flash_forward(*bits, None, **options)
    report("bf16_forward", microkernels.bf16_to_float32(out16), want16, 3e-2)
    d16 = microkernels.bf16_bits(d_out)
    grads16 = flash_backward(*bits, None, out16, d16, kernel_lse16, **options)
    expected16 = reference.attention_backward(*rounded, want16, microkernels.bf16_to_float32(d16).astype(np.float64),
                                              lse16, causal="bottom_right")  # fmt: skip
    for name, got, expected in zip(("dq", "dk", "dv"), grads16, expected16):
        report(f"bf16_{name}", microkernels.bf16_to_float32(got), expected, 8e-2)

    cu = np.array([0, 7, 60, 90], np.int32)
    qv, kv, vv = (x[0] for x in (rng.standard_normal((1, 4, 90, 32)).astype(np.float32),
                                 rng.standard_normal((1, 2, 90, 32)).astype(np.float32),
                                 rng.standard_normal((1, 2, 90, 32)).astype(np.float32)))  # fmt: skip
    report("varlen", attnkit.varlen_attention(qv, kv, vv, cu, cu, causal=True),
           reference.varlen_attention(*(x.astype(np.float64) for x in (qv, kv, vv)), cu, cu, causal=True), 2e-5)
    print("done", flush=True)


if __name__ == "__main__":
    main()
