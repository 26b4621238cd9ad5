"""The Triton flash kernels (attnkit.kernels.triton_attention) against the NumPy reference.

Without a CUDA device the kernels run under the Triton interpreter
(TRITON_INTERPRET=1, set below before triton is first imported) on CPU tensors;
with one they run on the GPU and bfloat16 joins the sweep.

Accuracy rule (flash-attn's): the kernel's error against the float64 reference
is at most 2x (3x for gradients) the error of a plain attention computed in
the input's own precision (torch ops, softmax in that dtype), plus a tiny floor.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

try:
    import triton  # noqa: F401
except Exception as error:  # ImportError, or a triton that fails to initialise
    pytest.skip(f"triton cannot be imported ({type(error).__name__}: {error})", allow_module_level=True)

from attnkit.kernels import triton_attention as ta  # noqa: E402
from attnkit.reference import attention, attention_backward  # noqa: E402
from attnkit.testing import assert_close, assert_within_rule, torch_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not ta.interpreting():
    pytest.skip(
        "no CUDA device and the Triton kernels were imported before TRITON_INTERPRET=1 was set "
        "(run this file on its own, or set TRITON_INTERPRET=1 in the environment)",
        allow_module_level=True,
    )

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
FLOOR = {torch.float32: 2e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3}


def _np64(x):
    return None if x is None else x.detach().to("cpu", torch.float64 if x.is_floating_point() else x.dtype).numpy()


# The same-precision "plain implementation" whose error sets the budget.
plain_attention = torch_attention


def assert_rule(name, got, plain, ref, factor, dtype, terms=1):
    """attnkit.testing's rule, the floor scaled by the reference's size and sqrt(number of summed terms)."""
    scale = max(1.0, float(np.max(np.abs(np.where(np.isinf(ref), 0, ref)), initial=0.0)))
    assert_within_rule(name, _np64(got), ref, _np64(plain), factor, floor=FLOOR[dtype] * scale * math.sqrt(terms))


def make_inputs(b=1, hq=2, hkv=None, nq=37, nk=None, d=32, dv=None, dtype=torch.float32,
                layout="bhnd", seed=0, amplitude=1.0):
    hkv, nk, dv = hkv or hq, nq if nk is None else nk, dv or d
    g = torch.Generator().manual_seed(seed)

    def rand(h, n, x):
        t = (torch.randn(b, n, h, x, generator=g) * amplitude).to(dtype).to(DEVICE)
        if layout == "bnhd":  # (B, N, H, D) memory seen as (B, H, N, D): strided, no copy
            return t.transpose(1, 2)
        if layout == "dstride":  # head-dim stride 2
            wide = torch.zeros(b, h, n, 2 * x, dtype=dtype, device=DEVICE)
            wide[..., ::2] = t.transpose(1, 2)
            return wide[..., ::2]
        return t.transpose(1, 2).contiguous()

    return rand(hq, nq, d), rand(hkv, nk, d), rand(hkv, nk, dv)


def check(q, k, v, mask=None, *, scale=None, causal=None, window=None, softcap=None, grads=True,
          d_out=None, **kernel_options):
    """Forward (and backward) against the fp64 reference under the 2x/3x rule; returns results."""
    dtype = q.dtype
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    opts = dict(scale=scale, causal=causal, window=window, softcap=softcap)
    out, lse = ta.flash_forward(q, k, v, mask, **opts, **kernel_options)
    assert out.dtype == dtype and out.shape == q.shape[:3] + v.shape[3:]
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    ref_mask = _np64(mask)
    ref_opts = dict(causal=causal or False, window=window, softcap=softcap, scale=scale, mask=ref_mask)
    ref_out, ref_lse = attention(_np64(q), _np64(k), _np64(v), return_lse=True, **ref_opts)

    leaves = [x.detach().clone().requires_grad_(grads) for x in (q, k, v)]
    plain_out, plain_lse = plain_attention(*leaves, mask, **opts)
    assert_rule("out", out, plain_out, ref_out, 2, dtype)
    assert np.array_equal(np.isneginf(ref_lse), torch.isneginf(lse).cpu().numpy()), "lse -inf rows"
    assert_rule("lse", lse, plain_lse, ref_lse, 2, dtype)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    if not grads:
        return out, lse, None
    if d_out is None:
        g = torch.Generator().manual_seed(1)
        d_out = torch.randn(out.shape, generator=g).to(dtype).to(DEVICE)
    grads_k = ta.flash_backward(q, k, v, mask, out, d_out, lse, **opts, **kernel_options)
    ref_grads = attention_backward(_np64(q), _np64(k), _np64(v), ref_out, _np64(d_out), ref_lse,
                                   **ref_opts)
    plain_grads = torch.autograd.grad(plain_out, leaves, d_out)
    for name, got, plain, ref, x in zip(("dq", "dk", "dv"), grads_k, plain_grads, ref_grads, (q, k, v)):
        assert got.shape == x.shape and got.dtype == x.dtype, name
        assert not torch.isnan(got).any(), name
        # dk/dv sum over every query row of the group, dq over every key
        terms = k.shape[2] if name == "dq" else q.shape[2] * q.shape[1] // k.shape[1]
        assert_rule(name, got, plain, ref, 3, dtype, terms)
    return out, lse, grads_k


# ----------------------------------------------------------------------------- features

FEATURES = {
    "plain": dict(),
    "causal_top_left": dict(causal="top_left"),
    "causal_bottom_right": dict(causal="bottom_right"),
    "window_5_3": dict(window=(5, 3)),
    "window_0_0": dict(window=(0, 0)),
    "window_left_only": dict(window=(9, None)),
    "window_right_only_bottom_right": dict(window=(None, 4), causal="bottom_right"),
    "causal_window": dict(causal="top_left", window=(12, None)),
    "softcap": dict(softcap=1.5, scale=0.9),
    "softcap_causal": dict(softcap=20.0, causal="bottom_right"),
    "negative_scale": dict(scale=-0.3),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("nq,nk", [(45, 70), (70, 45)])
def test_features(feature, nq, nk, dtype):
    q, k, v = make_inputs(b=1, hq=2, nq=nq, nk=nk, d=40, dtype=dtype)
    check(q, k, v, **FEATURES[feature])


@pytest.mark.parametrize("causal", [None, "top_left", "bottom_right"], ids=str)
def test_dense_alibi_and_align_match_an_explicit_bias(causal):
    """ALiBi slopes and align on a dense call: the same as the bias -slope * |i + offset - j| given as a mask."""
    nq, nk = 23, 41
    q, k, v = make_inputs(b=2, hq=2, nq=nq, nk=nk, d=32)
    slopes = torch.tensor([[0.1, 0.3], [0.2, 0.05]], device=DEVICE)
    align = causal or "bottom_right"
    offset = nk - nq if align == "bottom_right" else 0
    distance = (torch.arange(nq)[:, None] + offset - torch.arange(nk)[None, :]).abs().to(DEVICE)
    bias = -slopes[:, :, None, None] * distance  # (B, Hq, Nq, Nk)
    opts = dict(scale=0.2, causal=causal, window=(15, None))
    out, lse = ta.flash_forward(q, k, v, None, **opts, align=align, alibi=slopes)
    ref_opts = dict(opts, causal=causal or False, mask=_np64(bias), align=align)
    ref_out, ref_lse = attention(_np64(q), _np64(k), _np64(v), return_lse=True, **ref_opts)
    assert_close(out, ref_out, atol=2e-5, name="out")
    assert_close(lse, ref_lse, atol=2e-5, name="lse")
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    grads = ta.flash_backward(q, k, v, None, out, d_out, lse, **opts, align=align, alibi=slopes)
    ref_grads = attention_backward(_np64(q), _np64(k), _np64(v), ref_out, _np64(d_out), ref_lse, **ref_opts)
    for name, got, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(got, ref, atol=5e-5, name=name)


MASKS = ["bool_full", "bool_key_padding", "bool_row_empty", "add_head", "add_neg_inf_row", "add_shared"]


def make_mask(kind, b, hq, nq, nk, dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    if kind == "bool_full":
        return (torch.rand(b, hq, nq, nk, generator=g) > 0.3).to(DEVICE)
    if kind == "bool_key_padding":  # (B, 1, 1, Nk): stays that shape, strides 0
        lengths = torch.tensor([nk, nk // 2])[:b]
        return (torch.arange(nk)[None, :] < lengths[:, None]).reshape(b, 1, 1, nk).to(DEVICE)
    if kind == "bool_row_empty":  # some query rows see nothing at all
        m = torch.rand(1, 1, nq, nk, generator=g) > 0.5
        m[..., ::5, :] = False
        return m.to(DEVICE)
    if kind == "add_head":
        return torch.randn(1, hq, nq, nk, generator=g).to(dtype).to(DEVICE)
    if kind == "add_neg_inf_row":
        m = torch.randn(nq, nk, generator=g)
        m[3] = float("-inf")
        m[:, 7] = float("-inf")
        return m.to(dtype).to(DEVICE)
    return torch.randn(1, 1, 1, nk, generator=g).to(torch.float32).to(DEVICE)  # float32 on fp16


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", MASKS)
def test_masks(kind, dtype):
    b, hq, nq, nk = 2, 2, 33, 50
    q, k, v = make_inputs(b=b, hq=hq, nq=nq, nk=nk, d=32, dtype=dtype)
    mask = make_mask(kind, b, hq, nq, nk, dtype)
    check(q, k, v, mask, causal="bottom_right" if kind == "bool_key_padding" else None)


def test_mask_with_causal_and_softcap():
    q, k, v = make_inputs(b=2, hq=2, nq=40, nk=40, d=24)
    check(q, k, v, make_mask("add_head", 2, 2, 40, 40, torch.float32), causal=True, softcap=3.0)


def test_mask_is_never_materialised(monkeypatch):
    """A (B, 1, 1, Nk) mask reaches the kernel as a stride-0 view of its own storage."""
    seen = []
    real = ta.mask_operand

    def spy(mask, shape, dummy):
        result = real(mask, shape, dummy)
        seen.append((result[0].data_ptr() == mask.data_ptr(), result[1]))
        return result

    monkeypatch.setattr(ta, "mask_operand", spy)
    q, k, v = make_inputs(b=2, hq=2, nq=17, nk=29, d=16)
    check(q, k, v, make_mask("bool_key_padding", 2, 2, 17, 29, torch.float32), grads=False)
    same_storage, strides = seen[0]
    assert same_storage and strides[1] == 0 and strides[2] == 0


# ----------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hq,hkv", [(4, 2), (3, 1)], ids=["gqa", "mqa"])
def test_gqa_mqa(hq, hkv, dtype):
    q, k, v = make_inputs(b=2, hq=hq, hkv=hkv, nq=29, nk=41, d=32, dtype=dtype)
    check(q, k, v, causal="bottom_right", window=(20, None))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d,dv", [(8, 8), (16, 16), (59, 59), (80, 80), (96, 96), (160, 160),
                                  (256, 256), (32, 48)])
def test_head_dims(d, dv, dtype):
    n = 40 if d >= 160 else 37
    q, k, v = make_inputs(b=1, hq=1 if d >= 160 else 2, nq=n, nk=n + 3, d=d, dv=dv, dtype=dtype)
    check(q, k, v, causal="top_left" if d in (80, 160) else None)


@pytest.mark.parametrize("nq,nk", [(1, 239), (1, 1), (239, 1), (31, 33), (32, 32), (64, 65), (97, 13)])
def test_lengths(nq, nk):
    q, k, v = make_inputs(b=1, hq=2, nq=nq, nk=nk, d=16)
    check(q, k, v, causal="bottom_right" if nq < nk else None)
    check(q, k, v, causal="top_left", grads=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["bnhd", "dstride"])
def test_strided_inputs(layout, dtype):
    q, k, v = make_inputs(b=2, hq=4, hkv=2, nq=30, nk=44, d=32, dtype=dtype, layout=layout)
    assert not q.is_contiguous()
    d_out = torch.randn(2, 30, 4, 32).to(dtype).to(DEVICE).transpose(1, 2)  # strided too
    out, _, grads = check(q, k, v, causal="top_left", d_out=d_out)
    if layout == "bnhd":  # outputs keep the (B, N, H, D) memory layout of their input
        assert out.transpose(1, 2).is_contiguous() and grads[0].transpose(1, 2).is_contiguous()


def test_block_sizes(monkeypatch):
    """Unequal and tiny tiles: every split of masked / unmasked key and query blocks."""
    q, k, v = make_inputs(b=1, hq=2, hkv=1, nq=53, nk=77, d=16)
    for blocks in [(16, 32), (64, 16), (16, 16)]:
        monkeypatch.setattr(ta, "INTERPRETER_BLOCKS", blocks)
        check(q, k, v, causal="bottom_right", window=(21, None))
        check(q, k, v, window=(3, 17), grads=blocks == (16, 32))


def test_large_values_fp16():
    q, k, v = make_inputs(b=1, hq=2, nq=40, nk=40, d=64, dtype=torch.float16, amplitude=5.0)
    check(q, k, v, causal="top_left")


def test_int64_offsets_path():
    """The 64-bit index path (used once a tensor spans 2^31 elements) computes the same numbers."""
    q, k, v = make_inputs(b=2, hq=2, hkv=1, nq=33, nk=35, d=16)
    check(q, k, v, make_mask("bool_full", 2, 2, 33, 35, torch.float32), causal="top_left",
          _force_int64=True)


# ----------------------------------------------------------------------------- edge cases

def test_fully_masked_rows_give_zero_and_zero_grads():
    q, k, v = make_inputs(b=1, hq=2, nq=20, nk=10, d=16)
    mask = torch.ones(20, 10, dtype=torch.bool, device=DEVICE)
    mask[4] = False
    out, lse, (dq, dk, dv) = check(q, k, v, mask, causal="bottom_right")
    # bottom_right with Nq > Nk: queries 0..9 see no key; row 4 is masked out as well
    for rows in (slice(0, 10), 4):
        assert torch.all(out[:, :, rows] == 0) and torch.all(torch.isneginf(lse[:, :, rows]))
        assert torch.all(dq[:, :, rows] == 0)


def test_empty():
    q, k, v = make_inputs(b=1, hq=2, nq=5, nk=7, d=16)
    out, lse = ta.flash_forward(q, k[:, :, :0], v[:, :, :0], None, scale=0.5)
    assert out.shape == (1, 2, 5, 16) and torch.all(out == 0) and torch.all(torch.isneginf(lse))
    grads = ta.flash_backward(q, k[:, :, :0], v[:, :, :0], None, out, torch.ones_like(out), lse,
                              scale=0.5)
    assert torch.all(grads[0] == 0) and grads[1].shape == (1, 2, 0, 16)
    out, lse = ta.flash_forward(q[:, :, :0], k, v, None, scale=0.5)
    assert out.shape == (1, 2, 0, 16) and lse.shape == (1, 2, 0)


def test_nan_stays_in_its_row():
    q, k, v = make_inputs(b=1, hq=2, nq=20, nk=20, d=16)
    q = q.clone()
    q[0, 1, 3, 0] = float("nan")
    out, _ = ta.flash_forward(q, k, v, None, scale=0.25)
    assert torch.isnan(out[0, 1, 3]).all()
    finite = torch.ones_like(out, dtype=torch.bool)
    finite[0, 1, 3] = False
    assert not torch.isnan(out[finite]).any()


def test_backward_is_deterministic():
    q, k, v = make_inputs(b=2, hq=4, hkv=2, nq=40, nk=40, d=16)
    out, lse = ta.flash_forward(q, k, v, None, scale=0.25, causal="top_left")
    d_out = torch.randn_like(out)
    first = ta.flash_backward(q, k, v, None, out, d_out, lse, scale=0.25, causal="top_left")
    for _ in range(2):
        again = ta.flash_backward(q, k, v, None, out, d_out, lse, scale=0.25, causal="top_left")
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_why_unsupported():
    assert ta.why_unsupported(torch.float16, 64, 64, DEVICE) is None
    assert "float64" in ta.why_unsupported(torch.float64, 64, 64, DEVICE)
    assert "head_dim" in ta.why_unsupported(torch.float16, 512, 64, DEVICE)
    if DEVICE == "cpu":
        assert "bfloat16" in ta.why_unsupported(torch.bfloat16, 64, 64, "cpu")
    else:
        assert ta.why_unsupported(torch.float16, 64, 64, "cpu") is not None


# ----------------------------------------------------------------------------- torch integration

@pytest.fixture(scope="module")
def ops():
    from attnkit import torch_ops as triton_ops

    return triton_ops


def test_autograd_through_out_and_lse(ops):
    """triton_attention's gradients (through out and lse) match torch autograd in float64."""
    q, k, v = make_inputs(b=1, hq=4, hkv=2, nq=21, nk=34, d=16)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    mask = make_mask("add_head", 1, 4, 21, 34, torch.float32)
    out, lse = ops.triton_attention(*leaves, mask, scale=0.3, causal="bottom_right", window=(15, None),
                                    softcap=5.0)
    g = torch.Generator().manual_seed(5)
    w_out, w_lse = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    ((out * w_out.to(DEVICE)).sum() + (lse * w_lse.to(DEVICE)).sum()).backward()

    refs = [x.detach().to("cpu", torch.float64).requires_grad_() for x in (q, k, v)]
    r_out, r_lse = plain_attention(*refs, mask.cpu().double(), scale=0.3, causal="bottom_right",
                                   window=(15, None), softcap=5.0)
    ((r_out * w_out.double()).sum() + (r_lse * w_lse.double()).sum()).backward()
    for leaf, ref in zip(leaves, refs):
        torch.testing.assert_close(leaf.grad.cpu().double(), ref.grad, atol=2e-5, rtol=1e-4)


