"""The Numba kernel against the reference, run in a process of its own for one CPU target.

    NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=+avx,+avx2,+fma,... NUMBA_CACHE_DIR=... python tests/target_checks.py

tests/test_targets.py starts it once per target (the target is fixed when Numba
starts, so each needs a process). It prints the target, one `ok NAME max-error`
line per check and `done`; a failed check raises (exit 1) with the element and
the error. A representative subset: forward and backward in float32, bf16 and
float64, GQA, causal, masks, decode, packed sequences and a flash-attn call,
on odd sizes (tails of every block and vector width).
"""

from __future__ import annotations

import sys

import numpy as np
import torch

import attnkit
from attnkit import reference
from attnkit.flash_attn import flash_attn_func
from attnkit.kernels import microkernels
from attnkit.kernels.target import TARGET, describe
from attnkit.testing import assert_close, assert_within_rule, max_error, torch_attention


def report(name, actual, expected, atol, rtol=0.0):
    assert_close(actual, expected, atol=atol, rtol=rtol, name=name)
    print(f"ok {name} {max_error(actual, expected):.3g}", flush=True)


def float32_and_float64(rng):
    """Forward and gradients, GQA 4/2, causal, an odd head size, against the float64 reference."""
    for dtype, atol in ((torch.float32, 2e-5), (torch.float64, 1e-11)):
        q = torch.tensor(rng.standard_normal((2, 4, 77, 40)), dtype=dtype, requires_grad=True)
        k, v = (torch.tensor(rng.standard_normal((2, 2, 93, 40)), dtype=dtype, requires_grad=True) for _ in range(2))
        d_out = rng.standard_normal((2, 4, 77, 40))
        out = attnkit.attention(q, k, v, causal="bottom_right", backend="numba")
        out.backward(torch.tensor(d_out, dtype=dtype))
        q64, k64, v64 = (x.detach().double().numpy() for x in (q, k, v))
        want, lse = reference.attention(q64, k64, v64, causal="bottom_right", return_lse=True)
        grads = reference.attention_backward(q64, k64, v64, want, d_out, lse, causal="bottom_right")
        name = str(dtype).split(".")[1]
        report(f"{name}_forward", out.detach().numpy(), want, atol)
        for grad_name, got, expected in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), grads):
            report(f"{name}_{grad_name}", got.numpy(), expected, 5 * atol)


def bf16_two_times_rule(rng):
    """bf16 forward and gradients: error against float32 at most 2x (3x for gradients) a plain bf16 one's."""
    shapes = ((1, 4, 130, 64), (1, 2, 150, 64), (1, 2, 150, 64))
    q, k, v = (torch.tensor(rng.standard_normal(s), dtype=torch.bfloat16, requires_grad=True) for s in shapes)
    d_out = torch.tensor(rng.standard_normal((1, 4, 130, 64)), dtype=torch.bfloat16)
    out = attnkit.attention(q, k, v, causal=True, backend="numba")
    out.backward(d_out)
    scale = 64**-0.5

    def plain(dtype):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        result, _ = torch_attention(*leaves, scale=scale, causal="top_left")
        result.backward(d_out.to(dtype))
        return [result.detach().float()] + [x.grad.float() for x in leaves]

    exact, low = plain(torch.float32), plain(torch.bfloat16)
    for name, got, want, rough, factor in zip(("bf16_forward", "bf16_dq", "bf16_dk", "bf16_dv"),
                                              (out, q.grad, k.grad, v.grad), exact, low, (2, 3, 3, 3)):  # fmt: skip
        assert_within_rule(name, got.detach(), want, rough, factor, floor=1e-5)
        print(f"ok {name} {max_error(got.detach(), want):.3g} (plain bf16: {max_error(rough, want):.3g})", flush=True)


def masks_and_decode(rng):
    """A boolean key-padding mask, an additive mask, and decode (Nq = 1 against a long cache, GQA 8/2)."""
    q, k, v = (rng.standard_normal((2, 2, n, 48)).astype(np.float32) for n in (70, 300, 300))
    padding = np.ones((2, 1, 1, 300), bool)
    padding[0, ..., 211:] = False
    report("key_padding", attnkit.attention(q, k, v, mask=padding, backend="numba"),
           reference.attention(*(x.astype(np.float64) for x in (q, k, v)), mask=padding), 2e-5)  # fmt: skip
    additive = rng.standard_normal((1, 2, 70, 300)).astype(np.float32)
    report("additive_mask", attnkit.attention(q, k, v, mask=additive, backend="numba"),
           reference.attention(*(x.astype(np.float64) for x in (q, k, v)), mask=additive), 2e-5)  # fmt: skip
    q1 = rng.standard_normal((3, 8, 1, 128)).astype(np.float32)
    cache_k, cache_v = (rng.standard_normal((3, 2, 1000, 128)).astype(np.float32) for _ in range(2))
    report("decode", attnkit.attention(q1, cache_k, cache_v, backend="numba"),
           reference.attention(*(x.astype(np.float64) for x in (q1, cache_k, cache_v))), 2e-5)  # fmt: skip
    q1b, kb, vb = (torch.tensor(x).bfloat16() for x in (q1, cache_k, cache_v))
    got = attnkit.attention(q1b, kb, vb, backend="numba").float().numpy()
    want = reference.attention(*(x.float().double().numpy() for x in (q1b, kb, vb)))
    report("decode_bf16", got, want, 2e-2)


def packed_and_flash_attn(rng):
    """Packed sequences (causal, ALiBi) and flash_attn_func with a window, against the reference."""
    cu = np.array([0, 5, 133, 134, 300], np.int32)
    q, k, v = (rng.standard_normal((h, 300, 32)).astype(np.float32) for h in (4, 2, 2))
    slopes = np.array([0.5, 0.25, 0.125, 0.0625], np.float32)
    got = attnkit.varlen_attention(q, k, v, cu, cu, causal=True, alibi_slopes=slopes)
    want = reference.varlen_attention(*(x.astype(np.float64) for x in (q, k, v)), cu, cu, causal=True,
                                      alibi_slopes=slopes.astype(np.float64))  # fmt: skip
    report("varlen", got, want, 2e-5)
    qf, kf, vf = (torch.tensor(rng.standard_normal((2, n, 4, 64)), dtype=torch.float32) for n in (50, 90, 90))
    out = flash_attn_func(qf, kf, vf, causal=True, window_size=(20, 0)).numpy()
    as_heads = lambda x: x.double().numpy().transpose(0, 2, 1, 3)  # noqa: E731  (B, N, H, D) -> (B, H, N, D)
    want = reference.attention(as_heads(qf), as_heads(kf), as_heads(vf), causal="bottom_right", window=(20, 0))
    report("flash_attn_func", out.transpose(0, 2, 1, 3), want, 2e-5)


def main():
    print("target", describe(TARGET), flush=True)
    print("paths", microkernels.BF16_PRODUCTS, microkernels.F32_PRODUCTS, microkernels.BLOCKS, flush=True)
    rng = np.random.default_rng(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    float32_and_float64(rng)
    bf16_two_times_rule(rng)
    masks_and_decode(rng)
    packed_and_flash_attn(rng)
    print("done", flush=True)


if __name__ == "__main__":
    main()
