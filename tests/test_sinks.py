"""Learned attention sinks (gpt-oss): one logit per query head in every row's softmax, no value.

The expected results are written out here with torch in float64 (the sink as one more score column,
softmax, the column dropped), not taken from attnkit; gradients come from torch's autograd of that.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnkit
from attnkit.reference import attention as reference_attention
from attnkit.reference import attention_backward as reference_backward
from triton_device import triton_device


def explicit(q, k, v, sinks, mask=None, scale=None):
    """(out, lse) of softmax([q k^T * scale (+ mask), sink]) without the sink column, @ v (torch)."""
    group = q.shape[-3] // k.shape[-3]
    k, v = (x.repeat_interleave(group, dim=-3) for x in (k, v))
    s = q @ k.transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    column = sinks.reshape(-1, 1, 1).expand(s.shape[:-1] + (1,))
    s = torch.cat([s, column], dim=-1)
    return torch.softmax(s, dim=-1)[..., :-1] @ v, torch.logsumexp(s, dim=-1)


def inputs(seed, b=2, hq=4, hkv=2, nq=23, nk=31, d=16, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g, dtype=dtype)
    k, v = (torch.randn(b, hkv, nk, d, generator=g, dtype=dtype) for _ in range(2))
    sinks = torch.randn(hq, generator=g, dtype=dtype) * 2
    return q, k, v, sinks


def test_the_reference_is_the_sink_as_one_more_column():
    q, k, v, sinks = inputs(0)
    mask = torch.rand(2, 1, 23, 31, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[0, 0, 3] = False  # a row that sees no key: all its weight on the sink
    want_out, want_lse = explicit(q, k, v, sinks, mask)
    out, lse = reference_attention(*(x.numpy() for x in (q, k, v)), mask=mask.numpy(), sinks=sinks.numpy(),
                                   return_lse=True)  # fmt: skip
    np.testing.assert_allclose(out, want_out.numpy(), atol=1e-12)
    np.testing.assert_allclose(lse, want_lse.numpy(), atol=1e-12)
    assert np.all(out[0, :, 3] == 0) and np.isfinite(out).all()

    leaves = [x.clone().requires_grad_() for x in (q, k, v, sinks)]
    d_out = torch.randn_like(want_out)
    expected = torch.autograd.grad(explicit(*leaves, mask)[0], leaves, d_out)
    grads = reference_backward(*(x.numpy() for x in (q, k, v)), out, d_out.numpy(), lse, mask=mask.numpy(),
                               sinks=sinks.numpy())  # fmt: skip
    assert len(grads) == 4
    for name, got, want in zip(("dq", "dk", "dv", "dsinks"), grads, expected):
        np.testing.assert_allclose(got, want.numpy(), atol=1e-10, err_msg=name)


@pytest.mark.parametrize("backend", ["numba", "reference"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_with_sinks_forward_and_gradients(backend, causal):
    q, k, v, sinks = inputs(2, nq=31)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, sinks)]
    mask = torch.ones(31, 31, dtype=torch.bool).tril() if causal else None
    want, want_lse = explicit(*leaves, mask)
    got_leaves = [x.clone().requires_grad_() for x in (q, k, v, sinks)]
    out, lse = attnkit.attention(*got_leaves[:3], causal=causal, sinks=got_leaves[3], return_lse=True,
                                 backend=backend)  # fmt: skip
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, want_lse, atol=1e-10, rtol=1e-10)
    d_out = torch.randn_like(out)
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), torch.autograd.grad(out, got_leaves, d_out),
                          torch.autograd.grad(want, leaves, d_out)):  # fmt: skip
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9, msg=name)


def test_sinks_in_float32_and_through_sdpa_and_varlen():
    q, k, v, sinks = inputs(3, b=1, dtype=torch.float32)
    want, _ = explicit(*(x.double() for x in (q, k, v, sinks)))
    out = attnkit.scaled_dot_product_attention(q, k, v, enable_gqa=True, sinks=sinks)
    torch.testing.assert_close(out.double(), want, atol=2e-6, rtol=1e-5)
    # The same sequence packed (one sequence), and a row that sees nothing gives 0, not NaN.
    cu_q, cu_k = torch.tensor([0, 23], dtype=torch.int32), torch.tensor([0, 31], dtype=torch.int32)
    packed = attnkit.varlen_attention(q[0], k[0], v[0], cu_q, cu_k, sinks=sinks)
    torch.testing.assert_close(packed, out[0], atol=2e-6, rtol=1e-5)
    empty = attnkit.attention(q, k, v, mask=torch.zeros(23, 31, dtype=torch.bool), sinks=sinks)
    assert torch.equal(empty, torch.zeros_like(empty))


def test_sinks_are_checked():
    q = torch.randn(1, 4, 5, 8)
    with pytest.raises(ValueError, match=r"sinks must have shape \(4,\), one logit per query head; got \(2,\)"):
        attnkit.attention(q, q, q, sinks=torch.zeros(2))
    with pytest.raises(TypeError, match="sinks must be a float"):
        attnkit.attention(q, q, q, sinks=np.zeros(4))


def _gpt_oss_pair():
    """(eager, attnkit) small gpt-oss models with the same random weights, sinks of different sizes."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "GptOssConfig"):
        pytest.skip("this transformers has no gpt-oss")
    from attnkit.integrations.transformers import register

    register()
    config = transformers.GptOssConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=2, num_experts_per_tok=1, sliding_window=4,
        max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    eager = transformers.GptOssForCausalLM(config)
    eager.config._attn_implementation = "eager"
    ours = transformers.GptOssForCausalLM(config)
    ours.load_state_dict(eager.state_dict())
    ours.config._attn_implementation = "attnkit"
    with torch.no_grad():  # learned sinks of different sizes, so they matter
        for a, b in zip(eager.model.layers, ours.model.layers):
            a.self_attn.sinks.copy_(torch.randn_like(a.self_attn.sinks))
            b.self_attn.sinks.copy_(a.self_attn.sinks)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    return eager, ours, ids