def test_torch_compile_fullgraph(ops):
    q, k, v = (x.detach().requires_grad_() for x in make_inputs(b=1, hq=2, nq=24, nk=24, d=16))

    def f(q, k, v):
        return ops.triton_attention(q, k, v, scale=0.25, causal=True)[0].square().sum()

    compiled = torch.compile(f, fullgraph=True)
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    expected = torch.autograd.grad(f(q, k, v), (q, k, v))
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b)


def test_opcheck(ops):
    q, k, v = (x.detach().requires_grad_() for x in make_inputs(b=1, hq=2, hkv=1, nq=17, nk=19, d=16))
    mask = make_mask("bool_full", 1, 2, 17, 19, torch.float32)
    torch.library.opcheck(ops.flash_attention_fwd, (q, k, v, mask, None, 0.25, 2, 2, 6, None, None))
    out, lse = ops.flash_attention_fwd(q.detach(), k.detach(), v.detach(), None, None, 0.25, 1, 1, None, None, 2.0)
    torch.library.opcheck(
        ops.flash_attention_bwd,
        (q.detach(), k.detach(), v.detach(), None, None, out, torch.ones_like(out), lse, None, 0.25, 1, 1,
         None, None, 2.0),
    )


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the no-GPU message")
def test_gpu_check_without_cuda_says_so(tmp_path):
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "..", "bench", "gpu_check.py")
    done = subprocess.run([sys.executable, script, str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and "no CUDA device" in done.stdout and "nothing checked" in done.stdout
    done = subprocess.run([sys.executable, script, str(tmp_path), "--allow-no-gpu"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "no CUDA device" in done.stdout


def test_public_api_backend_triton_with_broadcast_batch_and_gradients():
    """attnkit.attention(backend="triton"): batch axes folded, broadcast gradients summed back."""
    import attnkit

    q = torch.randn(2, 4, 17, 16, device=DEVICE)
    k = torch.randn(1, 2, 19, 16, device=DEVICE)  # shared across the batch, GQA 2:1
    v = torch.randn(2, 19, 8, device=DEVICE)  # no batch axis
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = attnkit.attention(*leaves, causal="bottom_right", backend="triton")
    d_out = torch.randn_like(out)
    out.backward(d_out)
    numpy64 = [_np64(x) for x in (q, k, v)]
    expected, lse = attention(*numpy64, causal="bottom_right", return_lse=True)
    grads = attention_backward(*numpy64, expected, _np64(d_out), lse, causal="bottom_right")
    assert_close(out, expected, atol=2e-5, rtol=2e-5, name="out")
    for name, leaf, g in zip(("dq", "dk", "dv"), leaves, grads):
        assert leaf.grad.shape == leaf.shape
        assert_close(leaf.grad, g, atol=5e-5, rtol=5e-5, name=name)


# ----------------------------------------------------------------------------- mask summaries

def test_mask_summary_bits():
    """One int8 per 16 x 16 tile: bit 0 some score survives, bit 1 the mask changes some score."""
    mask = torch.ones(1, 1, 40, 50, dtype=torch.bool)
    mask[:, :, :16, :16] = False  # tile (0, 0) hidden
    mask[:, :, 16:32, 16:32] = torch.rand(16, 16) < 0.5  # tile (1, 1) mixed
    mask[:, :, 16:32, 16] = True
    mask[:, :, 16:32, 17] = False
    summary, strides = ta.mask_summary(mask, (1, 1, 40, 50), mask)
    assert summary.shape == (1, 1, 3, 4)
    assert summary[0, 0, 0, 0] == 2 and summary[0, 0, 1, 1] == 3 and summary[0, 0, 0, 1] == 1
    assert strides[:2] == (0, 0) and strides[4:] == (3, 4)
    additive = torch.zeros(2, 1, 1, 40)
    additive[0, ..., :16] = float("-inf")
    additive[1, ..., 20] = 0.5
    summary, strides = ta.mask_summary(additive, (2, 4, 30, 40), additive)
    assert summary[0, 0, 0].tolist() == [2, 1, 1] and summary[1, 0, 0].tolist() == [1, 3, 1]
    assert strides[1] == 0 and strides[2] == 0 and strides[4] == 2**31 - 1  # one row of tiles for every query


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_blocky_masks_skip_and_unmask_whole_blocks(kind, monkeypatch):
    """Whole blocks hidden, visible and mixed, a fully padded sequence: equal to the reference."""
    monkeypatch.setattr(ta, "INTERPRETER_BLOCKS", (32, 16))
    gen = torch.Generator().manual_seed(11)
    q, k, v = make_inputs(b=2, hq=2, nq=70, nk=90, d=16)
    visible = torch.ones(2, 2, 70, 90, dtype=torch.bool)
    visible[:, :, 32:64, 16:48] = False  # hidden blocks (query block 1, key blocks 1-2)
    visible[:, :, :32, 48:64] = torch.rand(2, 2, 32, 16, generator=gen) < 0.5  # mixed
    visible[1] = False  # a fully padded sequence
    visible[0, :, 5] = False  # and one fully masked row
    mask = visible if kind == "bool" else torch.where(visible, 0.0, float("-inf"))
    check(q, k, v, mask)
    check(q, k, v, mask, causal="bottom_right")


def test_a_row_of_finfo_min_entries_averages_its_keys():
    """transformers' additive padding (finfo(float32).min) hiding a row whole: the reference (and
    torch) average its keys; finfo.min * log2(e) overflowed to -inf and gave a row with no key."""
    q, k, v = make_inputs(b=2, hq=2, nq=20, nk=24, d=16)
    real = torch.ones(2, 24, dtype=torch.bool)
    real[1] = False  # the second sequence: every key padding
    real[0, 17:] = False
    mask = torch.zeros(2, 1, 1, 24).masked_fill(~real[:, None, None, :], torch.finfo(torch.float32).min).to(DEVICE)
    out, lse = ta.flash_forward(q, k, v, mask, scale=0.25)
    ref_out, ref_lse = attention(_np64(q), _np64(k), _np64(v), scale=0.25, mask=_np64(mask), return_lse=True)
    np.testing.assert_allclose(out.cpu().double().numpy(), ref_out, atol=2e-5)
    np.testing.assert_allclose(out[1].cpu().numpy(), v[1].mean(dim=1, keepdim=True).expand(2, 20, 16).cpu().numpy(),
                               atol=2e-5)  # fmt: skip
    assert torch.isfinite(lse).all()
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    grads = ta.flash_backward(q, k, v, mask, out, d_out, lse, scale=0.25)
    ref_grads = attention_backward(_np64(q), _np64(k), _np64(v), ref_out, _np64(d_out), ref_lse, scale=0.25,
                                   mask=_np64(mask))  # fmt: skip
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        np.testing.assert_allclose(got.cpu().double().numpy(), want, atol=5e-5, err_msg=name)


def test_sinks_gradient_through_out_and_lse(ops):
    """The Triton operators' autograd gives the sinks their gradient, lse's share included (d lse /
    d sink = p_sink), against float64 autograd through an explicit softmax with a sink column."""
    q, k, v = make_inputs(b=2, hq=4, hkv=2, nq=13, nk=19, d=16)
    g = torch.Generator().manual_seed(9)
    sinks = torch.randn(4, generator=g).to(DEVICE).requires_grad_()
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out, lse = ops.flash_attention_fwd(*leaves, None, None, 0.3, 0, 0, None, None, None, 0.0, 0, sinks)
    w_out, w_lse = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    ((out * w_out.to(DEVICE)).sum() + (lse * w_lse.to(DEVICE)).sum()).backward()

    refs = [x.detach().to("cpu", torch.float64).requires_grad_() for x in (q, k, v, sinks)]
    rq, rk, rv, rs = refs
    rk, rv = (x.repeat_interleave(2, dim=1) for x in (rk, rv))  # GQA: query head h reads kv head h // 2
    scores = torch.einsum("bhqd,bhkd->bhqk", rq, rk) * 0.3
    joined = torch.cat([scores, rs[None, :, None, None].expand(2, 4, 13, 1)], dim=-1)
    r_lse = torch.logsumexp(joined, dim=-1)
    r_out = torch.einsum("bhqk,bhkd->bhqd", torch.softmax(joined, dim=-1)[..., :-1], rv)
    ((r_out * w_out.double()).sum() + (r_lse * w_lse.double()).sum()).backward()
    for name, leaf, ref in zip(("dq", "dk", "dv", "dsinks"), leaves + [sinks], refs):
        torch.testing.assert_close(leaf.grad.cpu().double(), ref.grad, atol=5e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
