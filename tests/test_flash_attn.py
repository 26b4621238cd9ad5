"""attnkit.flash_attn and attnkit.varlen_attention against the reference, sequence by sequence.

Accuracy rule (flash-attn's): against the float64 reference on the same inputs,
the kernel's error may be at most 2x (forward) or 3x (gradients) the error of
the reference run in the inputs' own precision, plus a tiny floor. The sweep
follows flash-attn's own tests: seqlens 1, 113 x 203, 1023 x 1024, Nq > Nk,
head dims 32-256, GQA/MQA, causal, local windows, softcap, ALiBi, empty
sequences; caches contiguous and paged with shuffled block tables, appends at
different cache_seqlens (0 included), rotary both ways.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

import attnkit
from attnkit.flash_attn import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)
from attnkit.reference.varlen import varlen_attention as reference, varlen_attention_backward as reference_backward
from attnkit.testing import assert_within_rule, max_error
from random_calls import rotated

# (lengths_q, lengths_k, Hq, Hkv, D, causal, window, softcap, alibi)
CASES = [
    ([1], [1], 4, 4, 32, False, None, None, False),
    ([113, 7, 64], [203, 7, 100], 4, 2, 64, True, None, None, False),
    ([203, 1, 50], [113, 5, 50], 4, 1, 80, True, None, None, False),  # Nq > Nk: early rows see nothing
    ([1023], [1024], 2, 2, 128, False, (256, 0), None, False),
    ([300, 200], [300, 250], 2, 1, 256, False, (64, 32), 30.0, False),  # local, not causal
    ([129, 64], [129, 128], 4, 2, 96, True, None, None, True),  # ALiBi (B, H)
    ([0, 17, 33], [5, 0, 33], 2, 2, 59, True, (8, None), 5.0, True),  # empty sequences, odd D
]


def case_id(case):
    lq, lk, hq, hkv, d, causal, window, softcap, alibi = case
    parts = ["N" + "_".join(f"{a}x{b}" for a, b in zip(lq, lk)), f"H{hq}kv{hkv}", f"D{d}"]
    parts += ["causal"] * causal + ([f"window{window[0]}_{window[1]}"] if window else [])
    parts += ["softcap"] * bool(softcap) + ["alibi"] * alibi
    return "-".join(parts)


def offsets(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def make_case(case, seed):
    lq, lk, hq, hkv, d, causal, window, softcap, alibi = case
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((hq, sum(lq), d))
    k, v = (rng.standard_normal((hkv, sum(lk), d)) for _ in range(2))
    slopes = rng.uniform(0.01, 0.5, (len(lq), hq)) if alibi else None
    options = dict(causal=causal, window=window, softcap=softcap, alibi_slopes=slopes)
    return q, k, v, offsets(lq), offsets(lk), options


def budget(actual, expected, plain, factor):
    """flash-attn's rule (attnkit.testing.assert_within_rule) on a result named by the calling test."""
    assert_within_rule("result", actual, expected, plain, factor)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_varlen_forward_and_gradients(case):
    q, k, v, cu_q, cu_k, options = make_case(case, seed=len(case_id(case)))
    d_out = np.random.default_rng(1).standard_normal((q.shape[0], q.shape[1], v.shape[2]))
    out64, lse64 = reference(q, k, v, cu_q, cu_k, **options, return_lse=True)
    grads64 = reference_backward(q, k, v, out64, d_out, lse64, cu_q, cu_k, **options)
    q32, k32, v32 = (x.astype(np.float32) for x in (q, k, v))
    out_plain, lse_plain = reference(q32, k32, v32, cu_q, cu_k, **options, return_lse=True)
    grads_plain = reference_backward(q32, k32, v32, out_plain, d_out.astype(np.float32), lse_plain, cu_q, cu_k,
                                     **options)

    qt, kt, vt = (torch.from_numpy(x).requires_grad_() for x in (q32, k32, v32))
    slopes = None if options["alibi_slopes"] is None else torch.from_numpy(options["alibi_slopes"])
    out, lse = attnkit.varlen_attention(
        qt, kt, vt, torch.from_numpy(cu_q), torch.from_numpy(cu_k), **{**options, "alibi_slopes": slopes},
        return_lse=True,
    )  # fmt: skip
    out.backward(torch.from_numpy(d_out.astype(np.float32)))
    budget(out.detach(), out64, out_plain, 2)
    assert np.array_equal(np.isinf(lse.numpy()), np.isinf(lse64)), "rows that see no key must get lse -inf"
    budget(np.where(np.isinf(lse64), 0, lse.numpy()), np.where(np.isinf(lse64), 0, lse64),
           np.where(np.isinf(lse64), 0, lse_plain), 2)
    for name, grad, expected, plain in zip("qkv", (qt.grad, kt.grad, vt.grad), grads64, grads_plain):
        budget(grad, expected, plain, 3)


