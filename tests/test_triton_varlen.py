"""The Triton kernels on packed sequences (attnkit.varlen_attention, backend="triton") and
ALiBi, against the reference sequence by sequence.

Without a CUDA device they run under the Triton interpreter on CPU tensors (set
in conftest.py before triton is imported); with one, on the GPU. Accuracy rule:
2x (forward) / 3x (gradients) the error of the reference run in the inputs'
precision, plus a floor.
"""

from __future__ import annotations

import numpy as np
import pytest

from triton_device import device_or_skip_module

DEVICE = device_or_skip_module()
torch = pytest.importorskip("torch")

import attnkit  # noqa: E402
from attnkit.reference.varlen import varlen_attention as reference  # noqa: E402
from attnkit.reference.varlen import varlen_attention_backward as reference_backward  # noqa: E402
from attnkit.testing import max_error  # noqa: E402


# (lengths_q, lengths_k, Hq, Hkv, D, causal, align, window, softcap, alibi)
CASES = [
    ([1, 40, 0, 33], [1, 70, 5, 33], 4, 2, 32, True, "bottom_right", None, None, False),
    ([50, 7], [20, 7], 2, 1, 64, True, "bottom_right", None, None, True),  # Nq > Nk: empty rows
    ([45, 64], [45, 80], 2, 2, 16, False, "bottom_right", (9, 3), 4.0, True),  # local, not causal
    ([30, 17], [41, 17], 4, 4, 48, True, "top_left", None, None, False),
]


def case_id(case):
    lq, lk, hq, hkv, d, causal, align, window, softcap, alibi = case
    parts = ["N" + "_".join(f"{a}x{b}" for a, b in zip(lq, lk)), f"H{hq}kv{hkv}", f"D{d}"]
    parts += [f"causal_{align}"] if causal else [align]
    return "-".join(parts + ([f"window{window[0]}_{window[1]}"] if window else []) + ["softcap"] * bool(softcap)
                    + ["alibi"] * alibi)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_triton_varlen_against_reference(case, dtype):
    lq, lk, hq, hkv, d, causal, align, window, softcap, alibi = case
    rng = np.random.default_rng(sum(lq) + d)
    cu_q, cu_k = (np.concatenate([[0], np.cumsum(x)]).astype(np.int32) for x in (lq, lk))
    q = rng.standard_normal((hq, sum(lq), d))
    k, v = (rng.standard_normal((hkv, sum(lk), d)) for _ in range(2))
    d_out = rng.standard_normal((hq, sum(lq), d))
    slopes = rng.uniform(0.05, 0.5, (len(lq), hq)) if alibi else None
    options = dict(causal=causal, align=align, window=window, softcap=softcap)
    as_dtype = [torch.from_numpy(x).to(DEVICE, dtype) for x in (q, k, v)]
    rounded = [x.double().cpu().numpy() for x in as_dtype]  # what the kernel actually sees
    out64, lse64 = reference(*rounded, cu_q, cu_k, **options, alibi_slopes=slopes, return_lse=True)
    grads64 = reference_backward(*rounded, out64, d_out, lse64, cu_q, cu_k, **options, alibi_slopes=slopes)
    plain_dtype = np.float32 if dtype == torch.float32 else np.float16
    plain = reference(*(x.astype(np.float32) for x in rounded), cu_q, cu_k, **options, alibi_slopes=slopes)
    plain = plain.astype(plain_dtype)  # a plain kernel stores its output in the input's dtype
    grads_plain = reference_backward(*(x.astype(np.float32) for x in rounded), out64.astype(np.float32),
                                     d_out.astype(np.float32), lse64.astype(np.float32), cu_q, cu_k, **options,
                                     alibi_slopes=slopes)

    inputs = [x.clone().requires_grad_() for x in as_dtype]
    slopes_t = None if slopes is None else torch.from_numpy(slopes).to(DEVICE, torch.float32)
    out, lse = attnkit.varlen_attention(*inputs, torch.from_numpy(cu_q), torch.from_numpy(cu_k), **options,
                                        alibi_slopes=slopes_t, return_lse=True, backend="triton")
    out.backward(torch.from_numpy(d_out).to(DEVICE, dtype))
    floor = 2e-6 if dtype == torch.float32 else 2e-3
    error, allowed = max_error(out, out64), 2 * max_error(plain, out64) + floor
    assert error <= allowed, f"out: error {error:.3g} > allowed {allowed:.3g}"
    lse_np = lse.detach().cpu().numpy()
    assert np.array_equal(np.isinf(lse_np), np.isinf(lse64)), "rows that see no key must get lse -inf"
    assert max_error(np.where(np.isinf(lse64), 0, lse_np), np.where(np.isinf(lse64), 0, lse64)) <= 1e-3
    for name, x, expected, plain_grad in zip("qkv", inputs, grads64, grads_plain):
        error = max_error(x.grad, expected)
        allowed = 3 * max_error(plain_grad.astype(plain_dtype), expected) + 10 * floor
        assert error <= allowed, f"d{name}: error {error:.3g} > allowed {allowed:.3g}"


def test_flash_attn_functions_on_the_triton_kernel(monkeypatch):
    """attnkit.flash_attn's varlen and cache calls through the Triton kernel (the interpreter here)."""
    from attnkit import flash_attn

    monkeypatch.setattr(flash_attn, "BACKEND", "triton")
    generator = torch.Generator().manual_seed(4)
    lengths = [5, 33, 1]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    q, k, v = (torch.randn(sum(lengths), h, 16, generator=generator).to(DEVICE) for h in (4, 2, 2))
    slopes = torch.rand(4, generator=generator).to(DEVICE)
    out = flash_attn.flash_attn_varlen_func(q, k, v, cu.to(DEVICE), cu.to(DEVICE), 33, 33, causal=True,
                                            window_size=(8, -1), alibi_slopes=slopes)
    heads_first = [x.double().transpose(0, 1).cpu().numpy() for x in (q, k, v)]
    expected = reference(*heads_first, cu.numpy(), cu.numpy(), causal=True, window=(8, None),
                         alibi_slopes=slopes.double().cpu().numpy())
    assert max_error(out.transpose(0, 1), expected) < 1e-5

    k_cache, v_cache = (torch.randn(2, 20, 2, 16, generator=generator).to(DEVICE) for _ in range(2))
    q1 = torch.randn(2, 1, 4, 16, generator=generator).to(DEVICE)
    filled = torch.tensor([3, 19], dtype=torch.int32).to(DEVICE)
    out = flash_attn.flash_attn_with_kvcache(q1, k_cache, v_cache, cache_seqlens=filled, causal=True)
    for b, n in enumerate((3, 19)):
        expected = reference(q1[b].double().transpose(0, 1).cpu().numpy(),
                             k_cache[b, :n].double().transpose(0, 1).cpu().numpy(),
                             v_cache[b, :n].double().transpose(0, 1).cpu().numpy(), [0, 1], [0, n], causal=True)
        assert max_error(out[b].transpose(0, 1), expected) < 1e-5
