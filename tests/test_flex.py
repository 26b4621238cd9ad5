"""attnkit.flex_attention against torch's FlexAttention and against attnkit's reference.

torch's eager flex refuses a backward on the CPU at its public entry point, but the higher-order
operator underneath (torch._higher_order_ops.flex_attention) runs forward and backward in eager
mode, with captured tensors passed as extra buffers of the user functions: that is the peer here,
in float64 (the exact answer) and in the kernel's dtype (whose error sets the 2x / 3x budget).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch._higher_order_ops.flex_attention import flex_attention as torch_flex_op
from torch.nn.attention.flex_attention import create_block_mask as torch_create_block_mask

import attnkit
from attnkit import reference
from attnkit.flex import FlexRecompileWarning, UntraceableError, and_masks, generated_source, or_masks
from attnkit.testing import assert_close, assert_within_rule

BLOCK = 16  # small blocks: odd lengths give full, partial and empty blocks at test sizes
HQ, HKV, NQ, NK, D = 4, 2, 37, 53, 16


def _case(name, generator, nq=NQ, nk=NK):
    """(score_fn, score buffers, mask_fn, mask buffers): fns take their buffers as extra arguments."""
    if name == "relative_bias":  # a learnable (Hq, Nq + Nk) table indexed by the distance
        table = (torch.randn(HQ, nq + nk, generator=generator, dtype=torch.float64) * 0.5).requires_grad_()
        return (lambda s, b, h, q, kv, t: s + t[h, q - kv + nk]), [table], None, []
    if name == "alibi":  # learnable slopes, bottom-right aligned as attnkit's built-in ALiBi
        slopes = (torch.rand(HQ, generator=generator, dtype=torch.float64) * 0.5).requires_grad_()
        return (lambda s, b, h, q, kv, m: s - m[h] * torch.abs(q + (nk - nq) - kv)), [slopes], None, []
    if name == "softcap":
        return (lambda s, b, h, q, kv: 1.5 * torch.tanh(s / 1.5)), [], None, []
    if name == "document":  # random document boundaries, the same documents on both sides
        q_docs = torch.sort(torch.randint(0, 4, (nq,), generator=generator)).values
        kv_docs = torch.sort(torch.randint(0, 4, (nk,), generator=generator)).values
        return None, [], (lambda b, h, q, kv, dq, dk: dq[q] == dk[kv]), [q_docs, kv_docs]
    if name == "prefix_lm":
        return None, [], (lambda b, h, q, kv: (kv <= 9) | (q >= kv)), []
    if name == "window_and_sinks":  # a causal window of 8 plus the first 3 keys, as StreamingLLM
        return None, [], (lambda b, h, q, kv: ((q >= kv) & (q - kv <= 8)) | (kv < 3)), []
    if name == "hidden_rows":  # every 5th query sees nothing; with a score_mod as well
        return ((lambda s, b, h, q, kv: s * 0.5 + h)), [], (lambda b, h, q, kv: (q % 5 != 2) & (kv >= q - 20)), []
    raise KeyError(name)


CASES = ["relative_bias", "alibi", "softcap", "document", "prefix_lm", "window_and_sinks", "hidden_rows"]


def _bind(fn, buffers):
    if fn is None:
        return None
    if fn.__code__.co_argcount - len(buffers) == 4:  # torch tells mask_mod from score_mod by the arity
        return lambda b, h, q_idx, kv_idx: fn(b, h, q_idx, kv_idx, *buffers)
    return lambda score, b, h, q_idx, kv_idx: fn(score, b, h, q_idx, kv_idx, *buffers)


def _inputs(dtype, generator, nq=NQ, nk=NK, hq=HQ, hkv=HKV, batch=2):
    shapes = ((batch, hq, nq, D), (batch, hkv, nk, D), (batch, hkv, nk, D))
    return [torch.randn(s, generator=generator, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


def _torch_flex(q, k, v, score_fn, score_bufs, block_mask):
    """torch's eager flex operator; GQA by repeating K / V heads (the operator wants equal heads)."""
    group = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(group, dim=1) for x in (k, v))
    score = score_fn if score_fn is not None else (lambda s, b, h, qi, kv: s)
    out, lse, *_ = torch_flex_op(q, k, v, score, block_mask.as_tuple(), q.shape[-1] ** -0.5, {}, tuple(score_bufs), ())
    return out, lse * np.log(2.0)  # the operator's lse is in base 2; the public function's (and ours) natural


def _block_masks(mask_fn, mask_bufs, batch, maker, nq=NQ, nk=NK):
    mask = _bind(mask_fn, mask_bufs) if mask_fn is not None else (lambda b, h, q, kv: q >= 0)
    if maker == "torch":
        return torch_create_block_mask(mask, batch, None, nq, nk, device="cpu", BLOCK_SIZE=BLOCK)
    return attnkit.create_block_mask(mask, batch, None, nq, nk, BLOCK_SIZE=BLOCK)


def _triton_ready():
    """The Triton kernels run here: on a GPU, or under the interpreter (conftest sets TRITON_INTERPRET=1
    before triton is imported when there is no GPU)."""
    try:
        from attnkit.kernels import triton_attention
    except Exception:  # noqa: BLE001: a triton that cannot be imported
        return False
    return torch.cuda.is_available() or triton_attention.interpreting()