def test_float64_is_exact():
    q, k, v, cu_q, cu_k, options = make_case(CASES[1], seed=3)
    out, lse = attnkit.varlen_attention(q, k, v, cu_q, cu_k, **options, return_lse=True)
    expected, expected_lse = reference(q, k, v, cu_q, cu_k, **options, return_lse=True)
    assert max_error(out, expected) < 1e-12 and max_error(lse, expected_lse) < 1e-12


@pytest.mark.skipif(attnkit.backends.cpu_product_path("bfloat16")[0] != "bf16", reason="no bf16 products here")
def test_varlen_bf16_within_the_rule():
    q, k, v, cu_q, cu_k, options = make_case(CASES[5], seed=5)
    as_bf16 = [torch.from_numpy(x).bfloat16() for x in (q, k, v)]
    rounded = [x.double().numpy() for x in as_bf16]
    out64 = reference(*rounded, cu_q, cu_k, **options)
    plain = reference(*(x.astype(np.float32) for x in rounded), cu_q, cu_k, **options)
    plain = torch.from_numpy(plain).bfloat16().double().numpy()  # a plain kernel stores bf16
    slopes = torch.from_numpy(options["alibi_slopes"])
    out = attnkit.varlen_attention(*as_bf16, cu_q, cu_k, **{**options, "alibi_slopes": slopes})
    assert out.dtype == torch.bfloat16
    budget(out.double(), out64, plain, 2)


def test_sequences_do_not_see_each_other():
    """Changing one sequence's keys changes its own rows only."""
    q, k, v, cu_q, cu_k, options = make_case(CASES[1], seed=7)
    base = attnkit.varlen_attention(q, k, v, cu_q, cu_k, causal=True)
    k2 = k.copy()
    k2[:, cu_k[1] : cu_k[2]] = np.random.default_rng(8).standard_normal(k2[:, cu_k[1] : cu_k[2]].shape)
    changed = attnkit.varlen_attention(q, k2, v, cu_q, cu_k, causal=True)
    rows = np.zeros(q.shape[1], bool)
    rows[cu_q[1] : cu_q[2]] = True
    assert np.array_equal(base[:, ~rows], changed[:, ~rows])
    assert not np.allclose(base[:, rows], changed[:, rows])


# ---------------------------------------------------------------------------
# flash-attn's layouts and the packed variants
# ---------------------------------------------------------------------------


def as_heads_first(x):
    """(total, H, D) torch -> (H, total, D) float64 numpy."""
    return x.detach().double().transpose(0, 1).numpy()


