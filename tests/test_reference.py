"""The NumPy specification against torch (float64), which attnkit did not write.

Forward: torch's SDPA math backend (softcap: FlexAttention); lse: FlexAttention;
weights: SDPA with identity values (out = weights @ I). Backward: torch
autograd. Shapes, masks and options come from hypothesis; the edge cases from
anchors.md are spelled out below.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnkit.reference import attention, attention_backward
from attnkit.testing import assert_close
from peers import flex, sdpa_math, softcap_autograd

F64 = dict(atol=1e-10, rtol=1e-9)


@dataclass
class Case:
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    d_out: np.ndarray
    mask: np.ndarray | None
    causal: object
    scale: float | None
    window: tuple | None
    softcap: float | None

    @property
    def options(self):
        return dict(causal=self.causal, mask=self.mask, scale=self.scale, window=self.window,
                    softcap=self.softcap)


def random_mask(rng, shape, kind):
    """A bool or additive mask of `shape`, with some rows fully masked."""
    if kind == "bool":
        mask = rng.random(shape) < 0.7
        if shape[-2] > 1:
            mask[..., 0, :] = False  # one fully masked row wherever the row axis is real
        return mask
    mask = rng.standard_normal(shape)
    mask[rng.random(shape) < 0.3] = -np.inf
    return mask


@st.composite
def cases(draw, max_n=24):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    batch = draw(st.integers(1, 2))
    hkv = draw(st.integers(1, 3))
    hq = hkv * draw(st.sampled_from([1, 2, 4]))
    nq = draw(st.integers(1, max_n))
    nk = draw(st.integers(1, max_n))
    d = draw(st.integers(1, 16))
    dv = draw(st.integers(1, 16))
    causal = draw(st.sampled_from([False, True, "top_left", "bottom_right"]))
    scale = draw(st.one_of(st.none(), st.floats(-2.0, 2.0, allow_nan=False)))
    window = draw(st.one_of(
        st.none(),
        st.tuples(st.one_of(st.none(), st.integers(0, max_n)),
                  st.one_of(st.none(), st.integers(0, max_n))),
    ))
    softcap = draw(st.one_of(st.none(), st.floats(0.5, 30.0)))
    mask_kind = draw(st.sampled_from([None, "bool", "additive"]))
    mask = None
    if mask_kind:
        full = (batch, hq, nq, nk)
        keep = draw(st.lists(st.booleans(), min_size=3, max_size=3))  # per B, H, Nq axis
        shape = tuple(n if kept else 1 for n, kept in zip(full[:3], keep)) + (nk,)
        drop_leading = draw(st.integers(0, 2)) if not keep[0] else 0
        if drop_leading == 2 and keep[1]:
            drop_leading = 1
        mask = random_mask(rng, shape[drop_leading:], mask_kind)
    q = rng.standard_normal((batch, hq, nq, d))
    k = rng.standard_normal((batch, hkv, nk, d))
    v = rng.standard_normal((batch, hkv, nk, dv))
    d_out = rng.standard_normal((batch, hq, nq, dv))
    return Case(q, k, v, d_out, mask, causal, scale, window, softcap)


HYPOTHESIS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@HYPOTHESIS
@given(case=cases())
def test_forward_matches_torch(case):
    out, lse, weights = attention(case.q, case.k, case.v, return_lse=True, return_weights=True,
                                  **case.options)
    peer_out, peer_lse = flex(case.q, case.k, case.v, **case.options)
    assert_close(out, peer_out, name="out vs FlexAttention", **F64)
    assert_close(lse, peer_lse, name="lse vs FlexAttention", **F64)
    if case.softcap is None:
        options = {k: v for k, v in case.options.items() if k != "softcap"}
        peer_out, _ = sdpa_math(case.q, case.k, case.v, **options)
        assert_close(out, peer_out.detach(), name="out vs SDPA math", **F64)
        # With the identity as values, attention returns its own weights.
        nk = case.k.shape[-2]
        eye = np.broadcast_to(np.eye(nk), case.k.shape[:-2] + (nk, nk))
        peer_weights, _ = sdpa_math(case.q, case.k, eye, **options)
        assert_close(weights, peer_weights.detach(), name="weights vs SDPA math", **F64)


@HYPOTHESIS
@given(case=cases())
def test_backward_matches_torch_autograd(case):
    out, lse = attention(case.q, case.k, case.v, return_lse=True, **case.options)
    grads = attention_backward(case.q, case.k, case.v, out, case.d_out, lse, **case.options)
    if case.softcap is None:
        options = {k: v for k, v in case.options.items() if k != "softcap"}
        peer_out, leaves = sdpa_math(case.q, case.k, case.v, requires_grad=True, **options)
    else:
        peer_out, leaves = softcap_autograd(case.q, case.k, case.v, **case.options)
    peer_out.backward(torch.from_numpy(case.d_out))
    for name, grad, leaf in zip(("dq", "dk", "dv"), grads, leaves):
        assert_close(grad, leaf.grad, name=name, **F64)


# --- edge cases (anchors.md) -------------------------------------------------

def qkv(rng, b, hq, hkv, nq, nk, d, dv=None, dtype=np.float64):
    dv = d if dv is None else dv
    return (rng.standard_normal(s).astype(dtype) for s in
            ((b, hq, nq, d), (b, hkv, nk, d), (b, hkv, nk, dv)))


@pytest.mark.parametrize("nq,nk", [(1, 1), (1, 239), (239, 1), (113, 203), (203, 113), (1023, 1024)],
                         ids=lambda n: str(n))
@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
def test_sizes_from_anchors(nq, nk, causal):
    rng = np.random.default_rng(nq * 7919 + nk)
    q, k, v = qkv(rng, 1, 4, 2, nq, nk, 16)
    out, lse = attention(q, k, v, causal=causal, return_lse=True)
    peer_out, peer_lse = flex(q, k, v, causal=causal)
    assert_close(out, peer_out, name="out", **F64)
    assert_close(lse, peer_lse, name="lse", **F64)


def test_bottom_right_is_the_flash_attn_alignment():
    """Nq < Nk: the last query sees every key; Nq > Nk: the first Nq - Nk queries see none."""
    rng = np.random.default_rng(1)
    q, k, v = qkv(rng, 1, 1, 1, 3, 5, 4)
    _, w = attention(q, k, v, causal="bottom_right", return_weights=True)
    expected = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=bool)
    np.testing.assert_array_equal(w[0, 0] > 0, expected)
    q, k, v = qkv(rng, 1, 1, 1, 5, 3, 4)
    out, lse, w = attention(q, k, v, causal="bottom_right", return_lse=True, return_weights=True)
    np.testing.assert_array_equal(w[0, 0] > 0, np.tril(np.ones((5, 3), bool), k=-2))
    assert (out[0, 0, :2] == 0).all() and np.isneginf(lse[0, 0, :2]).all()


def fully_masked_cases(rng):
    """(name, q, k, v, options, rows): options that leave `rows` of head 0 with no key."""
    q, k, v = qkv(rng, 2, 4, 2, 6, 5, 8, 3)
    bool_mask = rng.random((2, 1, 6, 5)) < 0.8
    bool_mask[:, :, [1, 4]] = False
    additive = rng.standard_normal((2, 4, 6, 5))
    additive[:, :, [1, 4]] = -np.inf
    yield "bool mask", q, k, v, dict(mask=bool_mask), [1, 4]
    yield "additive -inf", q, k, v, dict(mask=additive, softcap=3.0), [1, 4]
    yield "bottom_right Nq>Nk", q, k, v, dict(causal="bottom_right"), [0]
    yield "window", q, k, v, dict(window=(0, 0), mask=np.eye(6, 5, k=1, dtype=bool)), [5]


@pytest.mark.parametrize("name", ["bool mask", "additive -inf", "bottom_right Nq>Nk", "window"])
def test_fully_masked_rows_are_exact_zeros(name):
    rng = np.random.default_rng(3)
    case = {c[0]: c[1:] for c in fully_masked_cases(rng)}[name]
    q, k, v, options, rows = case
    with np.errstate(all="raise"):  # no warnings either
        out, lse, w = attention(q, k, v, return_lse=True, return_weights=True, **options)
        d_out = rng.standard_normal(out.shape)
        dq, dk, dv = attention_backward(q, k, v, out, d_out, lse, **options)
    assert np.all(out[:, :, rows] == 0) and np.all(w[:, :, rows] == 0)
    assert np.all(np.isneginf(lse[:, :, rows]))
    assert np.all(dq[:, :, rows] == 0)
    for x in (out, lse, w, dq, dk, dv):
        assert not np.isnan(x).any()


def test_no_keys_and_no_queries():
    rng = np.random.default_rng(4)
    q, k, v = qkv(rng, 2, 4, 2, 3, 0, 8, 5)
    out, lse, w = attention(q, k, v, return_lse=True, return_weights=True, causal=True)
    assert out.shape == (2, 4, 3, 5) and (out == 0).all()
    assert lse.shape == (2, 4, 3) and np.isneginf(lse).all()
    assert w.shape == (2, 4, 3, 0)
    grads = attention_backward(q, k, v, out, np.ones_like(out), lse)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    assert all((g == 0).all() for g in grads)

    q, k, v = qkv(rng, 2, 4, 2, 0, 7, 8, 5)
    out, lse = attention(q, k, v, return_lse=True, causal="bottom_right")
    assert out.shape == (2, 4, 0, 5) and lse.shape == (2, 4, 0)


def test_large_scores_stay_finite_and_exact():
    """Scores up to about ±1e4 (anchors: inputs scaled up)."""
    rng = np.random.default_rng(5)
    q, k, v = qkv(rng, 1, 2, 2, 64, 80, 32)
    q *= 60.0
    k *= 60.0  # |q.k| / sqrt(32) reaches ~1e4
    out, lse = attention(q, k, v, return_lse=True)
    assert np.abs(lse).max() > 5e3
    peer_out, peer_lse = flex(q, k, v)
    assert_close(out, peer_out, name="out", **F64)
    assert_close(lse, peer_lse, atol=1e-8, rtol=1e-12, name="lse")
    out32 = attention(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32))
    assert np.isfinite(out32).all()


def test_non_contiguous_inputs_equal_contiguous():
    rng = np.random.default_rng(6)
    # (B, N, H, D) seen as (B, H, N, D), as a model's projections usually are
    q, k, v = (rng.standard_normal((2, n, h, 16)).transpose(0, 2, 1, 3)
               for n, h in ((9, 4), (11, 2), (11, 2)))
    mask = (rng.random((11, 9)) < 0.8).T  # transposed, non-contiguous mask
    options = dict(causal="bottom_right", mask=mask, softcap=4.0)
    out = attention(q, k, v, **options)
    contiguous = attention(*(np.ascontiguousarray(x) for x in (q, k, v)),
                           **{**options, "mask": np.ascontiguousarray(mask)})
    np.testing.assert_array_equal(out, contiguous)
    d_out = rng.standard_normal(out.shape)[..., ::-1]  # a reversed (negative-stride) gradient
    _, lse = attention(q, k, v, return_lse=True, **options)
    grads = attention_backward(q, k, v, out, d_out, lse, **options)
    expected = attention_backward(*(np.ascontiguousarray(x) for x in (q, k, v, out, d_out, lse)),
                                  **options)
    for g, e in zip(grads, expected):
        np.testing.assert_array_equal(g, e)


def test_broadcast_batch_axes_and_gradients_sum_back():
    rng = np.random.default_rng(7)
    q = rng.standard_normal((3, 4, 5, 8))
    k = rng.standard_normal((1, 2, 6, 8))  # shared across the batch
    v = rng.standard_normal((2, 6, 8))  # no batch axis at all
    out, lse = attention(q, k, v, return_lse=True)
    full = [np.broadcast_to(x, (3,) + x.shape[-3:]) for x in (k, v)]
    peer_out, leaves = sdpa_math(q, *full, requires_grad=True)
    assert_close(out, peer_out.detach(), name="out", **F64)
    d_out = rng.standard_normal(out.shape)
    dq, dk, dv = attention_backward(q, k, v, out, d_out, lse)
    peer_out.backward(torch.from_numpy(d_out))
    assert dk.shape == k.shape and dv.shape == v.shape
    assert_close(dk, leaves[1].grad.sum(0, keepdim=True), name="dk", **F64)
    assert_close(dv, leaves[2].grad.sum(0), name="dv", **F64)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_low_precision_is_computed_in_float32(dtype):
    rng = np.random.default_rng(8)
    q, k, v = qkv(rng, 1, 2, 1, 33, 47, 16, dtype=dtype)
    out, lse, w = attention(q, k, v, causal=True, return_lse=True, return_weights=True)
    assert out.dtype == dtype and w.dtype == dtype and lse.dtype == np.float32
    exact = attention(*(x.astype(np.float64) for x in (q, k, v)), causal=True)
    tolerance = 1e-5 if dtype == np.float32 else 2e-3  # float16 output rounding
    assert_close(out, exact, atol=tolerance, rtol=tolerance, name="out")
    up = attention(*(x.astype(np.float32) for x in (q, k, v)), causal=True)
    np.testing.assert_array_equal(out, up.astype(dtype))


def test_nan_stays_in_its_own_row_and_head():
    rng = np.random.default_rng(9)
    q, k, v = qkv(rng, 2, 4, 2, 6, 7, 8)
    clean = attention(q, k, v)
    q[1, 3, 2, 0] = np.nan  # one query row of one head
    k[0, 0, 4, 1] = np.nan  # one key of kv head 0 (query heads 0 and 1), batch 0
    with np.errstate(invalid="ignore"):
        out = attention(q, k, v)
    poisoned = np.zeros(out.shape[:-1], dtype=bool)
    poisoned[1, 3, 2] = True
    poisoned[0, :2] = True
    assert np.isnan(out[poisoned]).all()
    np.testing.assert_array_equal(out[~poisoned], clean[~poisoned])


def test_scale_default_negative_and_zero():
    rng = np.random.default_rng(10)
    q, k, v = qkv(rng, 1, 2, 2, 5, 6, 9)
    np.testing.assert_allclose(attention(q, k, v), attention(q, k, v, scale=1 / 3))
    uniform = attention(q, k, v, scale=0.0)
    np.testing.assert_allclose(uniform, np.broadcast_to(v.mean(-2, keepdims=True), uniform.shape))
    assert_close(attention(q, k, v, scale=-0.5), flex(q, k, v, scale=-0.5)[0], name="out", **F64)


def test_dropout_matches_torch_with_the_same_keep_mask():
    rng = np.random.default_rng(11)
    q, k, v = qkv(rng, 2, 4, 4, 7, 9, 8)
    keep = rng.random((2, 4, 7, 9)) >= 0.25
    out, lse = attention(q, k, v, causal=True, dropout_p=0.25, dropout_keep=keep, return_lse=True)
    tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
    peer, _ = torch.ops.aten._scaled_dot_product_attention_math(
        tq, tk, tv, None, 0.25, True, torch.from_numpy(keep))
    assert_close(out, peer.detach(), name="out", **F64)
    d_out = rng.standard_normal(out.shape)
    grads = attention_backward(q, k, v, out, d_out, lse, causal=True, dropout_p=0.25,
                               dropout_keep=keep)
    peer.backward(torch.from_numpy(d_out))
    for name, g, leaf in zip(("dq", "dk", "dv"), grads, (tq, tk, tv)):
        assert_close(g, leaf.grad, name=name, **F64)


def test_one_visibility_rule_matches_its_definition():
    """reference.visible_range (read by the reference, the Numba planner and the Triton launcher) against
    the contract's words: query i sits at key position i + (Nk - Nq if aligned bottom-right else 0), causal
    keeps keys j <= position, window (left, right) keeps position - left <= j <= position + right."""
    from attnkit.reference.attention import visible_between, visible_range

    rng = np.random.default_rng(11)
    for _ in range(200):
        nq, nk = (int(x) for x in rng.integers(0, 9, 2))
        causal, align = bool(rng.integers(2)), ("top_left", "bottom_right")[rng.integers(2)]
        window = None if rng.integers(3) == 0 else tuple(None if rng.integers(3) == 0 else int(w)
                                                         for w in rng.integers(0, 6, 2))  # fmt: skip
        expected = np.zeros((nq, nk), bool)
        for i in range(nq):
            position = i + (nk - nq if align == "bottom_right" else 0)
            for j in range(nk):
                ok = not causal or j <= position
                if window is not None:
                    ok &= window[0] is None or j >= position - window[0]
                    ok &= window[1] is None or j <= position + window[1]
                expected[i, j] = ok
        lo, hi, _ = visible_range(nq, nk, causal=causal, align=align, window=window)
        assert np.array_equal(visible_between(nq, nk, lo, hi), expected), (nq, nk, causal, align, window)
    lengths_q, lengths_k = np.array([3, 5, 1]), np.array([4, 9, 1])  # per packed sequence, as arrays
    lo, hi, diagonal = visible_range(lengths_q, lengths_k, causal=True, align="bottom_right", window=(2, None))
    for s in range(3):
        assert (lo[s], hi[s], diagonal[s]) == visible_range(int(lengths_q[s]), int(lengths_k[s]), causal=True,
                                                            align="bottom_right", window=(2, None))  # fmt: skip
