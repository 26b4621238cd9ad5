"""torch.compile on CPU tensors: attnkit's Numba kernel as torch.library operators (attnkit/torch_ops.py)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import attnkit
from attnkit import torch_ops
from attnkit.reference import attention
from attnkit.reference import varlen_attention as reference_varlen
from attnkit.testing import assert_within_rule

CASES = [
    # (id, Hq, Hkv, Nq, Nk, D, dtype, features)
    ("H4-N33-D16-bool-mask-gqa", 4, 2, 33, 40, 16, torch.float32, dict(mask="bool")),
    ("H2-N50-D32-causal", 2, 2, 50, 50, 32, torch.float32, dict(is_causal=True)),
    ("H4-N70-D64-additive-mask", 4, 4, 70, 90, 64, torch.float32, dict(mask="additive")),
    ("H4-N65-D64-bf16-causal-gqa", 4, 1, 65, 65, 64, torch.bfloat16, dict(is_causal=True)),
]


def make(case):
    _, hq, hkv, nq, nk, d, dtype, features = case
    generator = torch.Generator().manual_seed(nq)
    q = torch.randn(2, hq, nq, d, generator=generator).to(dtype).requires_grad_()
    k, v = (torch.randn(2, hkv, nk, d, generator=generator).to(dtype).requires_grad_() for _ in range(2))
    kwargs = dict(enable_gqa=hq != hkv, is_causal=features.get("is_causal", False))
    if features.get("mask") == "bool":
        kwargs["attn_mask"] = torch.rand(2, 1, nq, nk, generator=generator) > 0.3
    elif features.get("mask") == "additive":
        kwargs["attn_mask"] = torch.randn(1, hq, nq, nk, generator=generator)
    return q, k, v, kwargs


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_compiled_matches_eager_forward_and_backward(case):
    q, k, v, kwargs = make(case)

    def fn(q, k, v):
        return attnkit.scaled_dot_product_attention(q, k, v, **kwargs).float() * 3.0  # exact in eager and compiled

    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    out = compiled(q, k, v)
    expected = fn(q, k, v)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    d_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), d_out)
    expected_grads = torch.autograd.grad(expected, (q, k, v), d_out)
    for name, got, want in zip("qkv", grads, expected_grads):
        torch.testing.assert_close(got, want, atol=0, rtol=0, msg=lambda m: f"d{name}: {m}")
    # and both right: the reference on the same inputs
    if q.dtype == torch.float32:
        mask = kwargs.get("attn_mask")
        ref = attention(*(x.detach().double().numpy() for x in (q, k, v)), causal=kwargs["is_causal"],
                        mask=None if mask is None else mask.numpy())
        np.testing.assert_allclose(out.detach().numpy(), 3.0 * ref, atol=6e-5)


def test_compiled_attention_with_window_softcap_and_lse():
    q, k, v = (torch.randn(1, 2, 40, 16, requires_grad=True) for _ in range(3))

    def fn(q, k, v):
        out, lse = attnkit.attention(q, k, v, causal="bottom_right", window=(8, 0), softcap=5.0, return_lse=True)
        return out * 2.0, lse  # exact in eager and compiled

    compiled = torch.compile(fn, fullgraph=True)
    for got, want in zip(compiled(q, k, v), fn(q, k, v)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_compiled_rejects_what_it_cannot_trace():
    q = torch.randn(1, 2, 8, 16)
    compiled = torch.compile(lambda q: attnkit.attention(q, q, q, return_weights=True), fullgraph=True)
    with pytest.raises(Exception, match="return_weights needs the NumPy reference"):
        compiled(q)


def _gqa_inputs(seed, dtype=torch.float32, nq=33, nk=40):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, nq, 16, generator=generator).to(dtype).requires_grad_()
    k, v = (torch.randn(2, 2, nk, 16, generator=generator).to(dtype).requires_grad_() for _ in range(2))
    return q, k, v, generator


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_sinks_match_eager_and_the_reference_with_their_gradient(dtype):
    """gpt-oss's sinks under torch.compile: one operator node; the sinks' gradient from its autograd."""
    q, k, v, generator = _gqa_inputs(7, dtype)
    sinks = torch.randn(4, generator=generator).requires_grad_()

    def fn(q, k, v, sinks):
        return attnkit.attention(q, k, v, causal="bottom_right", window=(20, 0), sinks=sinks).float() * 2.0

    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    out, expected = compiled(q, k, v, sinks), fn(q, k, v, sinks)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    d_out = torch.randn(out.shape, generator=generator)
    grads = torch.autograd.grad(out, (q, k, v, sinks), d_out)
    expected_grads = torch.autograd.grad(expected, (q, k, v, sinks), d_out)
    for name, got, want in zip(["dq", "dk", "dv"], grads, expected_grads):
        torch.testing.assert_close(got, want, atol=0, rtol=0, msg=lambda m: f"{name}: {m}")
    # dsinks: a sum over rows, which the compiled backward may order differently; in bf16 Inductor
    # also drops the round trip of dO through bf16 that eager makes (its default casts)
    close = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(grads[3], expected_grads[3], atol=close * expected_grads[3].abs().max().item(), rtol=close)
    # and both right: the reference's dsinks on the same inputs (float64)
    from attnkit.reference import attention_backward

    x64 = [x.detach().double().numpy() for x in (q, k, v)]
    options = dict(causal="bottom_right", window=(20, 0), sinks=sinks.detach().double().numpy())
    ref_out, ref_lse = attention(*x64, return_lse=True, **options)
    *_, ref_d_sinks = attention_backward(*x64, ref_out, 2.0 * d_out.double().numpy(), ref_lse, **options)
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    np.testing.assert_allclose(grads[3].numpy(), ref_d_sinks, atol=tolerance * max(1.0, abs(ref_d_sinks).max()))


def test_compiled_dropout_with_an_int_seed_is_the_eager_call_bit_for_bit():
    q, k, v, generator = _gqa_inputs(8)

    def fn(q, k, v):
        return attnkit.scaled_dot_product_attention(q, k, v, dropout_p=0.3, enable_gqa=True, dropout_seed=1234)

    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    out, expected = compiled(q, k, v), fn(q, k, v)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    d_out = torch.randn(out.shape, generator=generator)
    for name, got, want in zip("qkv", torch.autograd.grad(out, (q, k, v), d_out),
                               torch.autograd.grad(expected, (q, k, v), d_out)):  # fmt: skip
        torch.testing.assert_close(got, want, atol=0, rtol=0, msg=lambda m: f"d{name}: {m}")


def test_compiled_dropout_draws_a_seed_per_call_and_its_backward_reuses_it(monkeypatch):
    """The seed is a tensor of the graph, drawn from torch's generator on every call (an int drawn
    while tracing would be a constant: the same mask every step). The operator bodies run eagerly,
    so the test reads the seeds they hand the kernel."""
    from attnkit.backends import BACKENDS

    numba = BACKENDS["numba"]
    seeds = {"forward": [], "backward": []}
    for name in seeds:
        method = getattr(numba, name)

        def recording(*args, _method=method, _name=name, **kwargs):
            seeds[_name].append(kwargs["dropout"].seed)
            return _method(*args, **kwargs)

        monkeypatch.setattr(numba, name, recording)
    q, k, v, generator = _gqa_inputs(9)

    def fn(q, k, v):
        return attnkit.scaled_dot_product_attention(q, k, v, dropout_p=0.25, enable_gqa=True)

    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    torch.manual_seed(5)
    first = compiled(q, k, v)
    second = compiled(q, k, v)
    torch.manual_seed(5)
    again = compiled(q, k, v)
    assert not torch.equal(first, second), "two calls drew the same mask"
    torch.testing.assert_close(again, first, atol=0, rtol=0)  # torch.manual_seed repeats it
    assert seeds["forward"][0] == seeds["forward"][2] != seeds["forward"][1]
    d_out = torch.randn(first.shape, generator=generator)
    grads = torch.autograd.grad(second, (q, k, v), d_out)
    assert seeds["backward"] == [seeds["forward"][1]], seeds
    # the eager call with the seed the graph drew: the same output and gradients
    monkeypatch.undo()
    expected = attnkit.scaled_dot_product_attention(q, k, v, dropout_p=0.25, enable_gqa=True,
                                                    dropout_seed=seeds["forward"][1])  # fmt: skip
    torch.testing.assert_close(second, expected, atol=0, rtol=0)
    for name, got, want in zip("qkv", grads, torch.autograd.grad(expected, (q, k, v), d_out)):
        torch.testing.assert_close(got, want, atol=0, rtol=0, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck(dtype):
    q = torch.randn(2, 4, 20, 16).to(dtype).requires_grad_()
    k, v = (torch.randn(2, 2, 24, 16).to(dtype).requires_grad_() for _ in range(2))
    mask = torch.rand(2, 1, 20, 24) > 0.2
    slopes = torch.rand(2, 4)  # ALiBi per batch entry and head: an operator argument like the mask
    args = (q, k, v, mask, slopes, 0.25, 1, 1, None, None, None)
    torch.library.opcheck(torch_ops.numba_attention_fwd, args)
    out, lse = torch_ops.numba_attention_fwd(*args)
    d_out = torch.randn_like(out)
    torch.library.opcheck(torch_ops.numba_attention_bwd,
                          (q.detach(), k.detach(), v.detach(), mask, slopes, out.detach(), d_out, lse.detach(),
                           0.25, 1, 1, None, None, None))


def test_opcheck_with_transposed_inputs():
    """Views as transformers passes them ((B, N, H, D) transposed): the fake results' strides must be
    the real ones' (Inductor asserts them)."""
    q, k, v = (torch.randn(2, 24, h, 16).transpose(1, 2).requires_grad_() for h in (4, 2, 2))
    args = (q, k, v, None, None, 0.25, 1, 1, None, None, None)
    torch.library.opcheck(torch_ops.numba_attention_fwd, args)
    out, lse = torch_ops.numba_attention_fwd(*args)
    torch.library.opcheck(torch_ops.numba_attention_bwd,
                          (q.detach(), k.detach(), v.detach(), None, None, out.detach(), torch.randn_like(out),
                           lse.detach(), 0.25, 1, 1, None, None, None))  # fmt: skip