def test_func_and_packed_variants_match_varlen_reference():
    torch.manual_seed(0)
    batch, nq, nk, hq, hkv, d = 3, 37, 50, 4, 2, 32
    q = torch.randn(batch, nq, hq, d)
    k, v = torch.randn(batch, nk, hkv, d), torch.randn(batch, nk, hkv, d)
    slopes = torch.rand(hq) * 0.3
    kw = dict(causal=True, window_size=(20, -1), softcap=10.0, alibi_slopes=slopes)
    out, lse, probs = flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    assert out.shape == (batch, nq, hq, d) and lse.shape == (batch, hq, nq) and probs is None
    expected, expected_lse = reference(
        as_heads_first(q.reshape(-1, hq, d)), as_heads_first(k.reshape(-1, hkv, d)),
        as_heads_first(v.reshape(-1, hkv, d)), offsets([nq] * batch), offsets([nk] * batch),
        causal=True, window=(20, None), softcap=10.0, alibi_slopes=slopes.double().numpy(), return_lse=True,
    )  # fmt: skip
    assert max_error(as_heads_first(out.reshape(-1, hq, d)), expected) < 1e-5
    assert max_error(lse.transpose(0, 1).reshape(hq, -1), expected_lse) < 1e-5

    kv = torch.stack([k, v], dim=2)
    assert torch.equal(flash_attn_kvpacked_func(q, kv, **kw), flash_attn_func(q, k, v, **kw))
    qkv = torch.stack([q, q, q], dim=2)
    assert torch.equal(flash_attn_qkvpacked_func(qkv, causal=True), flash_attn_func(q, q, q, causal=True))

    lengths = [5, 40, 1]
    cu = torch.from_numpy(offsets(lengths))
    packed = torch.randn(sum(lengths), 3, hq, d)
    varlen = flash_attn_varlen_func(*packed.unbind(1), cu, cu, 40, 40, causal=True)
    assert torch.equal(flash_attn_varlen_qkvpacked_func(packed, cu, 40, causal=True), varlen)
    assert torch.equal(flash_attn_varlen_kvpacked_func(packed[:, 0], packed[:, 1:], cu, cu, 40, 40, causal=True),
                       varlen)


def test_varlen_func_gradients_flow():
    torch.manual_seed(1)
    lengths_q, lengths_k = [3, 20], [7, 20]
    q = torch.randn(sum(lengths_q), 4, 16, requires_grad=True)
    k = torch.randn(sum(lengths_k), 2, 16, requires_grad=True)
    v = torch.randn(sum(lengths_k), 2, 16, requires_grad=True)
    cu_q, cu_k = (torch.from_numpy(offsets(x)) for x in (lengths_q, lengths_k))
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 20, 20, causal=True)
    d_out = torch.randn_like(out)
    out.backward(d_out)
    q64, k64, v64 = (as_heads_first(x) for x in (q, k, v))
    out64, lse64 = reference(q64, k64, v64, offsets(lengths_q), offsets(lengths_k), causal=True, return_lse=True)
    grads = reference_backward(q64, k64, v64, out64, as_heads_first(d_out), lse64, offsets(lengths_q),
                               offsets(lengths_k), causal=True)
    for grad, expected in zip((q.grad, k.grad, v.grad), grads):
        assert max_error(as_heads_first(grad), expected) < 1e-5


@pytest.mark.filterwarnings("error")  # dropout runs in the kernel: no fall-back warning
def test_dropout_runs_in_the_kernel():
    q = torch.randn(2, 9, 2, 16)
    out = flash_attn_func(q, q, q, dropout_p=0.0 + 1e-9, causal=True)
    assert out.shape == q.shape and torch.isfinite(out).all()
    dropped = flash_attn_func(q, q, q, dropout_p=1.0)
    assert torch.equal(dropped, torch.zeros_like(dropped))


# ---------------------------------------------------------------------------
# The KV cache
# ---------------------------------------------------------------------------


KV_CASES = [
    # (page size or None, Nq, N_new, causal, window, rotary, interleaved, leftpad, batch_idx)
    (None, 1, 1, True, None, False, False, False, False),
    (None, 3, 3, True, None, True, True, False, True),
    (None, 4, 2, False, None, True, False, True, False),  # rotary at one position for q (not causal)
    (None, 2, 0, True, (5, 0), False, False, True, True),  # no append; local
    (16, 1, 1, True, None, True, False, False, False),  # vLLM's page size
    (3, 5, 5, True, (7, 2), False, False, False, False),  # a page size that divides nothing
    (1, 1, 1, False, None, False, False, False, False),
    # One query against a contiguous cache: the decode kernel reads the cache in place (a mask of
    # each sequence's keys), with a left pad and a window, rotary, no append, an empty sequence.
    (None, 1, 0, True, (5, 0), False, False, True, False),
    (None, 1, 1, False, (3, 2), True, False, False, False),
    (None, 1, 0, False, None, False, False, False, False),
]