GPU = torch.cuda.is_available()
KERNELS = [("numba", torch.float32), ("numba", torch.bfloat16), ("triton", torch.float32), ("triton", torch.float16)]
KERNELS += [("triton", torch.bfloat16)] if GPU else []  # the interpreter computes in NumPy, which has no bf16
# The interpreter is slow: on the CPU, float16 runs the cases that learn a captured tensor or hide rows.
MATRIX = [(name, backend, dtype) for name in CASES for backend, dtype in KERNELS
          if GPU or (backend, dtype) != ("triton", torch.float16) or name in ("relative_bias", "hidden_rows")]


@pytest.mark.parametrize("name,backend,dtype", MATRIX, ids=[f"{n}-{b}-{str(d)[6:]}" for n, b, d in MATRIX])
def test_forward_and_gradients_match_torch_flex(name, backend, dtype):
    if backend == "triton" and not _triton_ready():
        pytest.skip("triton cannot run here")
    device = "cuda" if backend == "triton" and GPU else "cpu"
    generator = torch.Generator().manual_seed(CASES.index(name) + 10 * (dtype == torch.bfloat16))
    score_fn, score_bufs, mask_fn, mask_bufs = _case(name, generator)
    q, k, v = _inputs(dtype, generator, batch=1 if backend == "triton" and not GPU else 2)  # the interpreter: small
    block_mask = _block_masks(mask_fn, mask_bufs, q.shape[0], "attnkit")
    bufs_for = {torch.float64: score_bufs, dtype: [b.detach().to(dtype).requires_grad_(b.requires_grad)
                                                   if b.is_floating_point() else b for b in score_bufs]}
    # the call's own tensors, on its device: leaves, as a user's would be
    call_q, call_k, call_v = (x.detach().to(device).requires_grad_() for x in (q, k, v))
    call_bufs = [b.detach().to(device).requires_grad_(b.requires_grad) for b in score_bufs]

    out, lse = attnkit.flex_attention(call_q, call_k, call_v, score_mod=_bind(score_fn, call_bufs),
                                      block_mask=block_mask, enable_gqa=True, return_lse=True, backend=backend)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.device.type == device
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    differentiable = [call_q, call_k, call_v] + [b for b in call_bufs if b.requires_grad]
    grads = torch.autograd.grad(out, differentiable, grad_out.to(device=device, dtype=dtype))
    out, lse = out.cpu(), lse.cpu()

    results = {}
    for run_dtype in (torch.float64, dtype):
        tq, tk, tv = (x.detach().to(run_dtype).requires_grad_() for x in (q, k, v))
        bufs = bufs_for[run_dtype]
        t_out, t_lse = _torch_flex(tq, tk, tv, score_fn, bufs, block_mask)  # its mask_mod holds its buffers
        t_grads = torch.autograd.grad(t_out, [tq, tk, tv] + [b for b in bufs if b.requires_grad], grad_out.to(run_dtype))
        results[run_dtype] = (t_out, t_lse, t_grads)
    exact, plain = results[torch.float64], results[dtype]
    assert_within_rule(f"{name} out", out, exact[0], plain[0], 2)
    hidden = torch.isinf(exact[1])
    assert torch.equal(torch.isinf(lse), hidden), "lse is -inf exactly on the rows that see no key"
    assert_within_rule(f"{name} lse", lse[~hidden], exact[1][~hidden], plain[1][~hidden], 2)
    for label, got, want, base in zip(["dq", "dk", "dv", "dbuffer"], grads, exact[2], plain[2]):
        assert_within_rule(f"{name} {label}", got, want, base, 3)
    if name == "hidden_rows":
        assert hidden.any() and not torch.isnan(out).any()
        assert torch.all(out.float()[hidden] == 0) and torch.all(grads[0].cpu().float()[hidden] == 0)


@pytest.mark.parametrize("lengths", [(NQ, NK), (48, 64)], ids=["odd", "whole_blocks"])
@pytest.mark.parametrize("maker", ["attnkit", "torch"])
def test_block_masks_from_either_maker_give_the_same_result(maker, lengths):
    nq, nk = lengths
    generator = torch.Generator().manual_seed(5)
    _, _, mask_fn, mask_bufs = _case("prefix_lm", generator, nq, nk)
    q, k, v = _inputs(torch.float64, generator, nq, nk)
    block_mask = _block_masks(mask_fn, mask_bufs, q.shape[0], maker, nq, nk)
    kinds = block_mask.to_dense()  # (B, 1, query blocks, key blocks): 1 where visited
    assert kinds.any() and not kinds.all(), "the case has empty blocks as well as visited ones"
    # torch's counts the padding past the lengths as hidden: its tail blocks are never full.
    assert block_mask.kv_num_blocks.sum() > 0 and (block_mask.full_kv_num_blocks.sum() > 0 or maker == "torch")
    out = attnkit.flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    dense = _bind(mask_fn, mask_bufs)(0, 0, torch.arange(nq)[:, None], torch.arange(nk)[None, :])
    expected = reference.attention(q.detach().numpy(), k.detach().numpy(), v.detach().numpy(), mask=dense.numpy())
    assert_close(out, expected, atol=1e-12, rtol=1e-10, name=f"prefix-LM mask from {maker}'s create_block_mask")


