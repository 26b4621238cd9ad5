"""The plan cache (attnkit/api.py): validation and backend choice reused per call signature, never misapplied."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnkit
from attnkit import api
from attnkit.reference import attention


def expected(q, k, v, mask=None, causal=False):
    as64 = lambda x: x.detach().double().numpy() if isinstance(x, torch.Tensor) else x.astype(np.float64)  # noqa: E731
    return attention(*(as64(x) for x in (q, k, v)), mask=None if mask is None else np.asarray(mask), causal=causal)


def close(out, want, tol):
    got = out.detach().double().numpy() if isinstance(out, torch.Tensor) else out.astype(np.float64)
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol)


def test_calls_that_differ_in_layout_dtype_or_mask_each_get_their_own_plan():
    api.clear_plans()
    rng = np.random.default_rng(0)
    base = rng.standard_normal((2, 3, 20, 16)).astype(np.float32)
    k = torch.from_numpy(rng.standard_normal((2, 3, 20, 16)).astype(np.float32))
    v = torch.from_numpy(rng.standard_normal((2, 3, 20, 16)).astype(np.float32))
    q = torch.from_numpy(base)
    q_strided = torch.from_numpy(np.ascontiguousarray(base.transpose(0, 2, 1, 3))).transpose(1, 2)  # same values
    bool_mask = torch.from_numpy(rng.random((2, 1, 20, 20)) < 0.7)
    additive = torch.from_numpy(rng.standard_normal((2, 1, 20, 20)).astype(np.float32))
    calls = [
        (dict(), expected(q, k, v), 2e-5),
        (dict(query=q_strided), expected(q, k, v), 2e-5),
        (dict(is_causal=True), expected(q, k, v, causal=True), 2e-5),
        (dict(attn_mask=bool_mask), expected(q, k, v, bool_mask), 2e-5),
        (dict(attn_mask=additive), expected(q, k, v, additive), 2e-5),
        (dict(query=q.double(), key=k.double(), value=v.double()), expected(q, k, v), 1e-12),
        (dict(query=q.half(), key=k.half(), value=v.half()), expected(q.half(), k.half(), v.half()), 2e-3),
    ]
    for _ in range(2):  # the second round runs every call from its plan
        for changes, want, tol in calls:
            arguments = dict(query=q, key=k, value=v) | changes
            out = attnkit.scaled_dot_product_attention(**arguments)
            assert out.dtype == arguments["query"].dtype
            close(out, want, tol)
    # Each layout, dtype and mask has a validation plan of its own, the strided query too: strides are
    # in the planned calls' key as well (attnkit/planned.py), and its planned call copies it.
    assert api.cached_plans() == len(calls)


def test_a_plan_never_skips_validation_of_what_it_does_not_cover():
    q = torch.randn(1, 2, 8, 16)
    attnkit.scaled_dot_product_attention(q, q, q)
    with pytest.raises(TypeError, match="is_causal must be a bool"):
        attnkit.scaled_dot_product_attention(q, q, q, is_causal=1)
    with pytest.raises(ValueError, match="scale"):
        attnkit.scaled_dot_product_attention(q, q, q, scale=float("nan"))
    with pytest.raises(ValueError, match="dropout_p must be in"):
        attnkit.scaled_dot_product_attention(q, q, q, dropout_p=1.5)
    q.requires_grad_()
    out = attnkit.scaled_dot_product_attention(q, q, q)  # requires_grad is part of the signature
    out.sum().backward()
    assert q.grad is not None


def test_the_reference_fallback_warns_on_every_call():
    q = np.zeros((1, 2, 8, 16), np.float32)
    for _ in range(2):
        with pytest.warns(attnkit.AttnkitFallbackWarning):
            attnkit.attention(q, q, q, return_weights=True)
