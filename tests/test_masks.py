"""Masks as data, not work: key ranges and tile summaries (kernels/numba_attention.plan_mask).

Every case runs the kernel forward and backward against the float64 reference
by the 2x / 3x rule of tests/test_numba_kernel.py, on random masks built so
that whole tiles of the kernel's block grid are hidden, visible or mixed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import attnkit
from attnkit.kernels import numba_attention as kernel
from attnkit.kernels.microkernels import BF16_PRODUCTS, bf16_bits, bf16_to_float32
from attnkit.reference import attention, attention_backward

from attnkit.testing import assert_within_rule


def blocky_mask(rng, shape, block_q, block_k, kinds=("hidden", "visible", "mixed")):
    """A boolean mask (B, H, Nq, Nk) whose (block_q x block_k) tiles are each all hidden,
    all visible or random; a few rows end up with no visible key at all."""
    b, h, nq, nk = shape
    mask = np.empty(shape, np.bool_)
    for i0 in range(0, nq, block_q):
        for j0 in range(0, nk, block_k):
            kind = kinds[rng.integers(len(kinds))]
            tile = mask[:, :, i0 : i0 + block_q, j0 : j0 + block_k]
            tile[...] = kind == "visible" if kind != "mixed" else rng.random(tile.shape) < 0.5
    mask[:, :, 3:block_q:7, :] = False  # fully masked rows, all in the first row of tiles
    return mask


def run_and_check(q, k, v, d_out, mask, causal=None, window=None, dtype=np.float32):
    scale = 1.0 / math.sqrt(q.shape[-1])
    kw = dict(scale=scale, causal=causal, window=window, softcap=None)
    cast = (lambda x: x.astype(dtype)) if dtype != "bf16" else bf16_bits
    qk = [cast(x) for x in (q, k, v, d_out)]
    kernel_mask = mask if mask is None or mask.dtype == np.bool_ else mask.astype(np.float32)
    out, lse = kernel.flash_forward(*qk[:3], kernel_mask, **kw)
    grads = kernel.flash_backward(*qk[:3], kernel_mask, out, qk[3], lse, **kw)
    as_float = bf16_to_float32 if dtype == "bf16" else (lambda x: x)
    inputs = [as_float(x).astype(np.float64) for x in qk]

    def reference(precision):
        m = mask if mask is None or mask.dtype == np.bool_ else mask.astype(precision)
        rkw = dict(scale=scale, causal=causal or False, window=window, mask=m)
        x = [a.astype(precision) for a in inputs]
        o, l = attention(*x[:3], return_lse=True, **rkw)
        return o, l, attention_backward(*x[:3], o, x[3], l, **rkw)

    out64, lse64, grads64 = reference(np.float64)
    out32, lse32, grads32 = reference(np.float32)
    if dtype == "bf16":  # the low-precision baseline stores its results in bf16, as the kernel does
        out32 = bf16_to_float32(bf16_bits(out32))
        grads32 = [bf16_to_float32(bf16_bits(g)) for g in grads32]
    empty = lse64 == -np.inf
    assert np.array_equal(empty, lse == -np.inf), "rows with no visible key differ from the reference"
    assert np.all(as_float(out)[empty] == 0)
    assert_within_rule("out", as_float(out), out64, out32, 2)
    for name, got, want64, want32 in zip(("dq", "dk", "dv"), grads, grads64, grads32):
        assert_within_rule(name, as_float(got), want64, want32, 3)


def inputs(rng, b, h, nq, nk, d):
    return [rng.standard_normal(shape) for shape in ((b, h, nq, d), (b, h, nk, d), (b, h, nk, d), (b, h, nq, d))]


DTYPES = [np.float32] + (["bf16"] if BF16_PRODUCTS != "fp32" else [])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: "bf16" if d == "bf16" else np.dtype(d).name)
@pytest.mark.parametrize("nq, nk", [(300, 1100), (257, 513)], ids=lambda n: str(n))
def test_tile_summary_of_a_blocky_mask(dtype, nq, nk):
    rng = np.random.default_rng(nq + nk)
    q, k, v, d_out = inputs(rng, 2, 2, nq, nk, 64)
    # the forward's tiles (128 x 512) are whole tiles of the backward's grid (128 x 256) too
    mask = blocky_mask(rng, (2, 2, nq, nk), 128, 512)
    states = kernel.plan_mask(mask, nq, nk).tiles
    assert {kernel.TILE_HIDDEN, kernel.TILE_VISIBLE, kernel.TILE_MIXED} <= set(np.unique(states).tolist())
    run_and_check(q, k, v, d_out, mask, dtype=dtype)
    run_and_check(q, k, v, d_out, mask, causal="bottom_right", window=(300, None), dtype=dtype)


def test_additive_mask_summary():
    rng = np.random.default_rng(3)
    nq, nk = 260, 600
    q, k, v, d_out = inputs(rng, 1, 2, nq, nk, 32)
    hidden = ~blocky_mask(rng, (1, 2, nq, nk), 128, 512)
    additive = np.where(hidden, -np.inf, 0.0)
    additive[..., 300:, :] += rng.standard_normal((1, 2, 1, nk))  # some tiles carry real values
    additive[..., 300:, :][hidden[..., 300:, :]] = -np.inf
    plan = kernel.plan_mask(additive, nq, nk)
    assert plan.kind == "additive"
    assert {kernel.TILE_HIDDEN, kernel.TILE_VISIBLE, kernel.TILE_MIXED} <= set(np.unique(plan.tiles).tolist())
    run_and_check(q, k, v, d_out, additive)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: "bf16" if d == "bf16" else np.dtype(d).name)
def test_key_padding_becomes_key_ranges(dtype):
    rng = np.random.default_rng(4)
    b, nq, nk = 4, 200, 700
    q, k, v, d_out = inputs(rng, b, 2, nq, nk, 64)
    lengths = np.array([0, 1, 333, 700])  # a fully padded sequence, one key, odd, none padded
    padding = np.arange(nk)[None, None, None, :] < lengths[:, None, None, None]  # (B, 1, 1, Nk)
    left_padding = padding[..., ::-1].copy()  # padding on the left, as generate() uses
    for mask in (padding, left_padding, np.broadcast_to(padding, (b, 1, nq, nk)).copy()):
        plan = kernel.plan_mask(mask, nq, nk)
        assert plan.kind == "key_ranges", "key padding must not be read score by score"
        starts, stops = plan.key_ranges[:, 0, 0], plan.key_ranges[:, 0, 1]
        assert np.array_equal(stops - starts, lengths)
        run_and_check(q, k, v, d_out, mask, dtype=dtype)
    run_and_check(q, k, v, d_out, padding, causal="bottom_right", dtype=dtype)


def test_key_bitmap_with_holes_uses_the_summary():
    rng = np.random.default_rng(5)
    nq, nk = 130, 1030
    q, k, v, d_out = inputs(rng, 2, 2, nq, nk, 32)
    keys = rng.random((2, 1, 1, nk)) < 0.8
    keys[0, ..., 512:] = False  # a whole hidden key block in batch 0
    plan = kernel.plan_mask(keys, nq, nk)
    assert plan.kind == "bool" and plan.tiles.shape[:2] == (2, 1)
    assert plan.tiles[0, 0, 0, 1] == kernel.TILE_HIDDEN  # keys 512..1023 of batch 0, a whole block
    run_and_check(q, k, v, d_out, keys, causal="top_left")


def test_expanded_torch_padding_mask_is_seen_as_key_padding():
    """transformers' (B, 1, Nq, Nk) padding mask, expanded with stride 0: no copy, no per-score reads."""
    lengths = torch.tensor([5, 40, 17])
    keys = torch.arange(40)[None, :] < lengths[:, None]  # (B, Nk)
    mask = keys[:, None, None, :].expand(3, 1, 30, 40)
    q = torch.randn(3, 4, 30, 16)
    k, v = torch.randn(3, 4, 40, 16), torch.randn(3, 4, 40, 16)
    with kernel.recording() as launches:
        out = attnkit.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert launches[0].mask.shape == (3, 1, 1, 40)
    assert kernel.plan_mask(launches[0].mask, 30, 40).kind == "key_ranges"
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def _additive_padding(lengths, nq, nk, dtype=np.float32, hidden=None):
    """transformers' additive padding mask (B, 1, Nq, Nk): 0 where a key is real, finfo(dtype).min
    (or `hidden`) past each sequence's length."""
    keys = np.arange(nk)[None, :] < np.asarray(lengths)[:, None]  # (B, Nk)
    fill = np.finfo(dtype).min if hidden is None else hidden
    return np.broadcast_to(np.where(keys, 0.0, fill)[:, None, None, :], (len(lengths), 1, nq, nk)).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: "bf16" if d == "bf16" else np.dtype(d).name)
