"""The loop-by-loop teaching version and the multi-head layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnkit.reference import attention, multi_head_attention, naive_attention
from attnkit.testing import assert_close

NAIVE_CASES = {
    "plain": dict(),
    "causal_top_left": dict(causal=True),
    "causal_bottom_right-window": dict(causal="bottom_right", window=(2, None)),
    "window_both_sides-softcap": dict(window=(1, 2), softcap=2.5, scale=-0.7),
    "bool_mask-gqa": dict(mask="bool"),
    "additive_mask": dict(mask="additive"),
}


@pytest.mark.parametrize("name", list(NAIVE_CASES))
@pytest.mark.parametrize("nq,nk", [(5, 7), (7, 4), (1, 1)], ids=lambda n: f"N{n}")
def test_naive_equals_reference(name, nq, nk):
    rng = np.random.default_rng(abs(hash((name, nq, nk))) % 2**32)
    q = rng.standard_normal((2, 4, nq, 6))
    k = rng.standard_normal((1, 2, nk, 6))  # broadcast batch, GQA 2:1
    v = rng.standard_normal((2, 2, nk, 3))
    options = dict(NAIVE_CASES[name])
    if options.get("mask") == "bool":
        options["mask"] = rng.random((2, 1, nq, nk)) < 0.6
    elif options.get("mask") == "additive":
        options["mask"] = np.where(rng.random((nq, nk)) < 0.3, -np.inf, rng.standard_normal((nq, nk)))
    out, lse = naive_attention(q, k, v, return_lse=True, **options)
    expected, expected_lse = attention(q, k, v, return_lse=True, **options)
    assert_close(out, expected, atol=1e-12, rtol=1e-12, name="out")
    assert_close(lse, expected_lse, atol=1e-12, rtol=1e-12, name="lse")


def _torch_mha(embed, heads, kdim=None):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(embed, heads, batch_first=True, kdim=kdim, vdim=kdim,
                                      dtype=torch.float64)
    with torch.no_grad():  # non-zero biases so they are checked too
        for p in (mha.in_proj_bias, mha.out_proj.bias):
            p.normal_()
    return mha


def _weights_of(mha, embed, separate):
    """The torch layer's parameters in attnkit's y = x @ w + b convention."""
    if separate:
        w_q, w_k, w_v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    else:
        w_q, w_k, w_v = mha.in_proj_weight.split(embed)
    b_q, b_k, b_v = mha.in_proj_bias.split(embed)
    arrays = dict(w_q=w_q.T, w_k=w_k.T, w_v=w_v.T, w_o=mha.out_proj.weight.T,
                  b_q=b_q, b_k=b_k, b_v=b_v, b_o=mha.out_proj.bias)
    return {k: v.detach().numpy() for k, v in arrays.items()}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_self_attention_matches_torch_multihead_attention(causal):
    embed, heads, n = 24, 4, 11
    mha = _torch_mha(embed, heads)
    x = torch.randn(3, n, embed, dtype=torch.float64)
    mask = None
    if causal:  # torch's float mask: -inf where a query may not look
        mask = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)
    y_t, w_t = mha(x, x, x, attn_mask=mask, need_weights=True, average_attn_weights=False)
    y, w = multi_head_attention(x.numpy(), num_heads=heads, causal=causal, return_weights=True,
                                **_weights_of(mha, embed, separate=False))
    assert_close(y, y_t.detach(), atol=1e-12, rtol=1e-10, name="y")
    assert_close(w, w_t.detach(), atol=1e-12, rtol=1e-10, name="weights")


def test_cross_attention_matches_torch_multihead_attention():
    embed, heads, kdim = 16, 2, 10
    mha = _torch_mha(embed, heads, kdim=kdim)
    x = torch.randn(2, 5, embed, dtype=torch.float64)
    context = torch.randn(2, 9, kdim, dtype=torch.float64)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 6:] = True  # torch: True = padding, ignored
    y_t, w_t = mha(x, context, context, key_padding_mask=pad, average_attn_weights=False)
    y, w = multi_head_attention(
        x.numpy(), num_heads=heads, context=context.numpy(), mask=~pad.numpy()[:, None, None, :],
        return_weights=True, **_weights_of(mha, embed, separate=True))
    assert y.shape == (2, 5, embed) and w.shape == (2, heads, 5, 9)
    assert_close(y, y_t.detach(), atol=1e-12, rtol=1e-10, name="y")
    assert_close(w, w_t.detach(), atol=1e-12, rtol=1e-10, name="weights")


def test_grouped_query_heads_from_projection_widths():
    rng = np.random.default_rng(2)
    embed, heads, kv_heads, head_dim = 16, 4, 2, 4
    x = rng.standard_normal((7, embed))
    w_q = rng.standard_normal((embed, heads * head_dim))
    w_k = rng.standard_normal((embed, kv_heads * head_dim))
    w_v = rng.standard_normal((embed, kv_heads * head_dim))
    w_o = rng.standard_normal((heads * head_dim, embed))
    y = multi_head_attention(x, w_q, w_k, w_v, w_o, heads)
    # the same layer with each kv head's projection repeated for its query heads
    repeat = lambda w: np.repeat(w.reshape(embed, kv_heads, head_dim), heads // kv_heads, 1).reshape(embed, -1)
    expected = multi_head_attention(x, w_q, repeat(w_k), repeat(w_v), w_o, heads)
    assert_close(y, expected, atol=1e-12, rtol=1e-12, name="y")


def test_head_count_that_does_not_divide_the_width_is_an_error():
    w = np.zeros((8, 8))
    with pytest.raises(ValueError, match="num_heads=3"):
        multi_head_attention(np.zeros((2, 8)), w, w, w, w, 3)
