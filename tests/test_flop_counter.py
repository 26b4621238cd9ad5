"""torch.utils.flop_counter.FlopCounterMode counts attnkit's calls as torch counts its fused SDPA
kernels (torch's own sdpa_flop_count / sdpa_backward_flop_count are the oracle), on real tensors
(the call then runs as attnkit's operator: same results) and on fake ones; packed calls count each
sequence on its own."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import attnkit

B, HQ, HKV, NQ, NK, D, DV = 2, 4, 2, 24, 40, 32, 16


def _inputs(generator=None):
    q = torch.randn(B, HQ, NQ, D, generator=generator, requires_grad=True)
    k = torch.randn(B, HKV, NK, D, generator=generator, requires_grad=True)
    v = torch.randn(B, HKV, NK, DV, generator=generator, requires_grad=True)
    return q, k, v


def _torch_counts(nq=NQ, nk=NK, batch=B):
    shapes = ((batch, HQ, nq, D), (batch, HKV, nk, D), (batch, HKV, nk, DV))
    return sdpa_flop_count(*shapes), sdpa_backward_flop_count((batch, HQ, nq, DV), *shapes)


@pytest.mark.parametrize("tensors", ["real", "fake"])
@pytest.mark.parametrize("grad", [False, True], ids=["forward", "forward_backward"])
def test_dense_calls_count_as_torch_counts_its_fused_kernels(grad, tensors):
    forward, backward = _torch_counts()
    expected = forward + backward * grad

    def count():
        q, k, v = _inputs(torch.Generator().manual_seed(0) if tensors == "real" else None)
        with FlopCounterMode(display=False) as counter:
            with torch.set_grad_enabled(grad):
                out = attnkit.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                if grad:
                    out.sum().backward()
        return counter.get_total_flops(), out, (q.grad, k.grad, v.grad)

    if tensors == "fake":
        with FakeTensorMode():
            assert count()[0] == expected
        return
    flops, out, grads = count()
    assert flops == expected
    # the same kernel without the mode: the same results, bit for bit
    q, k, v = _inputs(torch.Generator().manual_seed(0))
    plain = attnkit.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.equal(out, plain)
    if grad:
        plain.sum().backward()
        for got, want in zip(grads, (q.grad, k.grad, v.grad)):
            assert torch.equal(got, want)


def test_packed_calls_count_each_sequence():
    lengths_q, lengths_k = [5, 0, 19], [7, 3, 30]
    cu_q = torch.tensor([0, 5, 5, 24], dtype=torch.int32)
    cu_k = torch.tensor([0, 7, 10, 40], dtype=torch.int32)
    q = torch.randn(HQ, 24, D, requires_grad=True)
    k = torch.randn(HKV, 40, D, requires_grad=True)
    v = torch.randn(HKV, 40, DV, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        attnkit.varlen_attention(q, k, v, cu_q, cu_k, causal=True).sum().backward()
    expected = sum(sum(_torch_counts(nq, nk, 1)) for nq, nk in zip(lengths_q, lengths_k))
    assert counter.get_total_flops() == expected


def test_numpy_calls_and_calls_outside_a_mode_are_not_affected():
    q = torch.randn(1, 2, 8, 16)
    with FlopCounterMode(display=False) as counter:
        attnkit.attention(q.numpy(), q.numpy(), q.numpy())  # NumPy: no torch operator to see
    assert counter.get_total_flops() == 0


def test_calls_under_the_mode_give_the_same_results_and_gradients():
    """Dropout, sinks, windows and softcap, dense and packed: the operator route is the same kernels
    and the same keep mask, bit for bit."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 30, 16, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 40, 16, generator=g, requires_grad=True)
    sinks = torch.randn(4, generator=g, requires_grad=True)
    packed = torch.randn(4, 30, 16, generator=g, requires_grad=True)
    cu = torch.tensor([0, 10, 30], dtype=torch.int32)
    calls = [
        lambda: attnkit.attention(q, k, k, causal=True, dropout_p=0.2, dropout_seed=7, sinks=sinks, window=(5, 3),
                                  softcap=3.0),
        lambda: attnkit.varlen_attention(packed, packed[:2], packed[:2], cu, cu, causal=True, dropout_p=0.2,
                                         dropout_seed=3),
    ]  # fmt: skip
    for call in calls:
        results = []
        for counting in (False, True):
            for x in (q, k, sinks, packed):
                x.grad = None
            with FlopCounterMode(display=False) if counting else torch.enable_grad():
                out = call()
                out.sum().backward()
            results.append([out.detach()] + [x.grad for x in (q, k, sinks, packed)])
        for plain, counted in zip(*results):
            assert (plain is None and counted is None) or torch.equal(plain, counted)


def test_triton_calls_count_through_their_operators():
    """The CUDA backend calls attnkit::flash_attention_fwd / _bwd on every call (here under the Triton
    interpreter, on CPU tensors): counted the same way."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 16, 16, generator=g, requires_grad=True)
    k = torch.randn(1, 2, 24, 16, generator=g, requires_grad=True)
    v = torch.randn(1, 2, 24, 16, generator=g, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        attnkit.attention(q, k, v, backend="triton").sum().backward()
    shapes = (tuple(q.shape), tuple(k.shape), tuple(v.shape))
    assert counter.get_total_flops() == sdpa_flop_count(*shapes) + sdpa_backward_flop_count(shapes[0], *shapes)