def test_create_block_mask_matches_torch_block_for_block():
    """On whole blocks; past the lengths torch counts padding as hidden, attnkit ignores it (its tail
    blocks may be full), and both lists are valid for either kernel (tested above)."""
    generator = torch.Generator().manual_seed(6)
    for name in ("document", "prefix_lm", "window_and_sinks", "hidden_rows"):
        _, _, mask_fn, mask_bufs = _case(name, generator, 40, 64)
        mask = _bind(mask_fn, mask_bufs)
        ours = attnkit.create_block_mask(mask, 2, 3, 40, 64, BLOCK_SIZE=(8, 16))
        theirs = torch_create_block_mask(mask, 2, 3, 40, 64, device="cpu", BLOCK_SIZE=(8, 16))
        for field in ("kv_num_blocks", "full_kv_num_blocks"):
            assert torch.equal(getattr(ours, field), getattr(theirs, field)), f"{name}: {field}"
        for count, field in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
            n = getattr(ours, count)
            for index in np.ndindex(*n.shape):
                used = int(n[index])
                assert torch.equal(getattr(ours, field)[index][:used], getattr(theirs, field)[index][:used]), name


@pytest.mark.parametrize("features", ["alibi+window", "softcap+causal_bottom_right"])
def test_built_in_features_written_as_flex_functions_match_the_reference(features):
    """The equivalences the README documents: a built-in option and its score_mod / mask_mod, two at
    a time (a score_mod with a mask_mod: one compiled kernel for both)."""
    rng = np.random.default_rng(7)
    q = rng.standard_normal((1, HQ, NQ, D))
    k, v = rng.standard_normal((2, 1, HKV, NK, D))
    if features == "alibi+window":
        slopes = rng.random(HQ)
        slopes_t = torch.from_numpy(slopes)
        score_mod = lambda s, b, h, qi, kv: s - slopes_t[h] * torch.abs(qi + (NK - NQ) - kv)  # noqa: E731
        # align="bottom_right" moves the window with the ALiBi diagonal: position qi + Nk - Nq
        mask_mod = lambda b, h, qi, kv: (qi + (NK - NQ) - kv <= 5) & (kv - qi - (NK - NQ) <= 2)  # noqa: E731
        options = {"alibi_slopes": slopes, "align": "bottom_right", "window": (5, 2)}
    else:
        score_mod = lambda s, b, h, qi, kv: 2.0 * torch.tanh(s / 2.0)  # noqa: E731
        mask_mod = lambda b, h, qi, kv: kv <= qi + (NK - NQ)  # noqa: E731
        options = {"softcap": 2.0, "causal": "bottom_right"}
    block_mask = attnkit.create_block_mask(mask_mod, None, None, NQ, NK, BLOCK_SIZE=BLOCK)
    tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
    out, lse = attnkit.flex_attention(tq, tk, tv, score_mod=score_mod, block_mask=block_mask, enable_gqa=True,
                                      return_lse=True)
    expected, expected_lse = reference.attention(q, k, v, return_lse=True, **options)
    assert_close(out, expected, atol=1e-12, rtol=1e-10, name=f"{features} out")
    assert_close(lse, expected_lse, atol=1e-5, rtol=1e-6, name=f"{features} lse")
    d_out = rng.standard_normal(expected.shape)
    grads = torch.autograd.grad(out, (tq, tk, tv), torch.from_numpy(d_out))
    expected_grads = reference.attention_backward(q, k, v, expected, d_out, expected_lse, **options)
    for label, got, want in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert_close(got, want, atol=1e-11, rtol=1e-9, name=f"{features} {label}")


def test_numpy_arrays_run_the_same_kernel():
    rng = np.random.default_rng(8)
    q = rng.standard_normal((1, 2, 40, D)).astype(np.float32)
    k, v = rng.standard_normal((2, 1, 2, 33, D)).astype(np.float32)
    block_mask = attnkit.create_block_mask(lambda b, h, qi, kv: qi >= kv, None, None, 40, 33, BLOCK_SIZE=BLOCK)
    out, lse = attnkit.flex_attention(q, k, v, score_mod=lambda s, b, h, qi, kv: s * 2, block_mask=block_mask,
                                      return_lse=True)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and lse.dtype == np.float32
    expected = reference.attention(q.astype(np.float64), k, v, causal=True, scale=2 / np.sqrt(D))
    assert_close(out, expected, atol=2e-6, rtol=2e-5, name="numpy flex")


def test_lse_gradient_flows():
    """A loss on the returned lse reaches q and k (d lse / d score = P). The lse is float32, so its
    gradient is too: 0.25 keeps the comparison exact."""
    generator = torch.Generator().manual_seed(9)
    q, k, v = _inputs(torch.float64, generator, hq=2, hkv=2)
    out, lse = attnkit.flex_attention(q, k, v, return_lse=True)
    grads = torch.autograd.grad((out.sum() + (lse * 0.25).sum()), (q, k, v))
    qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
    scores = qq @ kk.transpose(-1, -2) * D**-0.5
    expected = torch.autograd.grad((torch.softmax(scores, -1) @ vv).sum() + (torch.logsumexp(scores, -1) * 0.25).sum(),
                                   (qq, kk, vv))
    for label, got, want in zip(("dq", "dk", "dv"), grads, expected):
        assert_close(got, want, atol=1e-11, rtol=1e-9, name=label)