def test_opcheck_with_sinks_and_a_seed_tensor():
    q = torch.randn(2, 4, 20, 16).requires_grad_()
    k, v = (torch.randn(2, 2, 24, 16).requires_grad_() for _ in range(2))
    sinks = torch.randn(4).requires_grad_()
    args = (q, k, v, None, None, 0.25, 1, 1, None, None, None, 0.2, 0, sinks, torch.tensor(77))
    torch.library.opcheck(torch_ops.numba_attention_fwd, args)


def test_opcheck_with_packed_sequences():
    q, k, v, cu_q, cu_k, _ = _packed([6, 0, 9], [7, 4, 9], 4, 2, 16, 3)
    sinks = torch.randn(4).requires_grad_()
    args = (q, k, v, None, None, 0.25, 2, 2, 5, 0, None, 0.0, 0, sinks, None, cu_q, cu_k)  # causal, window (5, 0)
    torch.library.opcheck(torch_ops.numba_attention_fwd, args)
    out, lse = torch_ops.numba_attention_fwd(*args)
    torch.library.opcheck(torch_ops.numba_attention_bwd,
                          (q.detach(), k.detach(), v.detach(), None, None, out.detach(), torch.randn_like(out),
                           lse.detach(), *args[5:13], sinks.detach(), None, cu_q, cu_k))  # fmt: skip