def test_an_additive_padding_mask_runs_as_key_ranges(dtype):
    """0 / finfo.min (or -inf) padding, as transformers builds it: every row sees a key, so it is the
    boolean mask, and the kernel skips the padding instead of adding finfo.min to every score."""
    rng = np.random.default_rng(6)
    b, nq, nk = 3, 130, 300
    q, k, v, d_out = inputs(rng, b, 2, nq, nk, 32)
    for hidden in (None, -np.inf):
        mask = _additive_padding([300, 1, 177], nq, nk, hidden=hidden)
        assert kernel.plan_mask(mask, nq, nk).kind == "key_ranges"
        assert kernel.plan_mask(mask, nq, nk, backward=True).kind == "key_ranges"
        run_and_check(q, k, v, d_out, mask, dtype=dtype)


def test_masks_whose_first_rows_look_like_padding_but_later_ones_differ():
    """The mask plan looks at the first rows before a pass over the whole (a learned bias costs no
    padding check): rows that agree there and differ later are still not key padding."""
    rng = np.random.default_rng(8)
    nq, nk = 40, 70
    q, k, v, d_out = inputs(rng, 2, 2, nq, nk, 16)
    padding = _additive_padding([70, 33], nq, nk).copy()
    padding[1, 0, nq - 1, 5] = 0.75  # the last query of the second sequence: one key biased
    assert kernel.plan_mask(padding, nq, nk).kind == "additive"
    run_and_check(q, k, v, d_out, padding)
    visible = np.broadcast_to(rng.random((2, 1, 1, nk)) < 0.7, (2, 1, nq, nk)).copy()
    visible[0, 0, 30, :3] = ~visible[0, 0, 30, :3]  # rows 0 and 1 equal, row 30 not
    assert kernel.plan_mask(visible, nq, nk).kind == "bool"
    run_and_check(q, k, v, d_out, visible)


