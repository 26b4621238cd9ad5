"""The gradient of an additive mask that requires grad (T5's learned position bias, passed to SDPA
as attn_mask): against torch autograd through an explicit float64 computation written here
(scores, softcap, ALiBi, the mask, visibility, a sink column, softmax, dropout's keep mask), for
every backend, broadcast mask shapes, and the refusals where it cannot come."""

from __future__ import annotations

import math

import pytest
import torch

import attnkit
from attnkit.reference.dropout import keep_mask
from attnkit.testing import assert_close

B, HQ, HKV, NQ, NK, D, DV = 2, 4, 2, 21, 37, 16, 8

OPTIONS = {
    "plain": dict(),
    "causal_window_softcap": dict(causal="bottom_right", window=(9, 2), softcap=4.0),
    "alibi_sinks": dict(alibi=True, sinks=True),
    "dropout": dict(dropout_p=0.3),
}
MASK_SHAPES = {"keys_x_queries": (NQ, NK), "per_head": (HQ, 1, NK), "full": (B, HQ, NQ, NK)}
DTYPES = {"fp32": (torch.float32, 2e-5), "bf16": (torch.bfloat16, 4e-2)}


def explicit(q, k, v, mask, scale, causal=None, window=None, softcap=None, alibi=None, sinks=None, keep=None, p=0.0):
    """The forward written out in float64 torch operations, for autograd to differentiate."""
    group = HQ // HKV
    k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    s = q @ k.transpose(-1, -2) * scale  # (B, Hq, Nq, Nk)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    position = torch.arange(NQ)[:, None] + (NK - NQ if causal == "bottom_right" else 0)
    key = torch.arange(NK)[None, :]
    if alibi is not None:
        s = s - alibi[:, None, None] * (position - key).abs()
    s = s + mask
    visible = torch.ones(NQ, NK, dtype=torch.bool)
    if causal:
        visible &= key <= position
    if window is not None:
        visible &= (position - key <= window[0]) & (key - position <= window[1])
    s = s.masked_fill(~visible, -math.inf)
    if sinks is not None:
        s = torch.cat([s, sinks[:, None, None].expand(B, HQ, NQ, 1)], dim=-1)
    weights = torch.softmax(s, dim=-1)[..., :NK]
    if keep is not None:
        weights = weights * keep / (1 - p)
    return weights @ v


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mask_shape", list(MASK_SHAPES))
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_mask_gradient_matches_autograd_of_the_explicit_computation(backend, option, mask_shape, dtype):
    torch_dtype, tolerance = DTYPES[dtype]
    features = OPTIONS[option]
    g = torch.Generator().manual_seed(len(option) * 7 + len(mask_shape))
    q = torch.randn(B, HQ, NQ, D, generator=g).to(torch_dtype)
    k = torch.randn(B, HKV, NK, D, generator=g).to(torch_dtype)
    v = torch.randn(B, HKV, NK, DV, generator=g).to(torch_dtype)
    mask = torch.randn(MASK_SHAPES[mask_shape], generator=g).to(torch_dtype)
    d_out = torch.randn(B, HQ, NQ, DV, generator=g).to(torch_dtype)
    alibi = torch.rand(HQ, generator=g) * 0.3 if features.get("alibi") else None
    sinks = torch.randn(HQ, generator=g) if features.get("sinks") else None
    p, seed = features.get("dropout_p", 0.0), 1234
    options = {name: features[name] for name in ("causal", "window", "softcap") if name in features}

    leaves = [x.clone().requires_grad_() for x in (q, k, v, mask)]
    out = attnkit.attention(*leaves[:3], mask=leaves[3], alibi_slopes=alibi, sinks=sinks, dropout_p=p,
                            dropout_seed=seed if p else None, backend=backend, **options)  # fmt: skip
    grads = torch.autograd.grad(out, leaves, d_out)

    exact = [x.double().requires_grad_() for x in (q, k, v, mask)]
    keep = torch.from_numpy(keep_mask(seed, p, B, HQ, NQ, NK)) if p else None
    expected = explicit(*exact, D ** -0.5, alibi=None if alibi is None else alibi.double(),
                        sinks=None if sinks is None else sinks.double(), keep=keep, p=p, **options)  # fmt: skip
    expected_grads = torch.autograd.grad(expected, exact, d_out.double())
    assert grads[3].shape == mask.shape and grads[3].dtype == mask.dtype
    for name, got, want in zip(("out", "dq", "dk", "dv", "dmask"), (out,) + grads, (expected,) + expected_grads):
        scale = max(1.0, want.abs().max().item())
        assert_close(got.detach().double(), want.detach(), atol=tolerance * scale, rtol=tolerance, name=name)