def test_combinators_and_or():
    def causal(b, h, q, kv):
        return q >= kv

    def near(b, h, q, kv):
        return torch.abs(q - kv) <= 3

    qs, ks = torch.arange(NQ)[:, None], torch.arange(NK)[None, :]
    for combined, expected in ((and_masks(causal, near), (qs >= ks) & ((qs - ks).abs() <= 3)),
                               (or_masks(causal, near), (qs >= ks) | ((qs - ks).abs() <= 3))):
        block_mask = attnkit.create_block_mask(combined, None, None, NQ, NK, BLOCK_SIZE=BLOCK)
        assert torch.equal(block_mask.to_dense()[0, 0].bool(),
                           torch_create_block_mask(combined, None, None, NQ, NK, device="cpu",
                                                   BLOCK_SIZE=BLOCK).to_dense()[0, 0].bool())
        rng = np.random.default_rng(10)
        q, k, v = rng.standard_normal((1, 1, NQ, D)), rng.standard_normal((1, 1, NK, D)), rng.standard_normal((1, 1, NK, D))
        out = attnkit.flex_attention(q, k, v, block_mask=block_mask)
        assert_close(out, reference.attention(q, k, v, mask=expected.numpy()), atol=1e-12, rtol=1e-10, name="combined")


def test_new_captured_values_reuse_the_compiled_kernel():
    from attnkit.flex import _plan

    q = torch.randn(1, 2, 20, D)
    made = []
    for _ in range(2):
        table = torch.randn(2, 64)
        made.append(_plan(q, q, lambda s, b, h, qi, kv: s + table[h, qi - kv + 30], None, None))
    assert made[0].module is made[1].module, "the same function structure shares one compiled module"
    assert not np.array_equal(made[0].score_caps[0], made[1].score_caps[0])
    assert generated_source(lambda s, b, h, qi, kv: s * 2) == generated_source(lambda s, b, h, qi, kv: s * 2)


def test_generated_source_shows_the_kernel_code():
    source = generated_source(lambda s, b, h, qi, kv: torch.where(qi >= kv, s, -float("inf")))
    assert "def score_mod(score, b, h, q_idx, kv_idx, caps):" in source
    assert "(score if " in source and "-np.inf" in source and "def score_mod_vjp" in source


def test_bad_input_is_named():
    q = torch.randn(1, 4, 8, D)
    kv = torch.randn(1, 2, 8, D)
    with pytest.raises(ValueError, match="enable_gqa"):
        attnkit.flex_attention(q, kv, kv)
    with pytest.raises(ValueError, match="4-D"):
        attnkit.flex_attention(q[0], kv[0], kv[0])
    with pytest.raises(TypeError, match="share one dtype"):
        attnkit.flex_attention(q, kv.double(), kv.double(), enable_gqa=True)
    with pytest.raises(ValueError, match="Q_LEN, KV_LEN"):
        mask = attnkit.create_block_mask(lambda b, h, qi, k: qi >= k, None, None, 9, 8)
        attnkit.flex_attention(q, kv, kv, block_mask=mask, enable_gqa=True)
    with pytest.raises(TypeError, match="block_mask must be a BlockMask"):
        attnkit.flex_attention(q, kv, kv, block_mask="causal", enable_gqa=True)
    with pytest.raises(UntraceableError, match="nonzero|could not be traced|cannot compile"):
        attnkit.flex_attention(q, kv, kv, score_mod=lambda s, b, h, qi, k: s + torch.nonzero(qi).sum(),
                               enable_gqa=True)
    with pytest.raises(UntraceableError, match="could not be traced"):
        attnkit.flex_attention(q, kv, kv, score_mod=lambda s, b, h, qi, k: s if int(qi) > 3 else s * 2,
                               enable_gqa=True)
    with pytest.raises(TypeError, match="score_mod must be callable"):
        attnkit.flex_attention(q, kv, kv, score_mod=3, enable_gqa=True)
    with pytest.raises(ValueError, match="scale"):
        attnkit.flex_attention(q, kv, kv, scale=float("nan"), enable_gqa=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=lambda d: str(d)[6:])
def test_key_blocks_starting_at_odd_keys(dtype):
    """Key blocks of 9: bf16 products read keys in pairs from an even key, the key before the block
    hidden from every row; float32 and float64 start where the block does. Against torch's flex."""
    generator = torch.Generator().manual_seed(5)
    q, k, v = _inputs(dtype, generator)
    block_mask = attnkit.create_block_mask(lambda b, h, qi, kv: (qi - kv) % 3 != 1, None, None, NQ, NK,
                                           BLOCK_SIZE=(16, 9))
    out = attnkit.flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(dtype))
    results = []
    for run_dtype in (torch.float64, dtype):
        tq, tk, tv = (x.detach().to(run_dtype).requires_grad_() for x in (q, k, v))
        t_out, _ = _torch_flex(tq, tk, tv, None, [], block_mask)
        results.append((t_out, *torch.autograd.grad(t_out, (tq, tk, tv), grad_out.to(run_dtype))))
    exact, plain = results
    assert_within_rule("out", out, exact[0], plain[0], 2)
    for label, got, want, base in zip(("dq", "dk", "dv"), grads, exact[1:], plain[1:]):
        assert_within_rule(label, got, want, base, 3)


