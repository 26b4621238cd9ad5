"""Attention dropout in the kernels: the keep mask, its statistics, and results against the reference.

The mask is a pure function of (seed, sequence, head, row, key) (attnkit.reference.dropout). The
kernels never hand it out; a test reads it back from an ordinary call: with scale 0 every visible
weight is 1/Nk, and with v the identity the output row is the kept weights, so out * Nk * (1 - p) is
the kernel's keep mask (1 kept, 0 dropped). Results are compared with the NumPy reference given that
mask, forward and gradients.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnkit
from attnkit.flash_attn import flash_attn_func, flash_attn_varlen_func
from attnkit.reference import attention as reference_attention
from attnkit.reference import attention_backward as reference_backward
from attnkit.reference.dropout import keep_mask, philox4x32
from attnkit.reference.varlen import varlen_attention as reference_varlen
from attnkit.reference.attention import alibi_bias
from attnkit.testing import assert_close, assert_within_rule, torch_attention

pytestmark = pytest.mark.filterwarnings("error::attnkit.AttnkitFallbackWarning")  # dropout runs in the kernels


def test_philox_known_answers():
    # Random123's known-answer vectors for philox4x32-10 (kat_vectors).
    assert [int(w) for w in philox4x32(0, 0, 0, 0, 0, 0)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    ones = 0xFFFFFFFF
    assert [int(w) for w in philox4x32(ones, ones, ones, ones, ones, ones)] == [
        0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]  # fmt: skip
    pi = philox4x32(0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0)
    assert [int(w) for w in pi] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def kernel_keep_mask(seed, p, b, h, nq, nk, backend="numba", **options):
    """The keep mask the kernel drew, (B, H, Nq, Nk) bool, read back from its output (module docstring)."""
    q = torch.zeros(b, h, nq, 8)
    k = torch.zeros(b, h, nk, 8)
    eye = torch.eye(nk).expand(b, h, nk, nk)
    out = attnkit.attention(q, k, eye, scale=0.0, dropout_p=p, dropout_seed=seed, backend=backend, **options)
    scaled = out.double().numpy() * nk * (1 - p)
    assert np.all((np.abs(scaled) < 1e-5) | (np.abs(scaled - 1) < 1e-5)), "a weight that is neither 0 nor 1/Nk"
    return scaled > 0.5


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_the_kernel_draws_the_reference_mask_with_the_right_rate(p):
    seed = 0x1234_5678_9ABC_DEF0
    drawn = kernel_keep_mask(seed, p, 2, 4, 256, 512)  # 1,048,576 weights
    np.testing.assert_array_equal(drawn, keep_mask(seed, p, 2, 4, 256, 512))
    kept, n = drawn.mean(), drawn.size
    sigma = np.sqrt(p * (1 - p) / n)
    assert abs(kept - (1 - p)) <= 4 * sigma, f"kept {kept:.6f}, expected {1 - p} +- {4 * sigma:.6f}"
    other = kernel_keep_mask(seed + 1, p, 2, 4, 256, 512)
    assert (other != drawn).mean() > 0.5 * 2 * p * (1 - p)  # another seed: another mask


def test_keys_rows_heads_and_batch_entries_draw_independently():
    mask = keep_mask(99, 0.5, 3, 3, 40, 64)
    flat = mask.reshape(-1, 64).astype(float)
    # Neighbouring keys share a Philox call but use different words: no correlation between them.
    corr = np.corrcoef(flat[:, :-1].ravel(), flat[:, 1:].ravel())[0, 1]
    assert abs(corr) < 0.02
    assert not np.array_equal(mask[0], mask[1]) and not np.array_equal(mask[:, 0], mask[:, 1])


@pytest.mark.parametrize("rows, cols, i0, j0", [(5, 97, 3, 0), (3, 13, 40, 37), (2, 1, 0, 511), (4, 130, 7, 9)],
                         ids=["short-row", "mid-group-start", "one-key", "long-odd-start"])
def test_a_tiles_keep_factors_are_the_reference_mask_wherever_the_tile_starts(rows, cols, i0, j0):
    """_dropout_factors draws a tile's rows with vectorised Philox calls rounded up to whole vector
    steps, and reads the words back as 16-bit draws: the tile is the reference mask's window, for
    tiles starting inside a group of eight keys and rows shorter than a vector step."""
    from attnkit.kernels.cpu.dropout import _dropout_factors, draw_words, dropout_parameters

    seed, p, h, seg = 0xDEAD_BEEF_0123, 0.3, 2, 1
    factors = np.full((rows, cols), np.nan, np.float32)
    words = np.zeros(draw_words(cols), np.uint32)
    _dropout_factors(factors, words, dropout_parameters(seed, p), np.float32(2.5), np.float32(0), i0, j0, h, seg)
    want = keep_mask(seed, p, seg + 1, h + 1, i0 + rows, j0 + cols)[seg, h, i0:, j0:]
    np.testing.assert_array_equal(factors, np.where(want, np.float32(2.5), np.float32(0)))
    with pytest.raises(ValueError, match="words must hold a row's Philox words"):
        _dropout_factors(factors, words[:4], dropout_parameters(seed, p), np.float32(2.5), np.float32(0), i0, j0, h,
                         seg)  # fmt: skip


def inputs(seed, *, b=2, hq=4, hkv=2, nq=37, nk=45, d=16, dtype=torch.float32, grad=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g, dtype=dtype)
    k, v = (torch.randn(b, hkv, nk, d, generator=g, dtype=dtype) for _ in range(2))
    return [x.requires_grad_(grad) for x in (q, k, v)]


CASES = {
    "full": dict(),
    "causal-gqa": dict(causal=True),
    "bottom_right-window": dict(causal="bottom_right", window=(9, 0)),
    "softcap-alibi": dict(softcap=3.0, alibi=True),
    "bool_mask": dict(mask=True),
}
DTYPES = {"float32": (torch.float32, 2.0, 3.0), "bfloat16": (torch.bfloat16, 2.0, 3.0)}


@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_forward_and_gradients_match_the_reference_with_the_same_mask(case, dtype):
    """Within flash-attn's rule: 2x (out) and 3x (gradients) the error of plain torch ops in the same
    dtype, given the same keep mask; the exact result is the NumPy reference in float64."""
    torch_dtype, out_factor, grad_factor = DTYPES[dtype]
    options = dict(CASES[case])
    q, k, v = inputs(3, dtype=torch.float64, grad=False)
    nq, nk = q.shape[2], k.shape[2]
    additive = None
    if options.pop("alibi", False):
        options["alibi_slopes"] = torch.rand(4, dtype=torch.float64) * 0.3
        additive = torch.from_numpy(alibi_bias(options["alibi_slopes"].numpy(), nq, nk, "top_left", np.float64))
    if options.pop("mask", False):
        options["mask"] = torch.rand(2, 1, nq, nk, generator=torch.Generator().manual_seed(4)) > 0.4
    p, seed = 0.3, 12345
    keep = torch.from_numpy(keep_mask(seed, p, 2, 4, nq, nk))
    d_out = torch.randn(2, 4, nq, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def run(fn, dtype):
        leaves = [x.to(dtype).clone().requires_grad_() for x in (q, k, v)]
        out = fn(*leaves)
        return [x.detach().double().numpy() for x in (out, *torch.autograd.grad(out, leaves, d_out.to(dtype)))]

    def plain(q, k, v):
        mask = options.get("mask") if additive is None else additive.to(q.dtype)
        return torch_attention(q, k, v, mask, scale=0.25, causal=options.get("causal"), window=options.get("window"),
                               softcap=options.get("softcap"), dropout_p=p, dropout_keep=keep)[0]  # fmt: skip

    exact = run(plain, torch.float64)
    same_dtype = run(plain, torch_dtype)
    ours = run(lambda q, k, v: attnkit.attention(q, k, v, scale=0.25, dropout_p=p, dropout_seed=seed, backend="numba",
                                                 **options), torch_dtype)  # fmt: skip
    numpy_options = {n: (x.numpy() if isinstance(x, torch.Tensor) else x) for n, x in options.items()}
    spec = reference_attention(*(x.numpy() for x in (q, k, v)), scale=0.25, dropout_p=p, dropout_keep=keep.numpy(),
                               **numpy_options)  # fmt: skip
    assert_close(exact[0], spec, atol=1e-12, name="torch ops vs the NumPy specification")
    floor = 1e-6 if torch_dtype == torch.float32 else 1e-3
    for name, got, want, base, factor in zip(("out", "dq", "dk", "dv"), ours, exact, same_dtype,
                                             (out_factor,) + (grad_factor,) * 3):  # fmt: skip
        assert_within_rule(name, got, want, base, factor, floor=floor)


def test_float64_gradcheck_with_a_fixed_seed():
    q, k, v = inputs(6, b=1, hq=2, hkv=1, nq=6, nk=7, d=4, dtype=torch.float64)

    def fn(q, k, v):
        return attnkit.attention(q, k, v, causal=True, dropout_p=0.4, dropout_seed=77, backend="numba")

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_packed_sequences_draw_what_the_dense_batch_entries_draw():
    q, k, v = inputs(7, grad=False)
    dense = attnkit.attention(q, k, v, causal="bottom_right", dropout_p=0.25, dropout_seed=5, backend="numba")
    cu_q, cu_k = torch.tensor([0, 37, 74]), torch.tensor([0, 45, 90])
    packed = attnkit.varlen_attention(*(x.transpose(0, 1).reshape(x.shape[1], -1, 16) for x in (q, k, v)),
                                      cu_q, cu_k, causal=True, dropout_p=0.25, dropout_seed=5, backend="numba")
    assert_close(packed.reshape(4, 2, 37, 16).transpose(0, 1), dense, atol=2e-6, name="packed vs dense")


def test_packed_sequences_of_different_lengths_match_the_reference():
    g = torch.Generator().manual_seed(8)
    lengths_q, lengths_k = [5, 0, 33, 17], [9, 4, 33, 40]
    cu_q, cu_k = (torch.tensor(np.concatenate([[0], np.cumsum(n)])) for n in (lengths_q, lengths_k))
    q = torch.randn(4, sum(lengths_q), 16, generator=g, requires_grad=True)
    k, v = (torch.randn(2, sum(lengths_k), 16, generator=g, requires_grad=True) for _ in range(2))
    out = attnkit.varlen_attention(q, k, v, cu_q, cu_k, causal=True, dropout_p=0.2, dropout_seed=31, backend="numba")
    d_out = torch.randn(out.shape, generator=g)
    out.backward(d_out)
    arrays = [x.detach().double().numpy() for x in (q, k, v)]
    want, lse = reference_varlen(*arrays, cu_q.numpy(), cu_k.numpy(), causal=True, dropout_p=0.2, dropout_seed=31,
                                 return_lse=True)  # fmt: skip
    assert_close(out, want, atol=2e-5, name="out")
    from attnkit.reference.varlen import varlen_attention_backward

    grads = varlen_attention_backward(*arrays, want, d_out.double().numpy(), lse, cu_q.numpy(), cu_k.numpy(),
                                      causal=True, dropout_p=0.2, dropout_seed=31)  # fmt: skip
    for name, x, g_want in zip(("dq", "dk", "dv"), (q, k, v), grads):
        assert_close(x.grad, g_want, atol=5e-5, name=name)


def test_the_mean_over_seeds_is_the_output_without_dropout():
    q, k, v = inputs(9, b=1, hq=2, hkv=2, nq=8, nk=12, d=8, dtype=torch.float64, grad=False)
    plain = attnkit.attention(q, k, v, backend="numba")
    n = 2000
    total = sum(attnkit.attention(q, k, v, dropout_p=0.5, dropout_seed=s, backend="numba") for s in range(n))
    # Each output entry is a mean of n draws whose spread is at most max|v| * 2 (weights sum to 1, doubled).
    assert_close(total / n, plain, atol=5 * 2 * v.abs().max().item() / np.sqrt(n), name="mean over seeds")


def test_the_same_seed_repeats_bit_for_bit_and_torch_manual_seed_does_too():
    q, k, v = inputs(10)
    results = []
    for _ in range(2):
        torch.manual_seed(42)
        out = attnkit.scaled_dot_product_attention(q, k, v, dropout_p=0.2, is_causal=True, enable_gqa=True)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        results.append((out,) + grads)
    for a, b in zip(*results):
        assert torch.equal(a, b)
    other = attnkit.scaled_dot_product_attention(q, k, v, dropout_p=0.2, is_causal=True, enable_gqa=True)
    assert not torch.equal(other, results[0][0])


def test_seeds_from_generators_and_numpy():
    q, k, v = (x.detach().numpy() for x in inputs(11, grad=False))
    np.random.seed(3)
    first = attnkit.attention(q, k, v, dropout_p=0.3)
    np.random.seed(3)
    assert np.array_equal(first, attnkit.attention(q, k, v, dropout_p=0.3))
    a = attnkit.attention(q, k, v, dropout_p=0.3, dropout_seed=np.random.default_rng(1))
    assert np.array_equal(a, attnkit.attention(q, k, v, dropout_p=0.3, dropout_seed=np.random.default_rng(1)))
    qt, kt, vt = map(torch.from_numpy, (q, k, v))
    b = attnkit.attention(qt, kt, vt, dropout_p=0.3, dropout_seed=torch.Generator().manual_seed(2))
    assert torch.equal(b, attnkit.attention(qt, kt, vt, dropout_p=0.3, dropout_seed=torch.Generator().manual_seed(2)))
    with pytest.raises(TypeError, match="dropout_seed must be None, an int, a torch.Generator"):
        attnkit.attention(q, k, v, dropout_p=0.3, dropout_seed="7")
    with pytest.raises(ValueError, match=r"dropout_seed must be in \[0, 2\*\*63\); got -1"):
        attnkit.attention(q, k, v, dropout_p=0.3, dropout_seed=-1)


def test_the_reference_backend_draws_the_same_mask():
    q, k, v = inputs(12, grad=False)
    options = dict(causal=True, dropout_p=0.35, dropout_seed=2024)
    fused = attnkit.attention(q, k, v, backend="numba", **options)
    spec = attnkit.attention(q.double(), k.double(), v.double(), backend="reference", **options)
    assert_close(fused, spec, atol=2e-6, name="numba vs reference")


def test_sinks_with_dropout():
    q, k, v = inputs(13)
    sinks = torch.randn(4, generator=torch.Generator().manual_seed(14), requires_grad=True)
    out = attnkit.attention(q, k, v, causal=True, sinks=sinks, dropout_p=0.2, dropout_seed=8, backend="numba")
    d_out = torch.randn_like(out)
    out.backward(d_out)
    keep = keep_mask(8, 0.2, 2, 4, 37, 45)
    arrays = [x.detach().double().numpy() for x in (q, k, v)]
    s = sinks.detach().double().numpy()
    want, lse = reference_attention(*arrays, causal=True, sinks=s, dropout_p=0.2, dropout_keep=keep, return_lse=True)
    assert_close(out, want, atol=2e-6, name="out")
    grads = reference_backward(*arrays, want, d_out.double().numpy(), lse, causal=True, sinks=s, dropout_p=0.2,
                               dropout_keep=keep)  # fmt: skip
    for name, x, g_want in zip(("dq", "dk", "dv", "dsinks"), (q, k, v, sinks), grads):
        assert_close(x.grad, g_want, atol=2e-5, name=name)


def test_flash_attn_s_dmask_is_the_weights_with_dropped_ones_negated():
    q, k, v = (x.detach().transpose(1, 2).contiguous() for x in inputs(15, hkv=4))  # (B, N, H, D)
    torch.manual_seed(0)
    out, lse, s_dmask = flash_attn_func(q, k, v, dropout_p=0.25, causal=True, return_attn_probs=True)
    assert s_dmask.shape == (2, 4, 37, 45)
    kept = s_dmask.clamp(min=0) / 0.75  # dropped entries are negative
    rebuilt = kept @ v.transpose(1, 2)  # (B, H, Nq, D)
    assert_close(out.transpose(1, 2), rebuilt, atol=2e-5, name="out from S_dmask")
    weights = attnkit.attention(*(x.transpose(1, 2) for x in (q, k, v)), causal="bottom_right",
                                return_weights=True, backend="reference")[1]  # fmt: skip
    assert_close(s_dmask.abs(), weights, atol=1e-6, name="|S_dmask|")
    assert flash_attn_func(q, k, v, return_attn_probs=True)[2] is None  # no dropout: None, as flash-attn

    cu_q, cu_k = torch.tensor([0, 37, 74], dtype=torch.int32), torch.tensor([0, 45, 90], dtype=torch.int32)
    torch.manual_seed(0)
    out_p, _, s_p = flash_attn_varlen_func(*(x.reshape(-1, 4, 16) for x in (q, k, v)), cu_q, cu_k, 37, 45,
                                           dropout_p=0.25, causal=True, return_attn_probs=True)  # fmt: skip
    assert torch.equal(s_p, s_dmask)  # the packed call draws what the dense one drew
    assert_close(out_p.reshape(out.shape), out, atol=2e-6, name="packed out")


def test_explain_takes_attentions_dropout_arguments():
    q, k, v = (x.detach() for x in inputs(16, grad=False))
    assert "numba" in attnkit.explain(q, k, v, dropout_p=0.2, dropout_seed=3)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        attnkit.explain(q, k, v, dropout_p=2.0)



@pytest.mark.parametrize("shape", [(2, 3, 37, 100), (1, 2, 5, 0), (3, 1, 1, 1030)], ids=["B2-H3", "no-keys", "decode"])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_the_whole_keep_mask_drawn_by_the_kernels_is_the_references(shape, p):
    """Dropout.keep_drawn_by_kernels (a mask's gradient needs the whole mask): reference.dropout's bits."""
    from attnkit.dropout import Dropout
    from attnkit.validation import validate_attention

    b, h, nq, nk = shape
    q, k = np.zeros((b, h, nq, 8), np.float32), np.zeros((b, h, nk, 8), np.float32)
    spec = validate_attention(q, k, k, causal=False, mask=None, scale=None, window=None, softcap=None)
    seed = 0x0F1E_2D3C_4B5A_6978 + nk
    drawn = Dropout(p, seed).keep_drawn_by_kernels(spec)
    np.testing.assert_array_equal(drawn, keep_mask(seed, p, b, h, nq, nk))