def _same_logits_and_gradients(eager, ours, ids, run_ours):
    want, got = eager(ids).logits, run_ours(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    want.sum().backward()
    got.sum().backward()
    for (name, a), (_, b) in zip(eager.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_gpt_oss_with_attnkit_gives_eagers_logits_and_gradients():
    eager, ours, ids = _gpt_oss_pair()
    _same_logits_and_gradients(eager, ours, ids, ours)
    assert torch.equal(eager.generate(ids[:1, :5], max_new_tokens=6, do_sample=False),
                       ours.generate(ids[:1, :5], max_new_tokens=6, do_sample=False))


def test_gpt_oss_with_attnkit_under_torch_compile():
    """The whole model traced (AOTAutograd, eager kernels: Inductor's code generation takes ~40 s
    here; tests/test_compile.py checks the operators' fake strides that Inductor asserts): logits
    and every parameter's gradient, the sinks' included, as eager attention gives them."""
    eager, ours, ids = _gpt_oss_pair()
    _same_logits_and_gradients(eager, ours, ids, torch.compile(ours, backend="aot_eager"))


def test_the_flash_attn_functions_take_fa4s_learnable_sink():
    from attnkit.flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

    q, k, v, sinks = inputs(5, b=2, nq=9, nk=14, dtype=torch.float32)
    # flash-attn aligns bottom-right: query i sees keys j <= i + Nk - Nq
    mask = torch.ones(9, 14, dtype=torch.bool).tril(diagonal=14 - 9)
    want, _ = explicit(*(x.double() for x in (q, k, v, sinks)), mask)
    want = want.transpose(1, 2).float()  # (B, Nq, Hq, D)
    bnhd = [x.transpose(1, 2).contiguous() for x in (q, k, v)]
    torch.testing.assert_close(flash_attn_func(*bnhd, causal=True, learnable_sink=sinks), want, atol=2e-6, rtol=1e-5)
    cu_q, cu_k = (torch.arange(0, 3 * n, n, dtype=torch.int32) for n in (9, 14))
    packed = flash_attn_varlen_func(*(x.reshape(-1, *x.shape[2:]) for x in bnhd), cu_q, cu_k, 9, 14, causal=True,
                                    learnable_sink=sinks)  # fmt: skip
    torch.testing.assert_close(packed.reshape(2, 9, 4, 16), want, atol=2e-6, rtol=1e-5)
    cached = flash_attn_with_kvcache(bnhd[0], bnhd[1], bnhd[2], causal=True, learnable_sink=sinks)
    torch.testing.assert_close(cached, want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sinks_within_flash_attns_rule(dtype):
    """Forward and dq, dk, dv, dsinks within 2x / 3x the error of the plain computation in the same dtype."""
    from attnkit.testing import assert_within_rule

    q, k, v, sinks = inputs(7, b=2, hq=4, hkv=2, nq=70, nk=70, d=32)
    d_out = torch.randn(2, 4, 70, 32, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    mask = torch.ones(70, 70, dtype=torch.bool).tril()

    def run(fn, cast):
        leaves = [cast(x).clone().requires_grad_() for x in (q, k, v, sinks)]
        out = fn(leaves)
        grads = torch.autograd.grad(out, leaves, cast(d_out))
        return [x.detach().double().numpy() for x in (out, *grads)]

    exact = run(lambda x: explicit(*x, mask)[0], lambda x: x)
    plain = run(lambda x: explicit(*x, mask)[0], lambda x: x.to(dtype))
    ours = run(lambda x: attnkit.attention(*x[:3], causal=True, sinks=x[3]), lambda x: x.to(dtype))
    for name, got, want, same_dtype, factor in zip(("out", "dq", "dk", "dv", "dsinks"), ours, exact, plain,
                                                   (2, 3, 3, 3, 3)):  # fmt: skip
        assert_within_rule(name, got, want, same_dtype, factor, floor=1e-6 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("backend", ["numba", "reference"] + ["triton"] * (triton_device()[0] is not None))
def test_the_kernels_join_the_sinks_everywhere(backend):
    """Dense with a masked row, a decode step (GQA, the Numba decode path), and packed sequences one of
    which has no keys: out and lse against the explicit computation; an empty row gives 0 and lse = sink."""
    device = (triton_device()[0] if backend == "triton" else None) or "cpu"
    q, k, v, sinks = (x.float() for x in inputs(20, b=2, hq=4, hkv=2, nq=19, nk=27, d=16))
    mask = torch.rand(2, 1, 19, 27, generator=torch.Generator().manual_seed(21)) > 0.3
    mask[1, 0, 4] = False
    want, want_lse = explicit(*(x.double() for x in (q, k, v, sinks)), mask)
    on = [x.to(device) for x in (q, k, v, sinks)]
    out, lse = attnkit.attention(*on[:3], mask=mask.to(device), sinks=on[3], return_lse=True, backend=backend)
    torch.testing.assert_close(out.double().cpu(), want, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double().cpu(), want_lse, atol=2e-6, rtol=1e-5)
    assert torch.equal(out[1, :, 4].cpu(), torch.zeros(4, 16)) and torch.allclose(lse[1, :, 4].cpu(), sinks)

    dq, dk, dv, ds = (x.float() for x in inputs(22, b=2, hq=8, hkv=2, nq=1, nk=600, d=32))  # decode
    want, want_lse = explicit(*(x.double() for x in (dq, dk, dv, ds)))
    out, lse = attnkit.attention(*(x.to(device) for x in (dq, dk, dv)), sinks=ds.to(device), return_lse=True,
                                 backend=backend)  # fmt: skip
    torch.testing.assert_close(out.double().cpu(), want, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double().cpu(), want_lse, atol=2e-6, rtol=1e-5)

    cu_q, cu_k = torch.tensor([0, 19, 38]), torch.tensor([0, 27, 27])  # the second sequence has no keys
    packed, packed_lse = attnkit.varlen_attention(q.transpose(0, 1).reshape(4, 38, 16).to(device),
                                                  k[0].to(device), v[0].to(device), cu_q, cu_k, sinks=on[3],
                                                  return_lse=True, backend=backend)  # fmt: skip
    first, first_lse = explicit(*(x.double() for x in (q[0], k[0], v[0], sinks)))
    torch.testing.assert_close(packed[:, :19].double().cpu(), first, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(packed_lse[:, :19].double().cpu(), first_lse, atol=2e-6, rtol=1e-5)
    assert torch.equal(packed[:, 19:].cpu(), torch.zeros(4, 19, 16))
    torch.testing.assert_close(packed_lse[:, 19:].cpu(), sinks[:, None].expand(4, 19))