@pytest.mark.parametrize("scale", [0.4, -0.4], ids=["positive_scale", "negative_scale"])
def test_identity_score_mod_scales_inside_exp2(scale):
    """With no score_mod the kernels keep raw q.k products and scale them inside exp2 (the forward
    only for a positive scale: max commutes with it); both signs against the reference."""
    from attnkit.reference import attention, attention_backward

    rng = np.random.default_rng(3)
    q, k, v, d_out = (rng.standard_normal((2, HQ, n, D)) for n in (NQ, NK, NK, NQ))
    k, v = k[:, :HKV], v[:, :HKV]
    mask = lambda b, h, qi, kv: (qi >= kv) & (kv != 5)  # noqa: E731
    block_mask = attnkit.create_block_mask(mask, None, None, NQ, NK, BLOCK_SIZE=BLOCK)
    tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
    out = attnkit.flex_attention(tq, tk, tv, block_mask=block_mask, scale=scale, enable_gqa=True)
    grads = torch.autograd.grad(out, (tq, tk, tv), torch.from_numpy(d_out))
    visible = (np.arange(NQ)[:, None] >= np.arange(NK)[None, :]) & (np.arange(NK) != 5)[None, :]
    group = HQ // HKV
    k_full, v_full = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    want, lse = attention(q, k_full, v_full, mask=visible, scale=scale, return_lse=True)
    want_grads = attention_backward(q, k_full, v_full, want, d_out, lse, mask=visible, scale=scale)
    assert_close(out, torch.from_numpy(want), atol=1e-10, rtol=1e-10, name="out")
    assert_close(grads[0], torch.from_numpy(want_grads[0]), atol=1e-10, rtol=1e-10, name="dq")
    for label, got, want_full in zip(("dk", "dv"), grads[1:], want_grads[1:]):
        summed = want_full.reshape(2, HKV, group, NK, D).sum(axis=2)
        assert_close(got, torch.from_numpy(summed), atol=1e-10, rtol=1e-10, name=label)


def test_a_number_minus_a_tensor_is_traced():
    """`1 - kv_idx` and `0.5 - score` reach torch as rsub (number - tensor): both directions, against torch."""
    generator = torch.Generator().manual_seed(9)
    q, k, v = (x.detach() for x in _inputs(torch.float64, generator))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    k, v = (x.repeat_interleave(HQ // HKV, dim=1).detach().requires_grad_() for x in (k, v))

    def score_mod(score, b, h, q_idx, kv_idx):
        return 0.5 - score * 0.25 + (1 - kv_idx) * score * 0.01  # (an int times a Python float would be float32 in torch)

    block_mask = attnkit.create_block_mask(lambda b, h, qi, kv: kv >= 0 - qi + 3, None, None, NQ, NK, BLOCK_SIZE=BLOCK)
    out = attnkit.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)
    want, _ = _torch_flex(q, k, v, score_mod, [], block_mask)
    assert_close(out, want, atol=1e-10, rtol=1e-10, name="out")
    for label, got, expected in zip("qkv", torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(want.sum(), (q, k, v))):
        assert_close(got, expected, atol=1e-10, rtol=1e-10, name=f"d{label}")


def test_one_worker_and_two_give_the_same_result(monkeypatch):
    """The workers share a queue; which thread takes a task must not change what it computes."""
    from attnkit.kernels.cpu import flex_build

    generator = torch.Generator().manual_seed(11)
    score_fn, score_bufs, mask_fn, mask_bufs = _case("relative_bias", generator)
    q, k, v = _inputs(torch.float32, generator)
    results = []
    for workers in (1, 2):
        monkeypatch.setattr(flex_build, "worker_count", lambda: workers)
        out = attnkit.flex_attention(q, k, v, score_mod=_bind(score_fn, score_bufs), enable_gqa=True)
        results.append((out, *torch.autograd.grad(out.sum(), (q, k, v, score_bufs[0]))))
    for label, one, two in zip(("out", "dq", "dk", "dv"), results[0], results[1]):
        assert torch.equal(one, two), label
    assert_close(results[0][4], results[1][4], atol=1e-12, rtol=1e-12, name="dtable (summed per worker)")


def test_a_function_is_traced_again_when_what_it_reads_changes():
    """Traces are remembered per function; a new captured object or number means a new trace."""
    from attnkit.flex.trace import trace_score_mod

    offset, table = 3, torch.zeros(2, 8)

    def shifted(score, b, h, q_idx, kv_idx):
        return score + table[h, q_idx] + offset

    first = trace_score_mod(shifted)
    assert trace_score_mod(shifted) is first
    table = torch.ones(2, 8)  # noqa: F841: read by shifted
    second = trace_score_mod(shifted)
    assert second is not first and second.captures[0] is table
    offset = 5  # noqa: F841
    with pytest.warns(FlexRecompileWarning, match=r"offset = 5 \(was 3\)"):  # a new kernel to compile
        third = trace_score_mod(shifted)
    assert "+ 5)" in third.source and third is not second


def test_torch_compile_runs_it_as_a_graph_break(recwarn):
    table = torch.randn(2, 64)

    def relative(score, b, h, q_idx, kv_idx):
        return score + table[h, q_idx - kv_idx + 30]

    def layer(q, k, v):
        return attnkit.flex_attention(q * 2, k, v, score_mod=relative).sin()

    q = torch.randn(1, 2, 20, D, requires_grad=True)
    compiled = torch.compile(layer, backend="eager")
    out = compiled(q, q, q)
    expected = layer(q, q, q)
    assert_close(out, expected, atol=0, name="compiled")
    (grad,) = torch.autograd.grad(out.sum(), q)
    (expected_grad,) = torch.autograd.grad(expected.sum(), q)
    assert_close(grad, expected_grad, atol=0, name="compiled grad")
    assert not [w for w in recwarn if "Dynamo" in str(w.message) or "graph break" in str(w.message).lower()]


def test_captured_scalars_as_values_with_their_gradient():
    """A 0-d learnable temperature and a constant made inside the function, through where / pow / exp;
    against the same function on the dense score matrix under torch's autograd."""
    generator = torch.Generator().manual_seed(12)
    q, k, v = _inputs(torch.float64, generator, hq=2, hkv=2)
    temperature = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)

    def score_mod(s, b, h, q_idx, kv_idx):
        return torch.where(q_idx >= kv_idx, s**2 * 0.1 + torch.exp(-s) * temperature, s + torch.tensor(0.5) * h)

    out = attnkit.flex_attention(q, k, v, score_mod=score_mod)
    grads = torch.autograd.grad(out.sum(), (q, k, v, temperature))
    index = torch.meshgrid(*(torch.arange(n) for n in (q.shape[0], q.shape[1], NQ, NK)), indexing="ij")
    scores = score_mod(q @ k.transpose(-1, -2) * D**-0.5, *index)
    expected = torch.softmax(scores, -1) @ v
    assert_close(out, expected, atol=1e-12, rtol=1e-10, name="out")
    for label, got, want in zip(("dq", "dk", "dv", "dtemperature"), grads,
                                torch.autograd.grad(expected.sum(), (q, k, v, temperature))):
        assert_close(got, want, atol=1e-11, rtol=1e-9, name=label)