def test_compiled_flash_attn_func_with_dropout():
    """flash-attn's function draws its seed inside the graph too (it used to draw an int itself)."""
    from attnkit.flash_attn import flash_attn_func

    generator = torch.Generator().manual_seed(11)
    q = torch.randn(2, 9, 4, 16, generator=generator).requires_grad_()
    k, v = (torch.randn(2, 14, 2, 16, generator=generator).requires_grad_() for _ in range(2))

    def fn(q, k, v, dropout_p):
        return flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, 0.0), fn(q, k, v, 0.0), atol=0, rtol=0)
    torch.manual_seed(3)
    first, second = compiled(q, k, v, 0.2), compiled(q, k, v, 0.2)
    torch.manual_seed(3)
    torch.testing.assert_close(compiled(q, k, v, 0.2), first, atol=0, rtol=0)
    assert not torch.equal(first, second)
    # eager draws the same seed from the same generator state: aot_eager runs torch's own randint
    torch.manual_seed(3)
    expected = fn(q, k, v, 0.2)
    torch.testing.assert_close(expected, first, atol=0, rtol=0)
    d_out = torch.randn(first.shape, generator=generator)
    for name, got, want in zip("qkv", torch.autograd.grad(first, (q, k, v), d_out),
                               torch.autograd.grad(expected, (q, k, v), d_out)):  # fmt: skip
        torch.testing.assert_close(got, want, atol=0, rtol=0, msg=lambda m: f"d{name}: {m}")


