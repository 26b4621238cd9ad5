"""One operation: a dense call is the packed call with one sequence per batch entry, every option
means the same through every entry point, and ALiBi / align (once packed-only) hold on dense calls.

ALiBi is checked against an additive mask the test builds itself (-slope * |i + offset - j|),
not against attnkit's own bias code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnkit
from attnkit.reference import attention as reference_attention
from attnkit.testing import assert_within_rule

B, HQ, HKV, NQ, NK, D = 2, 4, 2, 19, 33, 16

OPTIONS = {
    "plain": dict(),
    "causal": dict(causal=True),
    "window_softcap": dict(causal=True, window=(7, None), softcap=3.0),
    "alibi": dict(alibi=True),
    "alibi_causal_window": dict(causal=True, alibi=True, window=(9, 2)),
}


def alibi_mask(slopes, nq, nk, align):
    """(B, Hq, Nq, Nk) additive ALiBi bias, written out here: -slope * |i + offset - j|."""
    offset = nk - nq if align == "bottom_right" else 0
    distance = np.abs(np.arange(nq)[:, None] + offset - np.arange(nk)[None, :])
    return -slopes[:, :, None, None] * distance


def inputs(seed, dtype=torch.float32):
    rng = np.random.default_rng(seed)
    q, k, v, d_out = (rng.standard_normal(s) for s in ((B, HQ, NQ, D), (B, HKV, NK, D), (B, HKV, NK, D), (B, HQ, NQ, D)))
    slopes = rng.uniform(0.05, 0.5, (B, HQ))
    return [torch.tensor(x, dtype=dtype) for x in (q, k, v, d_out)], slopes


def expected(q, k, v, slopes, options, align):
    """float64 reference with ALiBi as an explicit additive mask, and the plain float32 one."""
    causal = align if options.get("causal") else None
    mask = alibi_mask(slopes, NQ, NK, align) if options.get("alibi") else None
    kw = dict(causal=causal, window=options.get("window"), softcap=options.get("softcap"), mask=mask)
    if causal is None and options.get("window"):
        pytest.skip("a window without causal aligns by `align`: covered by the alibi cases")
    out64 = reference_attention(*(x.double().numpy() for x in (q, k, v)), **kw)
    mask32 = None if mask is None else mask.astype(np.float32)
    out32 = reference_attention(*(x.numpy() for x in (q, k, v)), **dict(kw, mask=mask32))
    return out64, out32


def packed(x):
    """(B, H, N, D) -> (H, B * N, D): the batch entries one after another."""
    return x.transpose(0, 1).reshape(x.shape[1], -1, x.shape[-1])


@pytest.mark.parametrize("backend", ["numba", "reference"])
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_dense_and_packed_calls_agree_with_the_reference(name, align, backend):
    options = OPTIONS[name]
    (q, k, v, d_out), slopes = inputs(len(name) + len(align))
    out64, out32 = expected(q, k, v, slopes, options, align)
    causal = align if options.get("causal") else False
    alibi = torch.tensor(slopes, dtype=torch.float32) if options.get("alibi") else None
    common = dict(window=options.get("window"), softcap=options.get("softcap"), alibi_slopes=alibi, backend=backend)

    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    dense = attnkit.attention(qg, kg, vg, causal=causal, align=align, **common)
    assert_within_rule("dense out", dense.detach().numpy(), out64, out32, 2)
    dense_grads = torch.autograd.grad(dense, (qg, kg, vg), d_out)

    qp, kp, vp = (packed(x).clone().requires_grad_() for x in (q, k, v))
    cu_q, cu_k = (torch.arange(0, (B + 1) * n, n, dtype=torch.int32) for n in (NQ, NK))
    out = attnkit.varlen_attention(qp, kp, vp, cu_q, cu_k, causal=bool(causal), align=align, **common)
    assert_within_rule("packed out", out.detach().numpy(), packed(torch.from_numpy(out64)).numpy(),
                       packed(torch.from_numpy(out32)).numpy(), 2)
    packed_grads = torch.autograd.grad(out, (qp, kp, vp), packed(d_out))
    for name_, a, b in zip("qkv", dense_grads, packed_grads):
        np.testing.assert_allclose(packed(a).numpy(), b.numpy(), atol=2e-5, rtol=1e-4, err_msg=f"d{name_}")


def test_dense_alibi_gradients_match_an_explicit_mask():
    (q, k, v, d_out), slopes = inputs(7, torch.float64)
    mask = torch.from_numpy(alibi_mask(slopes, NQ, NK, "bottom_right"))
    got = [x.clone().requires_grad_() for x in (q, k, v)]
    want = [x.clone().requires_grad_() for x in (q, k, v)]
    out = attnkit.attention(*got, causal="bottom_right", alibi_slopes=torch.from_numpy(slopes))
    ref = attnkit.attention(*want, causal="bottom_right", mask=mask, backend="reference")
    for a, b in zip(torch.autograd.grad(out, got, d_out), torch.autograd.grad(ref, want, d_out)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_long_range_alibi_flushes_negligible_weights_within_the_rule():
    """ALiBi with steep slopes over 700 keys: most of a row's weights are below 2^-64 of its largest
    (exp2 gives them 0, simd.FLUSH_BELOW, so no product goes subnormal). Forward and gradients stay
    within flash-attn's rule against the float64 reference with the bias written out as a mask."""
    from attnkit.reference import attention_backward as reference_backward

    rng = np.random.default_rng(11)
    b, h, n, d = 1, 4, 700, 32
    q, k, v, d_out = (rng.standard_normal((b, h, n, d)) for _ in range(4))
    slopes = np.array([[0.1, 0.3, 0.6, 1.0]])
    bias = alibi_mask(slopes, n, n, "top_left")
    tensors = [torch.tensor(x, dtype=torch.float32, requires_grad=True) for x in (q, k, v)]
    out = attnkit.attention(*tensors, alibi_slopes=torch.tensor(slopes, dtype=torch.float32), backend="numba")
    grads = torch.autograd.grad(out, tensors, torch.tensor(d_out, dtype=torch.float32))
    results = {}
    for dtype in (np.float64, np.float32):
        xs = [x.astype(dtype) for x in (q, k, v, d_out)]
        o, lse = reference_attention(*xs[:3], mask=bias.astype(dtype), return_lse=True)
        results[dtype] = (o, reference_backward(*xs[:3], o, xs[3], lse, mask=bias.astype(dtype)))
    assert_within_rule("out", out.detach().numpy(), results[np.float64][0], results[np.float32][0], 2)
    for name, got, want, plain in zip("qkv", grads, results[np.float64][1], results[np.float32][1]):
        assert_within_rule(f"d{name}", got.numpy(), want, plain, 3)