def test_triton_takes_torch_block_masks_and_captured_scalars():
    """The Triton kernel with torch's own BlockMask (batch and head axes), a 0-d learnable temperature,
    and a loss on the lse, against the CPU kernel on the same call."""
    if not _triton_ready():
        pytest.skip("triton cannot run here")
    device = "cuda" if GPU else "cpu"
    generator = torch.Generator().manual_seed(13)
    q, k, v = _inputs(torch.float32, generator, hq=4, hkv=1)
    temperature = torch.tensor(0.7, requires_grad=True)
    block_mask = torch_create_block_mask(lambda b, h, qi, kv: (qi + b + h) % 4 != 1, 2, 4, NQ, NK, device="cpu",
                                         BLOCK_SIZE=16)
    results = []
    for backend, where in (("numba", "cpu"), ("triton", device)):
        leaves = [x.detach().to(where).requires_grad_() for x in (q, k, v, temperature)]
        out, lse = attnkit.flex_attention(
            *leaves[:3], score_mod=lambda s, b, h, qi, kv, t=leaves[3]: s * t - (qi - kv).abs() * 0.1,
            block_mask=block_mask, enable_gqa=True, return_lse=True, backend=backend)
        loss = out.sum() + (lse * 0.25).sum()
        results.append([out, lse, *torch.autograd.grad(loss, leaves)])
    for label, a, b in zip(("out", "lse", "dq", "dk", "dv", "dtemperature"), *results):
        assert_close(b.cpu(), a, atol=2e-5, rtol=2e-5, name=f"triton {label}")


def test_triton_runs_blocks_larger_than_its_tiles_with_captures_on_the_call_device():
    """torch's default 128-blocks run as 64 x 64 tiles (two per block and axis), with document ids and
    a learnable bias table captured on the call's device (the GPU when there is one): forward and
    gradients, the table's included, against torch's eager flex in float64 by the 2x / 3x rule."""
    if not _triton_ready():
        pytest.skip("triton cannot run here")
    device = "cuda" if GPU else "cpu"
    generator = torch.Generator().manual_seed(14)
    nq, nk = 200, 300
    q, k, v = _inputs(torch.float64, generator, nq=nq, nk=nk, hq=4, hkv=2, batch=1)
    q_docs = torch.sort(torch.randint(0, 3, (nq,), generator=generator)).values
    kv_docs = torch.sort(torch.randint(0, 3, (nk,), generator=generator)).values
    table = torch.randn(4, nq + nk, generator=generator, dtype=torch.float64) * 0.5

    def block_mask_on(where):  # BLOCK_SIZE 128, torch's default
        docs_q, docs_kv = q_docs.to(where), kv_docs.to(where)
        return torch_create_block_mask(lambda b, h, qi, kv: (docs_q[qi] == docs_kv[kv]) | (kv < 5), None, None, nq,
                                       nk, device=where)

    block_mask = block_mask_on(device)
    assert block_mask.BLOCK_SIZE == (128, 128)
    leaves = [x.detach().float().to(device).requires_grad_() for x in (q, k, v, table)]
    out = attnkit.flex_attention(*leaves[:3], score_mod=lambda s, b, h, qi, kv, t=leaves[3]: s + t[h, qi - kv + nk],
                                 block_mask=block_mask, enable_gqa=True, backend="triton")
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, grad_out.to(device=device, dtype=torch.float32))
    results = {}
    for run_dtype in (torch.float64, torch.float32):  # the exact answer, and the plain one's error budget
        ref = [x.detach().to(run_dtype).requires_grad_() for x in (q, k, v, table)]
        ref_out, _ = _torch_flex(*ref[:3], lambda s, b, h, qi, kv, t: s + t[h, qi - kv + nk], ref[3:],
                                 block_mask_on("cpu"))
        results[run_dtype] = [ref_out, *torch.autograd.grad(ref_out, ref, grad_out.to(run_dtype))]
    for label, got, exact, plain in zip(("out", "dq", "dk", "dv", "dtable"), [out, *grads],
                                        results[torch.float64], results[torch.float32]):
        assert_within_rule(f"triton {label}", got.cpu(), exact, plain, 2 if label == "out" else 3)


