"""torch.compile on CPU tensors: attnkit's Numba kernel as torch.library operators (attnkit/torch_ops.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnkit
from attnkit import torch_ops
from attnkit.reference import attention

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
    with pytest.raises(Exception, match="return_weights and dropout need the NumPy reference"):
        compiled(q)


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
