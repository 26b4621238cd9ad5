"""Dropout in the Triton kernels: the mask they draw, and results against the reference given it.

Without a CUDA device they run under the Triton interpreter on CPU tensors (set in conftest.py
before triton is imported). The mask is read back as tests/test_dropout.py reads the Numba kernel's:
scale 0 and v the identity make each output row the kept weights.
"""

from __future__ import annotations

import numpy as np
import pytest

from triton_device import device_or_skip_module

DEVICE = device_or_skip_module()
torch = pytest.importorskip("torch")

import attnkit  # noqa: E402
from attnkit.reference import attention as reference  # noqa: E402
from attnkit.reference import attention_backward as reference_backward  # noqa: E402
from attnkit.reference.dropout import keep_mask  # noqa: E402
from attnkit.reference.varlen import varlen_attention as reference_varlen  # noqa: E402
from attnkit.testing import assert_within_rule, max_error  # noqa: E402


pytestmark = pytest.mark.filterwarnings("error::attnkit.AttnkitFallbackWarning")


def test_the_triton_kernel_draws_the_reference_mask():
    b, h, nq, nk, p, seed = 2, 3, 40, 64, 0.3, (1 << 62) + 12345
    q, k = torch.zeros(b, h, nq, 16, device=DEVICE), torch.zeros(b, h, nk, 16, device=DEVICE)
    eye = torch.eye(nk, device=DEVICE).expand(b, h, nk, nk)
    out = attnkit.attention(q, k, eye, scale=0.0, dropout_p=p, dropout_seed=seed, backend="triton")
    scaled = out.double().cpu().numpy() * nk * (1 - p)
    assert np.all((np.abs(scaled) < 1e-5) | (np.abs(scaled - 1) < 1e-5))
    np.testing.assert_array_equal(scaled > 0.5, keep_mask(seed, p, b, h, nq, nk))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_triton_dropout_forward_and_gradients_match_the_reference(dtype):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 33, 32, generator=g)
    k, v = (torch.randn(2, 2, 41, 32, generator=g) for _ in range(2))
    d_out = torch.randn(2, 4, 33, 32, generator=g)
    p, seed = 0.25, 4321
    keep = keep_mask(seed, p, 2, 4, 33, 41)
    leaves = [x.to(DEVICE, dtype).clone().requires_grad_() for x in (q, k, v)]
    out = attnkit.attention(*leaves, causal=True, dropout_p=p, dropout_seed=seed, backend="triton")
    out.backward(d_out.to(DEVICE, dtype))

    exact = [x.double().numpy() for x in (q, k, v)]
    low = [x.to(dtype).numpy() for x in (q, k, v)]  # the reference in the inputs' precision
    options = dict(causal=True, dropout_p=p, dropout_keep=keep)
    want, lse = reference(*exact, return_lse=True, **options)
    plain, plain_lse = reference(*low, return_lse=True, **options)
    floor = 1e-6 if dtype == torch.float32 else 1e-3
    assert_within_rule("out", out.detach().cpu().numpy(), want, plain, 2, floor=floor)
    grads = reference_backward(*exact, want, d_out.double().numpy(), lse, **options)
    plain_grads = reference_backward(*low, plain, d_out.to(dtype).numpy(), plain_lse, **options)
    for name, x, g_want, g_plain in zip(("dq", "dk", "dv"), leaves, grads, plain_grads):
        assert_within_rule(name, x.grad.cpu().numpy(), g_want, g_plain, 3, floor=floor)


def test_triton_packed_dropout_draws_what_the_reference_draws():
    g = torch.Generator().manual_seed(2)
    lengths_q, lengths_k = [9, 0, 30], [12, 5, 30]
    cu_q, cu_k = (np.concatenate([[0], np.cumsum(n)]) for n in (lengths_q, lengths_k))
    q = torch.randn(2, sum(lengths_q), 16, generator=g)
    k, v = (torch.randn(2, sum(lengths_k), 16, generator=g) for _ in range(2))
    out = attnkit.varlen_attention(*(x.to(DEVICE) for x in (q, k, v)), cu_q, cu_k, causal=True, dropout_p=0.4,
                                   dropout_seed=99, backend="triton")  # fmt: skip
    want = reference_varlen(*(x.double().numpy() for x in (q, k, v)), cu_q, cu_k, causal=True, dropout_p=0.4,
                            dropout_seed=99)  # fmt: skip
    assert max_error(out.cpu().numpy(), want) < 2e-5