def test_a_block_masks_lists_are_made_once_and_follow_in_place_changes():
    """A BlockMask's lists are converted once per mask and call shape (a CUDA call then copies
    nothing between host and device); a change to the mask's tensors in place reaches the next call."""
    from attnkit.flex import _block_lists

    generator = torch.Generator().manual_seed(15)
    q, k, v = (x.detach() for x in _inputs(torch.float64, generator, batch=1))
    mask = attnkit.create_block_mask(lambda b, h, qi, kv: qi + 16 >= kv, None, None, NQ, NK, BLOCK_SIZE=BLOCK)
    before = attnkit.flex_attention(q, k, v, block_mask=mask, enable_gqa=True)
    first = _block_lists(mask, 1, HQ, NQ, NK)
    assert _block_lists(mask, 1, HQ, NQ, NK) is first
    if _triton_ready():  # the Triton kernels' lists: made on the first call, reused by the next
        device = "cuda" if GPU else "cpu"
        for _ in range(2):
            attnkit.flex_attention(*(x.float().to(device) for x in (q, k, v)), block_mask=mask, enable_gqa=True,
                                   backend="triton")
        lists = _block_lists(mask, 1, HQ, NQ, NK)
        assert lists is first and list(lists.on_device) == [(str(torch.device(device)), False)]
    mask.kv_num_blocks[..., 0] = 0  # query block 0 now sees no key block
    mask.full_kv_num_blocks[..., 0] = 0
    assert _block_lists(mask, 1, HQ, NQ, NK) is not first
    after = attnkit.flex_attention(q, k, v, block_mask=mask, enable_gqa=True)
    assert torch.all(after[:, :, :BLOCK] == 0)
    assert_close(after[:, :, BLOCK:], before[:, :, BLOCK:], atol=0, rtol=0, name="rows of the other blocks")


def test_backend_choice_is_checked():
    q = torch.randn(1, 2, 8, D)
    with pytest.raises(ValueError, match="backend must be"):
        attnkit.flex_attention(q, q, q, backend="cuda")
    with pytest.raises(TypeError, match="torch tensors"):
        attnkit.flex_attention(q.numpy(), q.numpy(), q.numpy(), backend="triton")
    if _triton_ready():
        mask = attnkit.create_block_mask(lambda b, h, qi, k: qi >= k, None, None, 8, 8, BLOCK_SIZE=24)
        with pytest.raises(ValueError, match="powers of two"):
            attnkit.flex_attention(q, q, q, block_mask=mask, backend="triton")


def test_generated_triton_source_reads_captures_through_pointers():
    table = torch.zeros(2, 64)
    source = generated_source(lambda s, b, h, qi, kv: s + table[h, qi - kv + 30], backend="triton")
    assert "@triton.jit" in source and "tl.load(C0 + (h) * C0_s0" in source and "def score_mod_vjp" in source


