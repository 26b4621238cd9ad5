"""The Numba kernel against the reference, run in a process of its own for one CPU target.

    NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=+avx,+avx2,+fma,... NUMBA_CACHE_DIR=... python tests/target_checks.py

tests/test_targets.py starts it once per target (the target is fixed when Numba
starts, so each needs a process). It prints the target, one `ok NAME max-error`
line per check and `done`; a failed check raises (exit 1) with the element and
the error. Every check is flash-attn's rule (attnkit.testing.assert_within_rule) against
the float64 reference. A representative subset: forward and backward in float32, bf16 and
float64, GQA, causal, masks, decode, packed sequences, a flash-attn call, dropout and sinks,
on odd sizes (tails of every block and vector width).
"""

from __future__ import annotations

import sys

import numpy as np
import torch

import attnkit
from attnkit import reference
from attnkit.flash_attn import flash_attn_func, flash_attn_with_kvcache
from attnkit.kernels import microkernels
from attnkit.kernels.target import TARGET, describe
from attnkit.testing import assert_within_rule, max_error, torch_attention


def report(name, actual, expected, plain, factor=2, floor=1e-6):
    """flash-attn's rule (attnkit.testing.assert_within_rule), then one `ok` line."""
    assert_within_rule(name, actual, expected, plain, factor, floor=floor)
    print(f"ok {name} {max_error(actual, expected):.3g} (plain: {max_error(plain, expected):.3g})", flush=True)


def against_reference(name, actual, reference_call, inputs, factor=2):
    """actual against reference_call(*inputs) in float64, allowed factor x the error of the same
    reference computed in float32 (the plain implementation of the kernel's precision)."""
    report(name, actual, reference_call(*(np.asarray(x, np.float64) for x in inputs)),
           reference_call(*(np.asarray(x, np.float32) for x in inputs)), factor)  # fmt: skip


def forward_and_gradients(q, k, v, d_out, **options):
    """The reference's out and (dq, dk, dv), in the inputs' precision."""
    out, lse = reference.attention(q, k, v, return_lse=True, **options)
    return (out, *reference.attention_backward(q, k, v, out, d_out, lse, **options))


def report_forward_and_gradients(name, out, q, k, v, d_out, **options):
    """out and q, k, v's gradients (float32, after backward) against the reference's by the 2x / 3x rule."""
    inputs = [x.detach().double().numpy() for x in (q, k, v)] + [d_out]
    want = forward_and_gradients(*inputs, **options)
    plain = forward_and_gradients(*(x.astype(np.float32) for x in inputs), **options)
    for part, got, expected, rough, factor in zip(("forward", "dq", "dk", "dv"), (out.detach(), q.grad, k.grad, v.grad),
                                                  want, plain, (2, 3, 3, 3)):  # fmt: skip
        report(f"{name}_{part}", got.numpy(), expected, rough, factor)


def float32_and_float64(rng):
    """Forward and gradients, GQA 4/2, causal, an odd head size: float32 by the 2x / 3x rule, float64 exact."""
    for dtype in (torch.float32, torch.float64):
        q = torch.tensor(rng.standard_normal((2, 4, 77, 40)), dtype=dtype, requires_grad=True)
        k, v = (torch.tensor(rng.standard_normal((2, 2, 93, 40)), dtype=dtype, requires_grad=True) for _ in range(2))
        d_out = rng.standard_normal((2, 4, 77, 40))
        out = attnkit.attention(q, k, v, causal="bottom_right", backend="numba")
        out.backward(torch.tensor(d_out, dtype=dtype))
        inputs = [x.detach().double().numpy() for x in (q, k, v)] + [d_out]
        want = forward_and_gradients(*inputs, causal="bottom_right")
        plain = forward_and_gradients(*(x.astype(np.float32) for x in inputs), causal="bottom_right")
        name = str(dtype).split(".")[1]
        for part, got, expected, rough, factor in zip(("forward", "dq", "dk", "dv"),
                                                      (out.detach(), q.grad, k.grad, v.grad), want, plain,
                                                      (2, 3, 3, 3)):  # fmt: skip
            if dtype == torch.float64:  # the plain implementation is the reference itself: a float64 floor
                report(f"{name}_{part}", got.numpy(), expected, expected, factor, floor=1e-12)
            else:
                report(f"{name}_{part}", got.numpy(), expected, rough, factor)


def report_bf16(name, out, q, k, v, d_out, causal):
    """bf16 out and q, k, v's gradients (after backward): error against float32 at most 2x (3x for
    gradients) a plain bf16 implementation's, on the same rounded inputs."""
    scale = q.shape[-1] ** -0.5

    def plain(dtype):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        result, _ = torch_attention(*leaves, scale=scale, causal=causal)
        result.backward(d_out.to(dtype))
        return [result.detach().float()] + [x.grad.float() for x in leaves]

    exact, low = plain(torch.float32), plain(torch.bfloat16)
    for part, got, want, rough, factor in zip(("forward", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad), exact,
                                              low, (2, 3, 3, 3)):  # fmt: skip
        report(f"{name}_{part}", got.detach(), want, rough, factor, floor=1e-5)