def test_flash_attn_func_runs_the_dense_path():
    from attnkit.flash_attn import flash_attn_func
    from attnkit.kernels import numba_attention

    k = torch.randn(2, 64, 2, 32)  # (B, Nk, Hkv, D), contiguous: (B, H, N, D) views need a copy
    q, v = torch.randn(2, 16, 4, 32), torch.randn(2, 64, 2, 32)
    with numba_attention.recording() as launches:
        out = flash_attn_func(q, k, v, causal=True)
    # 16 queries against 64 keys take the dense decode kernel (a packed call would lay the keys out per sequence)
    assert [launch.worker.removesuffix("_serial") for launch in launches] == ["decode"]
    assert launches[0].k.shape == (2, 2, 64, 32), "keys laid out as the dense path lays them out, not packed"
    want = attnkit.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal="bottom_right")
    torch.testing.assert_close(out, want.transpose(1, 2))


def test_options_are_refused_alike_everywhere():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="align='bottom_right' contradicts causal='top_left'"):
        attnkit.attention(q, q, q, causal=True, align="bottom_right")
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape \(1, 2\) or \(2,\); got \(3,\)"):
        attnkit.attention(q, q, q, alibi_slopes=torch.ones(3))
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape \(1, 2\) or \(2,\); got \(3,\)"):
        attnkit.varlen_attention(q[0], q[0], q[0], cu, cu, alibi_slopes=torch.ones(3))
    with pytest.raises(ValueError, match="alibi_slopes requires grad"):
        attnkit.attention(q, q, q, alibi_slopes=torch.ones(2, requires_grad=True))


def test_explain_speaks_for_dense_and_packed_calls():
    q = torch.randn(2, 8, 16)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    text = attnkit.explain(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True, alibi_slopes=torch.ones(2))
    assert "backend 'numba'" in text and "2 packed sequences" in text
    text = attnkit.explain(q[None], q[None], q[None], alibi_slopes=torch.ones(2), align="bottom_right")
    assert "backend 'numba'" in text and "batch 1" in text


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_a_packed_call_with_no_sequence_gives_empty_results(backend):
    """cu_seqlens = [0]: no sequence (validation allows it); empty out and lse, empty gradients."""
    q = torch.randn(3, 0, 8, requires_grad=True)
    kv = torch.randn(3, 0, 8, requires_grad=True)
    cu = torch.tensor([0], dtype=torch.int32)
    out, lse = attnkit.varlen_attention(q, kv, kv, cu, cu, causal=True, return_lse=True, backend=backend)
    assert out.shape == (3, 0, 8) and lse.shape == (3, 0)
    out.sum().backward()
    assert q.grad.shape == q.shape and kv.grad.shape == kv.shape


@pytest.mark.parametrize("backend", ["numba", "auto", "reference"])
@pytest.mark.parametrize("empty", ["no_queries", "no_keys"])
@pytest.mark.parametrize("mask", [None, "bool", "additive"])
def test_dense_calls_without_queries_or_keys_give_empty_or_zero_results(mask, empty, backend):
    """Nq = 0 or Nk = 0 on a dense call with two batch axes, a mask and sinks: out 0 and lse the
    sink (a row with no key puts all its weight on it), gradients 0 of the inputs' shapes. Both
    once raised in the Numba path (a reshape inferring a size from no rows; a mask summary's argmax
    over no keys)."""
    nq, nk = (0, 5) if empty == "no_queries" else (3, 0)
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 3, 4, nq, 8, generator=gen, requires_grad=True)  # (B1, B2, Hq, Nq, D)
    k, v = (torch.randn(2, 3, 2, nk, 8, generator=gen, requires_grad=True) for _ in range(2))
    sinks = torch.randn(4, generator=gen, requires_grad=True)
    if mask == "bool":
        m = torch.rand(4, nq, nk, generator=gen) < 0.5
    else:
        m = None if mask is None else torch.randn(4, nq, nk, generator=gen)
    out, lse = attnkit.attention(q, k, v, mask=m, sinks=sinks, causal=True, return_lse=True, backend=backend)
    assert out.shape == (2, 3, 4, nq, 8) and lse.shape == (2, 3, 4, nq)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(lse, sinks.detach()[:, None].expand(lse.shape))
    (out * torch.randn(out.shape, generator=gen)).sum().backward()
    for x in (q, k, v, sinks):
        assert x.grad.shape == x.shape and torch.equal(x.grad, torch.zeros_like(x))
    # and without sinks: lse -inf for the rows there are
    _, lse = attnkit.attention(q, k, v, mask=m, return_lse=True, backend=backend)
    assert torch.equal(lse, torch.full_like(lse, -torch.inf))