STEP_BYTES = {"one_head": 1, "two_heads": 2 * NQ * NK * 4, "three_heads": 3 * NQ * NK * 4}


@pytest.mark.parametrize("step_bytes", list(STEP_BYTES))
@pytest.mark.parametrize("mask_shape", list(MASK_SHAPES) + ["batch_and_head_broadcast"])
@pytest.mark.parametrize("option", ["plain", "dropout", "alibi_sinks"])
def test_mask_gradient_a_few_heads_at_a_time_is_the_whole_one(monkeypatch, option, mask_shape, step_bytes):
    """The reference backend computes a mask's gradient a few query heads a step (one head, a divisor
    of the GQA group, or whole groups: three heads' bytes give one group of two): concatenated along a
    mask's head axis or summed where the mask's heads broadcast, the same as one step over all heads."""
    from attnkit.backends import reference as reference_backend

    features = OPTIONS[option]
    g = torch.Generator().manual_seed(11)
    q = torch.randn(B, HQ, NQ, D, generator=g)
    k, v = torch.randn(B, HKV, NK, D, generator=g), torch.randn(B, HKV, NK, DV, generator=g)
    shape = MASK_SHAPES.get(mask_shape, (1, 1, NQ, NK))
    mask = torch.randn(shape, generator=g)
    alibi = torch.rand(HQ, generator=g) * 0.3 if features.get("alibi") else None
    sinks = torch.randn(HQ, generator=g) if features.get("sinks") else None

    def mask_grad(step_bytes):
        monkeypatch.setattr(reference_backend, "_MASK_GRADIENT_STEP_BYTES", step_bytes)
        leaf = mask.clone().requires_grad_()
        out = attnkit.attention(q, k, v, mask=leaf, alibi_slopes=alibi, sinks=sinks,
                                dropout_p=features.get("dropout_p", 0.0), dropout_seed=5)  # fmt: skip
        out.backward(torch.ones_like(out))
        return leaf.grad

    whole = mask_grad(1 << 40)
    assert_close(mask_grad(STEP_BYTES[step_bytes]), whole, atol=1e-6, rtol=1e-6, name="dmask")


@pytest.mark.parametrize("mask_shape", [(NQ, NK), (1, 1, NQ, NK), (B, 0, NQ, NK)], ids=["2d", "broadcast", "per_head"])
def test_mask_gradient_of_a_call_with_no_query_heads_is_zero(mask_shape):
    """q with no heads: no score reaches the mask, so its gradient is zeros of its shape (planning
    the steps of a few heads divided by a group size of 0 before: ZeroDivisionError)."""
    q = torch.randn(B, 0, NQ, D, requires_grad=True)
    k, v = torch.randn(B, 1, NK, D), torch.randn(B, 1, NK, DV)
    mask = torch.randn(mask_shape, requires_grad=True)
    out = attnkit.attention(q, k, v, mask=mask)
    out.sum().backward()
    assert out.shape == (B, 0, NQ, DV)
    assert mask.grad.shape == mask.shape and not mask.grad.any()


def test_mask_gradient_through_sdpa_alone():
    """Only the mask requires grad (a frozen model's learned bias): the call still differentiates."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 9, 8, generator=g) for _ in range(3))
    mask = torch.randn(2, 9, 9, generator=g, requires_grad=True)
    attnkit.scaled_dot_product_attention(q, k, v, attn_mask=mask).square().sum().backward()
    exact = mask.detach().double().requires_grad_()
    torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=exact) \
        .square().sum().backward()  # fmt: skip
    assert_close(mask.grad.double(), exact.grad, atol=1e-5, rtol=1e-5, name="dmask")


def test_mask_gradient_is_refused_where_it_cannot_come():
    q = torch.randn(1, 2, 8, 16)
    mask = torch.randn(8, 8, requires_grad=True)
    compiled = torch.compile(lambda q, m: attnkit.attention(q, q, q, mask=m), fullgraph=True)
    with pytest.raises(Exception, match="the mask requires grad: its gradient is not available under torch.compile"):
        compiled(q, mask)
    meta = torch.empty(1, 2, 8, 16, device="meta")
    with pytest.raises(ValueError, match=r"the mask requires grad: its gradient is not available on tensors without"):
        attnkit.attention(meta, meta, meta, mask=torch.empty(8, 8, device="meta", requires_grad=True))
    with torch.no_grad():  # no gradient wanted: no refusal
        attnkit.attention(meta, meta, meta, mask=torch.empty(8, 8, device="meta", requires_grad=True))


def test_the_benchmark_runs(capsys):
    from attnkit.bench import mask_gradient

    mask_gradient.main(["--shape", "1,2,16,8", "--rounds", "1"])
    table = capsys.readouterr().out
    assert "| attnkit |" in table and "| torch |" in table