def bf16_two_times_rule(rng):
    """bf16 forward and gradients: error against float32 at most 2x (3x for gradients) a plain bf16 one's."""
    shapes = ((1, 4, 130, 64), (1, 2, 150, 64), (1, 2, 150, 64))
    q, k, v = (torch.tensor(rng.standard_normal(s), dtype=torch.bfloat16, requires_grad=True) for s in shapes)
    d_out = torch.tensor(rng.standard_normal((1, 4, 130, 64)), dtype=torch.bfloat16)
    out = attnkit.attention(q, k, v, causal=True, backend="numba")
    out.backward(d_out)
    report_bf16("bf16", out, q, k, v, d_out, "top_left")


def masks_and_decode(rng):
    """A boolean key-padding mask, an additive mask, and decode (Nq = 1 against a long cache, GQA 8/2;
    also on a cache in flash-attn's layout, which the decode kernel reads in place)."""
    q, k, v = (rng.standard_normal((2, 2, n, 48)).astype(np.float32) for n in (70, 300, 300))
    padding = np.ones((2, 1, 1, 300), bool)
    padding[0, ..., 211:] = False
    against_reference("key_padding", attnkit.attention(q, k, v, mask=padding, backend="numba"),
                      lambda *x: reference.attention(*x, mask=padding), (q, k, v))  # fmt: skip
    additive = rng.standard_normal((1, 2, 70, 300)).astype(np.float32)
    against_reference("additive_mask", attnkit.attention(q, k, v, mask=additive, backend="numba"),
                      lambda *x: reference.attention(*x, mask=additive), (q, k, v))  # fmt: skip
    q1 = rng.standard_normal((3, 8, 1, 128)).astype(np.float32)
    cache_k, cache_v = (rng.standard_normal((3, 2, 1000, 128)).astype(np.float32) for _ in range(2))
    against_reference("decode", attnkit.attention(q1, cache_k, cache_v, backend="numba"), reference.attention,
                      (q1, cache_k, cache_v))  # fmt: skip
    mha_k, mha_v = (rng.standard_normal((3, 8, 300, 128)).astype(np.float32) for _ in range(2))  # one row a tile
    against_reference("decode_mha", attnkit.attention(q1, mha_k, mha_v, backend="numba"), reference.attention,
                      (q1, mha_k, mha_v))  # fmt: skip
    # The same cache in flash-attn's (B, N, Hkv, D) layout, read in place, sequences of their own lengths
    lengths = np.array([1000, 611, 1], np.int32)
    q_flash, k_flash, v_flash = (torch.tensor(np.ascontiguousarray(x.transpose(0, 2, 1, 3)))
                                 for x in (q1, cache_k, cache_v))  # fmt: skip
    got = flash_attn_with_kvcache(q_flash, k_flash, v_flash, cache_seqlens=torch.from_numpy(lengths)).numpy()
    filled = np.arange(1000)[None, None, None, :] < lengths[:, None, None, None]  # (B, 1, 1, N)
    against_reference("decode_flash_layout", got.transpose(0, 2, 1, 3),
                      lambda *x: reference.attention(*x, mask=filled), (q1, cache_k, cache_v))  # fmt: skip
    q1b, kb, vb = (torch.tensor(x).bfloat16() for x in (q1, cache_k, cache_v))
    got = attnkit.attention(q1b, kb, vb, backend="numba").float()
    want = reference.attention(*(x.double().numpy() for x in (q1b, kb, vb)))
    plain, _ = torch_attention(q1b, kb.repeat_interleave(4, 1), vb.repeat_interleave(4, 1), scale=128**-0.5)
    report("decode_bf16", got, want, plain.float(), 2, floor=1e-5)


def packed_and_flash_attn(rng):
    """Packed sequences (causal, ALiBi) and flash_attn_func with a window, against the reference."""
    cu = np.array([0, 5, 133, 134, 300], np.int32)
    q, k, v = (rng.standard_normal((h, 300, 32)).astype(np.float32) for h in (4, 2, 2))
    slopes = np.array([0.5, 0.25, 0.125, 0.0625], np.float32)
    against_reference("varlen", attnkit.varlen_attention(q, k, v, cu, cu, causal=True, alibi_slopes=slopes),
                      lambda *x: reference.varlen_attention(*x[:3], cu, cu, causal=True, alibi_slopes=x[3]),
                      (q, k, v, slopes))  # fmt: skip
    qf, kf, vf = (torch.tensor(rng.standard_normal((2, n, 4, 64)), dtype=torch.float32) for n in (50, 90, 90))
    out = flash_attn_func(qf, kf, vf, causal=True, window_size=(20, 0)).numpy()
    against_reference("flash_attn_func", out.transpose(0, 2, 1, 3),
                      lambda *x: reference.attention(*x, causal="bottom_right", window=(20, 0)),
                      [x.numpy().transpose(0, 2, 1, 3) for x in (qf, kf, vf)])  # (B, N, H, D) -> (B, H, N, D)