def _packed(lengths_q, lengths_k, hq, hkv, d, seed, dtype=torch.float32):
    """q (Hq, total_q, D), k, v (Hkv, total_k, D) requiring grad, and their int32 offsets."""
    generator = torch.Generator().manual_seed(seed)
    cu_q, cu_k = (torch.tensor(np.cumsum([0] + lengths), dtype=torch.int32) for lengths in (lengths_q, lengths_k))
    q = torch.randn(hq, sum(lengths_q), d, generator=generator).to(dtype).requires_grad_()
    k, v = (torch.randn(hkv, sum(lengths_k), d, generator=generator).to(dtype).requires_grad_() for _ in range(2))
    return q, k, v, cu_q, cu_k, generator


def _varlen_window_sinks(q, k, v, cu_q, cu_k, sinks):
    return attnkit.varlen_attention(q, k, v, cu_q, cu_k, causal=True, window=(6, 0), sinks=sinks, return_lse=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_varlen_reads_its_offsets_when_it_runs(dtype):
    """One graph for packed sequences (cu_seqlens are its inputs, not constants): new offsets of the
    same shapes give the eager results without a recompile, forward and gradients, sinks included."""
    compiled = torch.compile(_varlen_window_sinks, fullgraph=True)
    for step, (lengths_q, lengths_k) in enumerate((([5, 0, 17, 9], [8, 3, 17, 30]), ([1, 20, 6, 4], [19, 1, 33, 5]))):
        q, k, v, cu_q, cu_k, generator = _packed(lengths_q, lengths_k, 4, 2, 16, step, dtype)
        sinks = torch.randn(4, generator=generator).requires_grad_()
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            out, lse = compiled(q, k, v, cu_q, cu_k, sinks)
        want_out, want_lse = _varlen_window_sinks(q, k, v, cu_q, cu_k, sinks)
        torch.testing.assert_close(out, want_out, atol=0, rtol=0)
        torch.testing.assert_close(lse, want_lse, atol=0, rtol=0)
        d_out = torch.randn(out.shape, generator=generator).to(dtype)
        inputs = (q, k, v, sinks)
        grads, want_grads = torch.autograd.grad(out, inputs, d_out), torch.autograd.grad(want_out, inputs, d_out)
        for name, got, want in zip("qkv", grads, want_grads):
            torch.testing.assert_close(got, want, atol=0, rtol=0, msg=lambda m: f"d{name}: {m}")
        # dsinks: a sum over rows that the compiled backward may order differently (see above)
        close = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(grads[3], want_grads[3], atol=close * want_grads[3].abs().max().item(), rtol=close)
    # and against the NumPy specification (the last offsets), by the 2x rule
    offsets = (cu_q.numpy(), cu_k.numpy())
    options = dict(causal=True, window=(6, 0))
    exact = reference_varlen(*(x.detach().double().numpy() for x in (q, k, v)), *offsets, **options,
                             sinks=sinks.detach().double().numpy())  # fmt: skip
    plain = torch.from_numpy(reference_varlen(*(x.detach().float().numpy() for x in (q, k, v)), *offsets, **options,
                                              sinks=sinks.detach().numpy()))  # fmt: skip
    assert_within_rule("out", out.detach().float().numpy(), exact, plain.to(dtype).float().numpy(), 2)


def test_compiled_varlen_checks_its_offsets_when_it_runs():
    compiled = torch.compile(attnkit.varlen_attention, fullgraph=True)
    q, k, v, cu_q, cu_k, _ = _packed([3, 4], [5, 6], 2, 2, 8, 0)
    with torch.no_grad():
        compiled(q, k, v, cu_q, cu_k)
        with pytest.raises(ValueError, match=r"cu_seqlens_k\[-1\] must equal the number of tokens, 11; got 12"):
            compiled(q, k, v, cu_q, torch.tensor([0, 6, 12], dtype=torch.int32))
        # checked while dynamo traces, which wraps the TypeError in its own exception
        with pytest.raises(Exception, match="cu_seqlens_q must have dtype int32 or int64; got float32"):
            compiled(q, k, v, cu_q.float(), cu_k)


def test_compiled_flash_attn_varlen_func():
    from attnkit.flash_attn import flash_attn_varlen_func

    q, k, v, cu_q, cu_k, generator = _packed([7, 2, 11], [7, 9, 11], 4, 2, 16, 5)
    q, k, v = (x.detach().transpose(0, 1).contiguous().requires_grad_() for x in (q, k, v))  # (total, H, D)

    def fn(q, k, v, cu_q, cu_k):
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, 11, 11, causal=True, softcap=4.0)

    out = torch.compile(fn, fullgraph=True)(q, k, v, cu_q, cu_k)
    want = fn(q, k, v, cu_q, cu_k)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    d_out = torch.randn(out.shape, generator=generator)
    for name, got, want in zip("qkv", torch.autograd.grad(out, (q, k, v), d_out),
                               torch.autograd.grad(want, (q, k, v), d_out)):  # fmt: skip
        torch.testing.assert_close(got, want, atol=0, rtol=0, msg=lambda m: f"d{name}: {m}")


