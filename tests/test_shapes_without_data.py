"""Tensors without data: meta tensors and FakeTensorMode's fake ones (shape propagation, FLOP and
memory estimates). Each entry point answers with results, and gradients, of the shapes, dtypes and
devices that the same call on real tensors returns; nothing reads data that is not there."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

import attnkit
from attnkit.flash_attn import flash_attn_func, flash_attn_varlen_func

CU = [0, 5, 5, 17]  # three sequences, one empty


def _dense(make, dtype):
    q = make((2, 3, 4, 9, 16), dtype)  # (B1, B2, Hq, Nq, D)
    k = make((1, 3, 2, 12, 16), dtype)  # broadcast B1, two kv heads
    v = make((1, 3, 2, 12, 8), dtype)  # Dv = 8
    return q, k, v


def _packed(make, dtype):
    cu = torch.tensor(CU, dtype=torch.int32, device=make.device)
    return make((4, 17, 16), dtype), make((2, 17, 16), dtype), make((2, 17, 8), dtype), cu


CALLS = {
    "attention_causal_lse": lambda m, dt: attnkit.attention(*_dense(m, dt), causal=True, return_lse=True),
    "attention_mask_sinks_dropout": lambda m, dt: attnkit.attention(
        *_dense(m, dt), mask=m((9, 12), torch.bool), sinks=m((4,), torch.float32), dropout_p=0.1, return_lse=True),
    "attention_window_softcap_alibi": lambda m, dt: attnkit.attention(
        *_dense(m, dt), window=(3, 1), softcap=5.0, alibi_slopes=m((4,), torch.float32, grad=False)),
    "sdpa_gqa_mask": lambda m, dt: attnkit.scaled_dot_product_attention(
        *_dense(m, dt), attn_mask=m((4, 9, 12), dt, grad=False), enable_gqa=True),
    "varlen_causal_lse": lambda m, dt: attnkit.varlen_attention(*(lambda q, k, v, cu: (q, k, v, cu, cu))(
        *_packed(m, dt)), causal=True, return_lse=True),
    "flash_attn_func": lambda m, dt: flash_attn_func(m((2, 9, 4, 16), dt), m((2, 12, 2, 16), dt),
                                                     m((2, 12, 2, 8), dt), causal=True),
    "flash_attn_varlen_func": lambda m, dt: flash_attn_varlen_func(
        m((17, 4, 16), dt), m((17, 2, 16), dt), m((17, 2, 8), dt),
        *(torch.tensor(CU, dtype=torch.int32, device=m.device),) * 2, 12, 12, causal=True, return_attn_probs=True)[:2],
}  # fmt: skip


class _Maker:
    """Makes inputs on a device, float ones requiring grad; records them for the gradients."""

    def __init__(self, device, generator=None):
        self.device, self.generator, self.made = device, generator, []

    def __call__(self, shape, dtype, grad=True):
        if dtype == torch.bool:
            return torch.rand(shape, generator=self.generator, device=self.device) < 0.7
        x = torch.randn(shape, generator=self.generator, device=self.device).to(dtype)
        if grad:
            self.made.append(x.requires_grad_())
        return x


def _results(call, make, dtype):
    results = call(make, dtype)
    results = results if isinstance(results, tuple) else (results,)
    results[0].float().sum().backward()
    return results, [x.grad for x in make.made]


def _described(tensors):
    return [(tuple(x.shape), x.dtype) for x in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CALLS))
def test_meta_and_fake_tensors_give_the_real_calls_shapes(name, dtype):
    call = CALLS[name]
    real, real_grads = _results(call, _Maker("cpu", torch.Generator().manual_seed(0)), dtype)

    meta, meta_grads = _results(call, _Maker("meta"), dtype)
    assert _described(meta) == _described(real) and _described(meta_grads) == _described(real_grads)
    assert all(x.is_meta for x in list(meta) + meta_grads)

    with FakeTensorMode():
        fake, fake_grads = _results(call, _Maker("cpu"), dtype)
        assert _described(fake) == _described(real) and _described(fake_grads) == _described(real_grads)
        assert all(is_fake(x) and x.device.type == "cpu" for x in list(fake) + fake_grads)


def test_what_needs_data_is_refused_without_it():
    q = torch.empty(1, 2, 8, 16, device="meta")
    with pytest.raises(ValueError, match=r"return_weights needs the NumPy reference, which cannot run on tensors "
                                         r"without data \(meta or fake\); call attnkit on tensors that hold data"):
        attnkit.attention(q, q, q, return_weights=True)
    with pytest.raises(ValueError, match="backend must be one of"):
        attnkit.attention(q, q, q, backend="numpy")
    with pytest.raises(ValueError, match="flex_attention: query is a meta tensor, which holds no data"):
        attnkit.flex_attention(q, q, q)


@pytest.mark.parametrize("device", ["meta", "fake"])
def test_the_kernel_level_forward_and_backward(device):
    """attention_forward / attention_backward (ring attention's blocks): shapes without data."""

    def run():
        q = torch.empty(2, 4, 9, 16, device="meta" if device == "meta" else "cpu")
        k = q.new_empty(2, 2, 12, 16)
        v = q.new_empty(2, 2, 12, 8)
        out, lse = attnkit.attention_forward(q, k, v, causal=True)
        grads = attnkit.attention_backward(q, k, v, out, torch.empty_like(out), lse, causal=True)
        return out, lse, grads, (q, k, v)

    if device == "fake":
        with FakeTensorMode():
            out, lse, grads, inputs = run()
    else:
        out, lse, grads, inputs = run()
    assert out.shape == (2, 4, 9, 8) and lse.shape == (2, 4, 9) and lse.dtype == torch.float32
    assert [tuple(g.shape) for g in grads] == [tuple(x.shape) for x in inputs]


def test_a_first_call_under_fake_tensor_mode_does_not_fix_the_planned_route(monkeypatch):
    """The planned calls learn torch's bf16 route from a conversion the first time; under
    FakeTensorMode that conversion fails, and the slower int16 route was kept for the process."""
    from attnkit import planned

    monkeypatch.setattr(planned, "_TORCH", [])
    with FakeTensorMode():
        q = torch.randn(1, 2, 16, 8)
        attnkit.scaled_dot_product_attention(q, q, q)
    assert planned._TORCH == []
    q = torch.randn(1, 2, 16, 8)
    attnkit.scaled_dot_product_attention(q, q, q)
    assert planned._TORCH[0][4] is getattr(torch, "uint16", torch.int16)