def dropout_and_sinks(rng):
    """Dropout (forward and gradients, the reference given the same keep mask) and sinks on the decode path."""
    from attnkit.reference.dropout import keep_mask

    q = torch.tensor(rng.standard_normal((2, 4, 61, 32)), dtype=torch.float32, requires_grad=True)
    k, v = (torch.tensor(rng.standard_normal((2, 2, 75, 32)), dtype=torch.float32, requires_grad=True)
            for _ in range(2))  # fmt: skip
    d_out = rng.standard_normal((2, 4, 61, 32))
    out = attnkit.attention(q, k, v, causal=True, dropout_p=0.3, dropout_seed=11, backend="numba")
    out.backward(torch.tensor(d_out, dtype=torch.float32))
    report_forward_and_gradients("dropout", out, q, k, v, d_out, causal=True, dropout_p=0.3,
                                 dropout_keep=keep_mask(11, 0.3, 2, 4, 61, 75))  # fmt: skip
    q1 = rng.standard_normal((3, 8, 1, 128)).astype(np.float32)
    cache_k, cache_v = (rng.standard_normal((3, 2, 1000, 128)).astype(np.float32) for _ in range(2))
    sinks = rng.standard_normal(8).astype(np.float32)
    against_reference("sinks_decode", attnkit.attention(q1, cache_k, cache_v, sinks=sinks, backend="numba"),
                      lambda *x: reference.attention(*x[:3], sinks=x[3]), (q1, cache_k, cache_v, sinks))  # fmt: skip


def owned_keys_and_long_alibi(rng):
    """Enough kv heads that each backward task owns its keys' gradients (no chunk slots), in float32
    and bf16; and ALiBi with steep slopes over 600 keys, where most weights fall below exp2's flush."""
    for dtype, tag in ((torch.float32, "owned_keys"), (torch.bfloat16, "owned_keys_bf16")):
        q = torch.tensor(rng.standard_normal((2, 8, 90, 32)), dtype=dtype, requires_grad=True)
        k, v = (torch.tensor(rng.standard_normal((2, 4, 70, 32)), dtype=dtype, requires_grad=True) for _ in range(2))
        d_out = rng.standard_normal((2, 8, 90, 32))
        out = attnkit.attention(q, k, v, causal="bottom_right", backend="numba")
        out.backward(torch.tensor(d_out, dtype=dtype))  # bf16: rounded as the plain implementation sees it
        if dtype == torch.float32:
            report_forward_and_gradients(tag, out, q, k, v, d_out, causal="bottom_right")
        else:
            report_bf16(tag, out, q, k, v, torch.tensor(d_out, dtype=dtype), "bottom_right")
    q = torch.tensor(rng.standard_normal((1, 4, 600, 32)), dtype=torch.float32, requires_grad=True)
    k, v = (torch.tensor(rng.standard_normal((1, 4, 600, 32)), dtype=torch.float32, requires_grad=True)
            for _ in range(2))  # fmt: skip
    d_out = rng.standard_normal((1, 4, 600, 32))
    slopes = np.array([0.1, 0.3, 0.6, 1.0])
    bias = -slopes[None, :, None, None] * np.abs(np.arange(600)[:, None] - np.arange(600)[None, :])
    out = attnkit.attention(q, k, v, alibi_slopes=torch.tensor(slopes, dtype=torch.float32), backend="numba")
    out.backward(torch.tensor(d_out, dtype=torch.float32))
    report_forward_and_gradients("long_alibi", out, q, k, v, d_out, mask=bias)


def flex(rng):
    """attnkit.flex_attention on the CPU kernel: a softcap score_mod on a causal block mask (partial, full
    and empty blocks), forward and gradients, against the reference's built-in softcap and causal."""
    q = torch.tensor(rng.standard_normal((1, 4, 70, 32)), dtype=torch.float32, requires_grad=True)
    k, v = (torch.tensor(rng.standard_normal((1, 2, 70, 32)), dtype=torch.float32, requires_grad=True)
            for _ in range(2))  # fmt: skip
    d_out = rng.standard_normal((1, 4, 70, 32))
    block_mask = attnkit.create_block_mask(lambda b, h, qi, kv: qi >= kv, None, None, 70, 70, BLOCK_SIZE=16)
    out = attnkit.flex_attention(q, k, v, score_mod=lambda s, b, h, qi, kv: 3.0 * torch.tanh(s / 3.0),
                                 block_mask=block_mask, enable_gqa=True)
    out.backward(torch.tensor(d_out, dtype=torch.float32))
    report_forward_and_gradients("flex", out, q, k, v, d_out, causal=True, softcap=3.0)


def main():
    print("target", describe(TARGET), flush=True)
    print("paths", microkernels.BF16_PRODUCTS, microkernels.F32_PRODUCTS, microkernels.BLOCKS, flush=True)
    rng = np.random.default_rng(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    float32_and_float64(rng)
    bf16_two_times_rule(rng)
    masks_and_decode(rng)
    packed_and_flash_attn(rng)
    dropout_and_sinks(rng)
    owned_keys_and_long_alibi(rng)
    flex(rng)
    print("done", flush=True)


if __name__ == "__main__":
    main()