def kv_id(case):
    page, nq, new, causal, window, rotary, interleaved, leftpad, batch_idx = case
    parts = [f"paged{page}" if page else "contiguous", f"Nq{nq}", f"new{new}"]
    parts += ["causal"] * causal + ["local"] * bool(window) + [("rotary_interleaved" if interleaved else "rotary")] * rotary
    return "-".join(parts + ["leftpad"] * leftpad + ["batch_idx"] * batch_idx)


@pytest.mark.parametrize("case", KV_CASES, ids=kv_id)
def test_kvcache_against_reference(case):
    page, nq, n_new, causal, window, rotary, interleaved, leftpad, use_batch_idx = case
    rng = np.random.default_rng(len(kv_id(case)))
    batch, hq, hkv, d, capacity = 4, 4, 2, 32, 48
    filled = np.array([0, 5, 17, capacity - n_new - 1])  # an append at 0 included
    starts = np.minimum(filled, [0, 2, 3, 1]) if leftpad else np.zeros(batch, np.int64)
    q = rng.standard_normal((batch, nq, hq, d)).astype(np.float32)
    k_new, v_new = (rng.standard_normal((batch, n_new, hkv, d)).astype(np.float32) for _ in range(2))
    logical = np.zeros((batch, capacity, hkv, d), np.float32), np.zeros((batch, capacity, hkv, d), np.float32)
    for x in logical:
        x[:] = rng.standard_normal(x.shape)
    cos = sin = None
    if rotary:
        angles = rng.uniform(0, 2 * np.pi, (capacity + nq, 12))
        cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)

    # The cache in the layout under test: contiguous rows (maybe permuted) or shuffled pages.
    kw = {}
    if page:
        n_pages = -(-capacity // page)
        pages = rng.permutation(batch * n_pages + 3)[: batch * n_pages].reshape(batch, n_pages).astype(np.int32)
        k_cache, v_cache = (np.zeros((batch * n_pages + 3, page, hkv, d), np.float32) for _ in range(2))
        for b in range(batch):
            for p in range(capacity):
                k_cache[pages[b, p // page], p % page] = logical[0][b, p]
                v_cache[pages[b, p // page], p % page] = logical[1][b, p]
        kw["block_table"] = torch.from_numpy(pages)
    else:
        rows = rng.permutation(batch + 1)[:batch] if use_batch_idx else np.arange(batch)
        k_cache, v_cache = (np.zeros((batch + 1, capacity, hkv, d), np.float32) for _ in range(2))
        k_cache[rows], v_cache[rows] = logical
        if use_batch_idx:
            kw["cache_batch_idx"] = torch.from_numpy(rows.astype(np.int32))
    if leftpad:
        kw["cache_leftpad"] = torch.from_numpy(starts.astype(np.int32))
    if rotary:
        kw.update(rotary_cos=torch.from_numpy(cos), rotary_sin=torch.from_numpy(sin), rotary_interleaved=interleaved)
    k_cache_t, v_cache_t = torch.from_numpy(k_cache), torch.from_numpy(v_cache)
    out, lse = flash_attn_with_kvcache(
        torch.from_numpy(q), k_cache_t, v_cache_t, *((torch.from_numpy(k_new), torch.from_numpy(v_new)) if n_new else ()),
        cache_seqlens=torch.from_numpy(filled.astype(np.int32)), causal=causal,
        window_size=window if window else (-1, -1), return_softmax_lse=True, **kw,
    )  # fmt: skip

    for b in range(batch):
        pos = filled[b]  # rotary positions: absolute cache positions, as flash-attn's kernel has them
        new_k = rotated(k_new[b], pos + np.arange(n_new), cos, sin, interleaved) if rotary else k_new[b]
        logical[0][b, filled[b] : filled[b] + n_new] = new_k
        logical[1][b, filled[b] : filled[b] + n_new] = v_new[b]
        keys = slice(starts[b], filled[b] + n_new)
        q_b = q[b]
        if rotary:
            q_b = rotated(q_b, pos + (np.arange(nq) if causal or window else np.zeros(nq, int)), cos, sin, interleaved)
        expected, expected_lse = reference(
            q_b.transpose(1, 0, 2).astype(np.float64), logical[0][b, keys].transpose(1, 0, 2).astype(np.float64),
            logical[1][b, keys].transpose(1, 0, 2).astype(np.float64), [0, nq], [0, keys.stop - keys.start],
            causal=causal, window=(window[0], window[1]) if window else None, return_lse=True,
        )  # fmt: skip
        assert max_error(out[b].transpose(0, 1).double().numpy(), expected) < 2e-5, f"sequence {b}"
        assert max_error(lse[b].double().numpy(), expected_lse) < 2e-5, f"lse of sequence {b}"
    # The cache now holds the appended (rotated) keys where they belong, and nothing else changed.
    for b in range(batch):
        for p in range(capacity):
            where = (pages[b, p // page], p % page) if page else (kw.get("cache_batch_idx", torch.arange(batch))[b], p)
            assert torch.allclose(k_cache_t[where], torch.from_numpy(logical[0][b, p]), atol=1e-6), (b, p)
            assert torch.equal(v_cache_t[where], torch.from_numpy(logical[1][b, p])), (b, p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("entry", ["flash_attn_func", "flash_attn_with_kvcache"])
def test_a_decode_step_reads_the_cache_where_it_is(entry, dtype):
    """flash-attn's cache layout, (B, N, Hkv, D), is not C-contiguous as the kernel's (B, Hkv, N, D):
    the decode kernel reads its rows in place (kernels/cpu/plan._rows_in_place) instead of a copy
    of the whole cache per call; the results are the reference's."""
    from attnkit.kernels.numba_attention import recording

    rng = np.random.default_rng(21)
    batch, hq, hkv, d, capacity = 3, 8, 2, 64, 200
    q = torch.from_numpy(rng.standard_normal((batch, 1, hq, d))).to(dtype)
    k_cache, v_cache = (torch.from_numpy(rng.standard_normal((batch, capacity, hkv, d))).to(dtype) for _ in range(2))
    lengths = np.array([capacity, 77, 1]) if entry == "flash_attn_with_kvcache" else np.full(batch, capacity)
    bits = (lambda x: x.view(torch.int16).numpy()) if dtype == torch.bfloat16 else (lambda x: x.numpy())
    with recording() as launches:
        for _ in range(3):  # the full path, then the planned call (flash_attn_func), its entry
            if entry == "flash_attn_func":
                out = flash_attn_func(q, k_cache, v_cache)
            else:
                out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.from_numpy(lengths.astype(np.int32)))
    assert [launch.worker.removesuffix("_serial") for launch in launches] == ["decode"] * 3  # serial when busy
    for launch in launches:
        assert np.shares_memory(launch.k, bits(k_cache)) and np.shares_memory(launch.v, bits(v_cache))
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-5
    for b in range(batch):
        n = int(lengths[b])
        expected = reference(q[b].transpose(0, 1).double().numpy(), k_cache[b, :n].transpose(0, 1).double().numpy(),
                             v_cache[b, :n].transpose(0, 1).double().numpy(), [0, 1], [0, n])  # fmt: skip
        assert max_error(out[b].transpose(0, 1).double().numpy(), expected) < tol, f"sequence {b}"


def test_bf16_decode_through_the_cache():
    torch.manual_seed(2)
    batch, hq, hkv, d = 3, 8, 2, 64
    k_cache, v_cache = torch.randn(batch, 300, hkv, d).bfloat16(), torch.randn(batch, 300, hkv, d).bfloat16()
    q = torch.randn(batch, 1, hq, d).bfloat16()
    lengths = torch.tensor([1, 299, 150], dtype=torch.int32)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, causal=True)
    assert out.dtype == torch.bfloat16
    for b in range(batch):
        n = int(lengths[b])
        expected = reference(q[b].transpose(0, 1).double().numpy(), k_cache[b, :n].transpose(0, 1).double().numpy(),
                             v_cache[b, :n].transpose(0, 1).double().numpy(), [0, 1], [0, n], causal=True)
        assert max_error(out[b].transpose(0, 1).double().numpy(), expected) < 2e-2


# ---------------------------------------------------------------------------
# Refusals: clear errors, and a refused cache call writes nothing
# ---------------------------------------------------------------------------


def test_cu_seqlens_errors():
    q = torch.randn(10, 2, 8)
    good = torch.tensor([0, 4, 10], dtype=torch.int32)
    cases = [
        (torch.tensor([0, 4, 10]), TypeError, "cu_seqlens_q must have dtype int32"),
        (torch.tensor([0, 6, 4, 10], dtype=torch.int32), ValueError, "must not decrease"),
        (torch.tensor([0, 4, 9], dtype=torch.int32), ValueError, r"cu_seqlens_q\[-1\] must equal the number of tokens, 10"),
        (torch.tensor([1, 4, 10], dtype=torch.int32), ValueError, r"cu_seqlens_q\[0\] must be 0"),
    ]
    for cu, error, message in cases:
        with pytest.raises(error, match=message):
            flash_attn_varlen_func(q, q, q, cu, good, 10, 10)
    with pytest.raises(ValueError, match="same length"):
        flash_attn_varlen_func(q, q, q, good, torch.tensor([0, 10], dtype=torch.int32), 10, 10)
    with pytest.raises(ValueError, match="max_seqlen_q is 3, but a sequence in the batch has 6 tokens"):
        flash_attn_varlen_func(q, q, q, good, good, 3, 10)
    with pytest.raises(ValueError, match="multiple of the kv heads"):
        flash_attn_varlen_func(torch.randn(10, 3, 8), q, q, good, good, 10, 10)


def test_refused_cache_calls_write_nothing():
    k_cache, v_cache = torch.randn(2, 8, 1, 4), torch.randn(2, 8, 1, 4)
    before = k_cache.clone(), v_cache.clone()
    q, new = torch.randn(2, 1, 2, 4), torch.randn(2, 2, 1, 4)
    with pytest.raises(ValueError, match="the cache holds 8 positions; sequence 1 needs 9"):
        flash_attn_with_kvcache(q, k_cache, v_cache, new, new, cache_seqlens=torch.tensor([0, 7], dtype=torch.int32))
    paged = torch.randn(4, 2, 1, 4)
    paged_before = paged.clone()
    table = torch.tensor([[0, 1], [2, 9]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"block_table\[1\] holds page 9; the cache has pages 0..3"):
        flash_attn_with_kvcache(q, paged, paged, new, new, cache_seqlens=torch.tensor([1, 2], dtype=torch.int32),
                                block_table=table)
    with pytest.raises(ValueError, match="needs 5 cache positions"):
        flash_attn_with_kvcache(q, paged, paged, new, new, cache_seqlens=torch.tensor([3, 0], dtype=torch.int32),
                                block_table=table)
    with pytest.raises(TypeError, match="cache_seqlens must have dtype int32"):
        flash_attn_with_kvcache(q, k_cache, v_cache, new, new, cache_seqlens=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="multiple of the kv heads"):
        flash_attn_with_kvcache(torch.randn(2, 1, 3, 4), torch.randn(2, 8, 2, 4), torch.randn(2, 8, 2, 4))
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1]) and torch.equal(paged, paged_before)


def test_mismatched_devices_and_bad_options_are_refused():
    q = torch.randn(2, 5, 2, 8)
    with pytest.raises(ValueError, match="one device; got q on cpu, k on meta"):
        flash_attn_func(q, torch.empty(2, 5, 2, 8, device="meta"), q)
    with pytest.raises(ValueError, match="window_size entries must be >= 0, or -1"):
        flash_attn_func(q, q, q, window_size=(-2, 0))
    with pytest.raises(TypeError, match="window_size must be a"):
        flash_attn_func(q, q, q, window_size=3)
    with pytest.raises(ValueError, match="softcap must be a float >= 0"):
        flash_attn_func(q, q, q, softcap=-1.0)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        flash_attn_func(q, q, q, dropout_p=1.5)
    with pytest.raises(ValueError, match="alibi_slopes must have shape"):
        flash_attn_func(q, q, q, alibi_slopes=torch.ones(3))
    cache = torch.randn(2, 8, 2, 8)
    with pytest.raises(ValueError, match=r"cache_leftpad must be in \[0, cache_seqlens\]"):
        flash_attn_with_kvcache(q[:, :1], cache, cache, cache_seqlens=2,
                                cache_leftpad=torch.tensor([3, 0], dtype=torch.int32))


def test_varlen_func_reads_a_paged_cache_through_block_table():
    """flash_attn_varlen_func with block_table: keys from shuffled pages equal the same keys packed."""
    torch.manual_seed(5)
    lengths_q, lengths_k, page = [2, 7, 1], [9, 30, 17], 4
    k_packed, v_packed = torch.randn(sum(lengths_k), 2, 16), torch.randn(sum(lengths_k), 2, 16)
    q = torch.randn(sum(lengths_q), 4, 16)
    n_pages = [-(-n // page) for n in lengths_k]
    order = torch.randperm(sum(n_pages) + 2)
    table = torch.full((3, max(n_pages)), 0, dtype=torch.int32)
    k_cache, v_cache = torch.zeros(sum(n_pages) + 2, page, 2, 16), torch.zeros(sum(n_pages) + 2, page, 2, 16)
    used, start = 0, 0
    for b, n in enumerate(lengths_k):
        for p in range(n_pages[b]):
            table[b, p] = int(order[used])
            rows = slice(p * page, min(n, (p + 1) * page))
            count = rows.stop - rows.start
            k_cache[table[b, p], :count] = k_packed[start + rows.start : start + rows.stop]
            v_cache[table[b, p], :count] = v_packed[start + rows.start : start + rows.stop]
            used += 1
        start += n
    cu_q, cu_k = (torch.from_numpy(offsets(x)) for x in (lengths_q, lengths_k))
    paged = flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, 7, 30, causal=True, block_table=table)
    packed = flash_attn_varlen_func(q, k_packed, v_packed, cu_q, cu_k, 7, 30, causal=True)
    assert torch.equal(paged, packed)


# ---------------------------------------------------------------------------
# flash-attn's semantics where its source, not its docstrings, decides
# ---------------------------------------------------------------------------


def test_window_size_may_be_an_integer_tensor():
    """flash-attn's own tests pass window_size=torch.randint(0, seqlen_k, (2,))."""
    torch.manual_seed(3)
    q, k, v = torch.randn(2, 9, 4, 16), torch.randn(2, 13, 2, 16), torch.randn(2, 13, 2, 16)
    expected = flash_attn_func(q, k, v, causal=True, window_size=(3, 0))
    for window in (torch.tensor([3, 0]), torch.tensor([3, 0], dtype=torch.int32), np.array([3, 0]), [3, 0]):
        assert torch.equal(flash_attn_func(q, k, v, causal=True, window_size=window), expected), repr(window)
    for bad in (torch.tensor([3.0, 0.0]), torch.tensor([True, False]), (3, 0.5), torch.tensor([1, 2, 3])):
        with pytest.raises(TypeError, match="window_size must be a"):
            flash_attn_func(q, k, v, window_size=bad)


def test_rotary_decode_needs_only_the_positions_it_reads():
    """Not causal, not local: every query is rotated at cache_seqlens, so a table of cache_seqlens + N_new
    rows is enough however many queries there are (it was refused: 'needs 225')."""
    torch.manual_seed(4)
    batch, nq, n_new, filled, d = 2, 8, 1, 6, 32
    cache = torch.randn(batch, 16, 2, d), torch.randn(batch, 16, 2, d)
    q, k_new, v_new = torch.randn(batch, nq, 4, d), torch.randn(batch, n_new, 2, d), torch.randn(batch, n_new, 2, d)
    angles = torch.rand(filled + n_new + 5, 8) * 6.28
    results = []
    for rows in (filled + n_new, filled + n_new + 5):  # just enough, and more
        k_cache, v_cache = (x.clone() for x in cache)
        results.append(flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, rotary_cos=angles[:rows].cos(),
                                               rotary_sin=angles[:rows].sin(), cache_seqlens=filled))  # fmt: skip
    assert torch.equal(results[0], results[1])
    with pytest.raises(ValueError, match=f"rotary_cos has {filled} positions; this call needs {filled + n_new}"):
        flash_attn_with_kvcache(q, *(x.clone() for x in cache), k_new, v_new, rotary_cos=angles[:filled].cos(),
                                rotary_sin=angles[:filled].sin(), cache_seqlens=filled)  # fmt: skip


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "halves"])
def test_rotary_keeps_float64(interleaved):
    """A float64 cache's appended keys (and queries) are rotated in float64: float32 arithmetic left
    them ~1e-7 off NumPy's float64 rotation (found by tests/random_calls.py)."""
    rng = np.random.default_rng(5)
    batch, filled, n_new, d = 2, 5, 3, 32
    k_cache, v_cache = (torch.from_numpy(rng.standard_normal((batch, 12, 2, d))) for _ in range(2))
    q, k_new, v_new = (torch.from_numpy(rng.standard_normal((batch, n, h, d))) for n, h in ((1, 4), (3, 2), (3, 2)))
    angles = rng.uniform(0, 2 * np.pi, (12, 8))
    cos, sin = np.cos(angles), np.sin(angles)
    flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=filled, rotary_cos=torch.from_numpy(cos),
                            rotary_sin=torch.from_numpy(sin), rotary_interleaved=interleaved)  # fmt: skip
    for b in range(batch):
        want = rotated(k_new[b].numpy(), filled + np.arange(n_new), cos, sin, interleaved)
        np.testing.assert_allclose(k_cache[b, filled : filled + n_new].numpy(), want, rtol=0, atol=1e-12)


def test_refusals_are_runtime_errors_too():
    """Code written for flash-attn catches RuntimeError (its C++ checks); attnkit's refusals name the argument
    as a ValueError / TypeError that is also a RuntimeError."""
    q, cache = torch.randn(2, 1, 2, 8), torch.randn(4, 4, 2, 8)
    table = torch.tensor([[0], [1]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="needs 5 cache positions") as caught:
        flash_attn_with_kvcache(q, cache, cache.clone(), q, q, cache_seqlens=4, block_table=table)
    assert isinstance(caught.value, ValueError)
    with pytest.raises(RuntimeError, match="num_splits must be at most 128"):
        flash_attn_with_kvcache(q, cache, cache, num_splits=129)
    with pytest.raises(RuntimeError, match="cache_seqlens must have dtype int32") as caught:
        flash_attn_with_kvcache(q, cache, cache, cache_seqlens=torch.tensor([0, 1]))
    assert isinstance(caught.value, TypeError)
    with pytest.raises(RuntimeError, match="cu_seqlens_q"):
        flash_attn_varlen_func(torch.randn(6, 2, 8), torch.randn(6, 2, 8), torch.randn(6, 2, 8),
                               torch.tensor([0, 6]), torch.tensor([0, 6], dtype=torch.int32), 6, 6)  # fmt: skip