def test_a_division_by_zero_in_a_score_mod_gives_inf_as_in_torch():
    """`score - (h + 1) / |q_idx - kv_idx|` is -inf on the diagonal in torch (a key hidden by division): the
    compiled score_mod divides as NumPy does (kernels/jit.py), where it used to raise
    ZeroDivisionError inside a worker and fail the call. Forward and gradients against torch."""
    generator = torch.Generator().manual_seed(11)
    q, k, v = (x.detach() for x in _inputs(torch.float64, generator))
    k, v = (x.repeat_interleave(HQ // HKV, dim=1) for x in (k, v))
    q, k, v = (x.requires_grad_() for x in (q, k, v))

    def score_mod(score, b, h, q_idx, kv_idx):
        return score - (h + 1) / torch.abs(q_idx - kv_idx)

    block_mask = attnkit.create_block_mask(lambda b, h, qi, kv: kv >= 0, None, None, NQ, NK, BLOCK_SIZE=BLOCK)
    out = attnkit.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)
    want, _ = _torch_flex(q, k, v, score_mod, [], block_mask)
    assert torch.isfinite(out).all()
    # torch divides the two int tensors in float32 (its default dtype), the kernel in float64
    assert_close(out, want, atol=1e-6, rtol=1e-6, name="out")
    for label, got, expected in zip("qkv", torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(want.sum(), (q, k, v))):
        assert_close(got, expected, atol=1e-6, rtol=1e-6, name=f"d{label}")


def test_an_integer_division_by_zero_raises_as_in_torch():
    """torch raises on `//` or `%` by an integer zero; so do the compiled functions, in a mask_mod
    (create_block_mask) and in a score_mod, naming what divided (floats give inf: the test above)."""
    q, k, v = (x.detach() for x in _inputs(torch.float32, torch.Generator().manual_seed(12)))
    with pytest.raises(ZeroDivisionError, match="score_mod or mask_mod"):
        attnkit.create_block_mask(lambda b, h, qi, kv: qi % (kv - 5) != 1, None, None, NQ, NK, BLOCK_SIZE=BLOCK)
    with pytest.raises(ZeroDivisionError, match="score_mod or mask_mod"):
        attnkit.flex_attention(q, k, v, score_mod=lambda s, b, h, qi, kv: s + qi // (kv - 5), enable_gqa=True)


FLEX_IN_THREADS_AND_A_FORKED_CHILD = """
    import os, signal, sys, threading, time, numpy as np, torch, numba, attnkit
    torch.manual_seed(0)
    n, docs = 200, torch.cumsum((torch.rand(200) < 0.02).long(), 0)
    block_mask = attnkit.create_block_mask(lambda b, h, qi, kv: docs[qi] == docs[kv], None, None, n, n, BLOCK_SIZE=32)
    inputs = [[torch.randn(1, 4, n, 16, dtype=torch.float64) for _ in range(3)] for _ in range(6)]
    def dense(q, k, v):
        visible = docs[:, None] == docs[None, :]
        return torch.softmax((q @ k.transpose(-1, -2) / 4).masked_fill(~visible, -torch.inf), -1) @ v
    expected = [dense(*x) for x in inputs]  # before the fork: torch's own OpenMP cannot run in the child either
    def error(i):
        return (attnkit.flex_attention(*inputs[i], block_mask=block_mask) - expected[i]).abs().max().item()
    errors = [None] * 6
    threads = [threading.Thread(target=lambda i=i: errors.__setitem__(i, error(i))) for i in range(6)]
    [t.start() for t in threads]; [t.join() for t in threads]
    print("threads", max(errors) < 1e-12, "layer", numba.threading_layer())
    # A thread that ran MKL (float64 products here, torch's matmul alike) frees its MKL buffers as it
    # exits, after join() has returned: a child forked in that window finds MKL's allocator locked and
    # hangs (torch alone, six threads of float64 matmuls then a fork: 7 of 60 children). Fork once the
    # threads are gone.
    for t in threads:
        while os.path.exists(f"/proc/self/task/{t.native_id}"):
            time.sleep(0.001)
    pid = os.fork()
    if pid == 0:  # the parent's OpenMP threads cannot serve a child: one thread here
        signal.alarm(120)
        os._exit(0 if error(0) < 1e-12 else 3)
    _, status = os.waitpid(pid, 0)
    print("child", os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no fork on this platform")
@pytest.mark.parametrize("layer", ["workqueue", "omp"])
def test_flex_calls_from_threads_and_from_a_forked_child(layer):
    """flex's workers run over Numba's threads: calls from several Python threads at once (the workqueue
    layer aborts the process on two parallel regions at once, so they take turns), then a call in a child
    forked after the parent's threads started (GNU OpenMP cannot run there), against dense attention."""
    import os
    import subprocess
    import sys
    import textwrap

    result = subprocess.run([sys.executable, "-c", textwrap.dedent(FLEX_IN_THREADS_AND_A_FORKED_CHILD)],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "NUMBA_THREADING_LAYER": layer, "ATTNKIT_WHILE_COMPILING": "wait"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"threads True layer {layer}" in result.stdout and "child 0" in result.stdout, result.stdout + result.stderr[-3000:]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_the_forward_reads_nothing_stale_from_the_workspace_it_packs_into(dtype):
    """flex's forward packs K and V into the kept workspace (kernels/cpu/memory.py): memory that held
    another call's operands. Filled with NaN bit patterns first, odd sizes (bf16's key pairs and the
    rows' padding), the output still matches dense attention and the same call on clean memory."""
    from attnkit.kernels.cpu.memory import WORKSPACE

    generator = torch.Generator().manual_seed(21)
    n_q, n_k, d = 75, 131, 40
    docs = torch.sort(torch.randint(0, 3, (n_k,), generator=generator)).values
    block_mask = attnkit.create_block_mask(lambda b, h, qi, kv: docs[qi] >= docs[kv], None, None, n_q, n_k,
                                           BLOCK_SIZE=BLOCK)
    q, k, v = (torch.randn(2, 4, n, d, generator=generator).to(dtype) for n in (n_q, n_k, n_k))
    clean = attnkit.flex_attention(q, k, v, block_mask=block_mask)
    WORKSPACE.buffer[:] = 0xFF  # NaN in float32 and in bf16, wherever the last call's operands were
    poisoned = attnkit.flex_attention(q, k, v, block_mask=block_mask)
    visible = docs[:n_q, None] >= docs[None, :]
    scores = (q.double() @ k.double().transpose(-1, -2)) / d**0.5
    want = torch.softmax(scores.masked_fill(~visible, -torch.inf), -1) @ v.double()
    assert torch.equal(poisoned, clean)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert_close(poisoned.double(), want, atol=tolerance, rtol=tolerance, name="out")


def test_python_numbers_that_change_are_named_once():
    """A Python number a score_mod reads is a constant of its generated code: a new value is a new
    kernel to compile (seconds each; an annealed temperature would compile on every step). The
    first change warns, naming the number and pointing at the caller; a 0-d tensor keeps one
    source for every value. (generated_source traces without compiling.)"""

    def scaled_by(temp):
        return lambda score, b, h, q_idx, kv_idx: score / temp

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = generated_source(scaled_by(1.5))
        assert generated_source(scaled_by(1.5)) == first  # the same value: the same code, no warning
    with pytest.warns(FlexRecompileWarning, match=r"temp = 2\.5 \(was 1\.5\).*as a 0-d tensor") as record:
        second = generated_source(scaled_by(2.5))
    assert second != first and len(record) == 1 and record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generated_source(scaled_by(3.5))  # once per function

        temperature = torch.tensor(1.5)

        def by_tensor(score, b, h, q_idx, kv_idx):
            return score / temperature

        before = generated_source(by_tensor)
        temperature = torch.tensor(2.5)  # a new tensor object: traced again, the same source
        assert generated_source(by_tensor) == before