def test_an_additive_mask_hiding_a_row_whole_stays_additive():
    """A row whose every entry is finfo.min averages its keys (the additive arithmetic, torch's
    too), where the boolean mask would give zeros: such a mask is not converted; nor is one of
    other values, nor one beside causal alignment or a window (which could hide a row's visible keys)."""
    rng = np.random.default_rng(7)
    nq, nk = 70, 90
    q, k, v, d_out = inputs(rng, 2, 2, nq, nk, 16)
    mask = _additive_padding([90, 0], nq, nk)  # the second sequence has no real key
    assert kernel.plan_mask(mask, nq, nk).kind == "additive"
    run_and_check(q, k, v, d_out, mask)
    out = kernel.flash_forward(*(x.astype(np.float32) for x in (q, k, v)), mask, scale=0.25, causal=None,
                               window=None, softcap=None)[0]  # fmt: skip
    np.testing.assert_allclose(out[1], np.broadcast_to(v[1].mean(axis=1, keepdims=True), out[1].shape), atol=1e-5)
    tensors = [torch.from_numpy(x.astype(np.float32)) for x in (q, k, v)]  # and so does torch's SDPA
    torch.testing.assert_close(attnkit.scaled_dot_product_attention(*tensors, attn_mask=torch.from_numpy(mask)),
                               torch.nn.functional.scaled_dot_product_attention(*tensors, attn_mask=torch.from_numpy(mask)),
                               atol=2e-5, rtol=2e-5)  # fmt: skip
    biased = _additive_padding([90, 40], nq, nk) + np.where(rng.random((1, 1, 1, nk)) < 0.5, 0.0, -1e4)
    assert kernel.plan_mask(biased.astype(np.float32), nq, nk).kind == "additive"  # -1e4 is not a hiding entry
    left = _additive_padding([90, 45], nq, nk)[..., ::-1].copy()  # left padding, keys 45.. real
    assert kernel.plan_mask(left, nq, nk, rows_unrestricted=False).kind == "additive"
    run_and_check(q, k, v, d_out, left, causal="top_left")  # rows 0..44 of batch 1: every visible key hidden