def test_compiled_varlen_dropout_draws_per_call_and_repeats_with_its_seed():
    q, k, v, cu_q, cu_k, _ = _packed([10, 20, 1], [10, 20, 1], 4, 2, 16, 9)

    def fn(q, k, v, cu_q, cu_k, dropout_seed=None):
        return attnkit.varlen_attention(q, k, v, cu_q, cu_k, causal=True, dropout_p=0.3, dropout_seed=dropout_seed)

    compiled = torch.compile(fn, fullgraph=True)
    seeded, want = compiled(q, k, v, cu_q, cu_k, 5), fn(q, k, v, cu_q, cu_k, 5)
    torch.testing.assert_close(seeded, want, atol=0, rtol=0)
    for name, got, expected in zip("qkv", torch.autograd.grad(seeded.sum(), (q, k, v)),
                                   torch.autograd.grad(want.sum(), (q, k, v))):  # fmt: skip
        torch.testing.assert_close(got, expected, atol=0, rtol=0, msg=lambda m: f"d{name}: {m}")
    torch.manual_seed(3)
    first, second = compiled(q, k, v, cu_q, cu_k), compiled(q, k, v, cu_q, cu_k)
    torch.manual_seed(3)
    torch.testing.assert_close(compiled(q, k, v, cu_q, cu_k), first, atol=0, rtol=0)
    assert not torch.equal(first, second)


_FIRST_CALL_COMPILED = """
import torch, attnkit
q = torch.randn(1, 2, 16, 8, requires_grad=True)
compiled = torch.compile(lambda q: attnkit.scaled_dot_product_attention(q, q, q, is_causal=True), fullgraph=True)
out = compiled(q)
out.sum().backward()
want = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
print(float((out - want).abs().max()))
"""


def test_a_process_whose_first_call_is_compiled():
    """attnkit's first call in a process inside torch.compile: the planned-call setup (which converts
    a tensor to learn torch's bf16 route) must not run under dynamo, which cannot trace it. In this
    process other tests have made it already, so a fresh one checks."""
    result = subprocess.run([sys.executable, "-c", _FIRST_CALL_COMPILED], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.split()[-1]) < 1e-5
