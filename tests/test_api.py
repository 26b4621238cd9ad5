"""The public API: array types in and out, torch's SDPA semantics, autograd, dispatch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attnkit
from attnkit import reference
from attnkit.testing import assert_close


def randn(*shape, dtype=torch.float32, grad=False):
    return torch.randn(*shape, dtype=dtype, requires_grad=grad)


# --- array types, dtypes, shapes ---------------------------------------------

def test_numpy_in_numpy_out():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, 5, 8), dtype=np.float32) for _ in range(3))
    with pytest.warns(attnkit.AttnkitFallbackWarning, match="return_weights needs the whole weight matrix"):
        out, lse, w = attnkit.attention(q, k, v, causal=True, return_lse=True, return_weights=True)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (2, 3, 5, 8)
    assert lse.dtype == np.float32 and lse.shape == (2, 3, 5) and w.shape == (2, 3, 5, 5)
    expected = reference.attention(*(x.astype(np.float64) for x in (q, k, v)), causal=True)
    assert_close(out, expected, atol=1e-5, rtol=1e-5, name="out")


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2),
                                       (torch.float32, 1e-5), (torch.float64, 1e-12)],
                         ids=["fp16", "bf16", "fp32", "fp64"])
def test_torch_in_torch_out_keeps_dtype(dtype, tol):
    q, k, v = (randn(2, 4, 9, 16, dtype=dtype) for _ in range(3))
    out, lse = attnkit.attention(q, k, v, window=(3, 1), return_lse=True)
    assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.device == q.device
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    expected = reference.attention(*(x.double().numpy() for x in (q, k, v)), window=(3, 1))
    assert_close(out, expected, atol=tol, rtol=tol, name="out")


def test_two_axis_inputs_are_one_head():
    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((7, 4)), rng.standard_normal((9, 4)), rng.standard_normal((9, 3))
    with pytest.warns(attnkit.AttnkitFallbackWarning, match="return_weights needs the whole weight matrix"):
        out, lse, w = attnkit.attention(q, k, v, return_lse=True, return_weights=True)
    assert out.shape == (7, 3) and lse.shape == (7,) and w.shape == (7, 9)
    np.testing.assert_array_equal(
        out, attnkit.attention(q[None], k[None], v[None], backend="reference")[0])
    assert attnkit.attention(q, k, v).shape == (7, 3)  # on the fast backend too


def test_torch_non_contiguous_inputs():
    q, k, v = (randn(2, 13, 4, 16).transpose(1, 2) for _ in range(3))  # (B, N, H, D) -> (B, H, N, D)
    assert not q.is_contiguous()
    out = attnkit.attention(q, k, v, causal="bottom_right")
    np.testing.assert_array_equal(
        out.numpy(), attnkit.attention(*(x.contiguous() for x in (q, k, v)), causal="bottom_right").numpy())


# --- scaled_dot_product_attention: torch's semantics ---------------------------

SDPA_CASES = {
    "plain": dict(),
    "is_causal": dict(is_causal=True),
    "bool_mask": dict(attn_mask="bool"),
    "float_mask": dict(attn_mask="float"),
    "scale": dict(scale=0.3, is_causal=True),
    "gqa": dict(enable_gqa=True, hkv=2),
    "mqa_broadcast": dict(hkv=1),
}


@pytest.mark.parametrize("name", list(SDPA_CASES))
@pytest.mark.parametrize("nq,nk", [(17, 17), (5, 23), (23, 5)], ids=lambda n: f"N{n}")
def test_sdpa_matches_torch(name, nq, nk):
    options = dict(SDPA_CASES[name])
    hkv = options.pop("hkv", 4)
    q = randn(2, 4, nq, 16, dtype=torch.float64)
    k, v = randn(2, hkv, nk, 16, dtype=torch.float64), randn(2, hkv, nk, 8, dtype=torch.float64)
    if options.get("attn_mask") == "bool":
        options["attn_mask"] = torch.rand(2, 1, nq, nk) < 0.7
    elif options.get("attn_mask") == "float":
        options["attn_mask"] = torch.randn(nq, nk, dtype=torch.float64)
    expected = F.scaled_dot_product_attention(q, k, v, **options)
    assert_close(attnkit.scaled_dot_product_attention(q, k, v, **options), expected,
                 atol=1e-12, rtol=1e-10, name="out")


def test_sdpa_broadcasts_a_single_query_head_like_torch():
    q, k, v = randn(2, 1, 6, 8, dtype=torch.float64), randn(2, 3, 6, 8, dtype=torch.float64), \
        randn(2, 3, 6, 8, dtype=torch.float64)
    expected = F.scaled_dot_product_attention(q, k, v)
    assert_close(attnkit.scaled_dot_product_attention(q, k, v), expected, atol=1e-12, name="out")


def test_sdpa_accepts_numpy():
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((1, 2, 5, 4)) for _ in range(3))
    out = attnkit.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert isinstance(out, np.ndarray)
    expected = F.scaled_dot_product_attention(*(torch.from_numpy(x) for x in (q, k, v)), is_causal=True)
    assert_close(out, expected, atol=1e-12, name="out")


@pytest.mark.filterwarnings("error::attnkit.AttnkitFallbackWarning")  # dropout runs in the kernel
def test_sdpa_dropout_is_unbiased_and_rescaled():
    torch.manual_seed(0)
    q, k, v = (randn(1, 2, 6, 8, dtype=torch.float64) for _ in range(3))
    plain = attnkit.scaled_dot_product_attention(q, k, v)
    # With v = identity, the output is the kept weights: each is 0 or weight / (1 - p).
    eye = torch.eye(6, dtype=torch.float64).expand(1, 2, 6, 6)
    weights = attnkit.scaled_dot_product_attention(q, k, eye)
    dropped = attnkit.scaled_dot_product_attention(q, k, eye, dropout_p=0.4)
    kept = dropped != 0
    assert 0.4 < kept.float().mean() < 0.8
    assert_close(dropped[kept], weights[kept] / 0.6, atol=1e-12, name="kept weights")
    mean = sum(attnkit.scaled_dot_product_attention(q, k, v, dropout_p=0.4) for _ in range(400)) / 400
    assert_close(mean, plain, atol=0.12, name="mean over 400 dropout draws")
    assert (attnkit.scaled_dot_product_attention(q, k, v, dropout_p=1.0) == 0).all()


@pytest.mark.filterwarnings("error::attnkit.AttnkitFallbackWarning")  # dropout runs in the kernel
def test_sdpa_dropout_gradients():
    q, k, v = (randn(1, 2, 5, 4, dtype=torch.float64, grad=True) for _ in range(3))

    def fn(q, k, v):
        torch.manual_seed(7)  # the same dropout draw on every evaluation
        return attnkit.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True)

    assert torch.autograd.gradcheck(fn, (q, k, v))


# --- autograd -----------------------------------------------------------------

GRAD_CASES = {
    "causal_bottom_right-gqa": dict(causal="bottom_right", hkv=2),
    "window-softcap": dict(window=(2, 1), softcap=1.5),
    "bool_mask-fully_masked_row": dict(mask="bool"),
    "additive_mask-negative_scale": dict(mask="additive", scale=-0.4),
}


@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradcheck(name, backend):
    options = dict(GRAD_CASES[name])
    hkv = options.pop("hkv", 4)
    q = randn(2, 4, 6, 5, dtype=torch.float64, grad=True)
    k = randn(1, hkv, 7, 5, dtype=torch.float64, grad=True)
    v = randn(2, hkv, 7, 3, dtype=torch.float64, grad=True)
    if options.get("mask") == "bool":
        mask = torch.rand(2, 1, 6, 7) < 0.7
        mask[:, :, 2] = False
        options["mask"] = mask
    elif options.get("mask") == "additive":
        options["mask"] = torch.randn(4, 6, 7, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda q, k, v: attnkit.attention(q, k, v, backend=backend, **options), (q, k, v))


def test_fully_masked_row_gradients_are_zero():
    q, k, v = (randn(1, 2, 4, 8, grad=True) for _ in range(3))
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[1] = False
    out = attnkit.attention(q, k, v, mask=mask)
    out.sum().backward()
    assert (out[:, :, 1] == 0).all() and (q.grad[:, :, 1] == 0).all()
    assert not any(torch.isnan(x.grad).any() for x in (q, k, v))


def test_lse_and_weights_come_back_without_gradients():
    q, k, v = (randn(1, 2, 4, 8, grad=True) for _ in range(3))
    with pytest.warns(attnkit.AttnkitFallbackWarning, match="return_weights needs the whole weight matrix"):
        out, lse, w = attnkit.attention(q, k, v, return_lse=True, return_weights=True)
    assert out.requires_grad and not lse.requires_grad and not w.requires_grad


# --- dispatch -------------------------------------------------------------------

def test_explain_names_the_backend():
    q = np.zeros((1, 2, 3, 4), dtype=np.float32)
    text = attnkit.explain(q, q, q, backend="reference")
    assert text.startswith("backend 'reference' (asked for 'reference')")
    assert "Nq=3" in text and "float32" in text


def test_available_backends_lists_reference():
    assert attnkit.available_backends()["reference"] is None


def test_unknown_backend_is_refused():
    q = np.zeros((1, 2, 3, 4))
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'reference'.*got 'fastest'"):
        attnkit.attention(q, q, q, backend="fastest")
    with pytest.raises(TypeError, match="backend must be a string"):
        attnkit.attention(q, q, q, backend=3)


def test_data_off_the_cpu_falls_back_visibly(monkeypatch):
    """Data on an accelerator that no fast backend serves warns that it runs on the reference."""
    from attnkit import backends
    from attnkit.validation import validate_attention

    q = np.zeros((1, 2, 3, 4))
    spec = validate_attention(q, q, q, causal=False, mask=None, scale=None, window=None, softcap=None)
    cuda_spec = type(spec)(**{**spec.__dict__, "device": "cuda:0"})
    with pytest.warns(attnkit.AttnkitFallbackWarning, match="NumPy reference"):
        choice = backends.choose_backend(cuda_spec, "auto", backends.Request())
    assert choice.backend.name == "reference"


def test_explain_takes_varlen_arguments():
    """explain() says what varlen_attention (and the flash-attn functions on it) would run."""
    q, k = np.zeros((4, 30, 16), np.float32), np.zeros((2, 30, 16), np.float32)
    cu = np.array([0, 10, 30], np.int32)
    text = attnkit.explain(q, k, k, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True)
    assert text.startswith("backend 'numba' (asked for 'auto') for float32 numpy on cpu: 2 packed sequences")
    assert "Nq 10..20 (total 30)" in text and "products:" in text and "compiled for" in text
    reference = attnkit.explain(q, k, k, cu_seqlens_q=cu, cu_seqlens_k=cu, backend="reference")
    assert reference.startswith("backend 'reference' (asked for 'reference')")
    with pytest.raises(ValueError, match="cu_seqlens_q and cu_seqlens_k must be given together"):
        attnkit.explain(q, k, k, cu_seqlens_q=cu)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        attnkit.explain(q, k, k, cu_seqlens_q=cu, cu_seqlens_k=np.array([0, 10, 29], np.int32))
