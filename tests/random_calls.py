"""Random calls of each entry point, checked against the float64 NumPy reference.

Each entry point draws its arguments from a NumPy generator (dtype, batch axes, GQA heads, lengths
0 and 1 included, head sizes off the vector width, causal alignments, windows, softcap, ALiBi,
sinks, masks, dropout, memory layouts), makes the call (forward, and the backward where there is
autograd) and compares every result with attnkit.reference computed in float64. A failure names
the case and how to run it again.

    python tests/random_calls.py dense --cases 2000            # a long run of one entry point
    python tests/random_calls.py all --cases 300 --large       # every entry point, larger shapes
    python tests/random_calls.py varlen --seed 7 --first 13 --cases 1   # one case again

tests/test_random_calls.py runs a few cases of each with a new seed in every suite run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # the Triton kernels run under the interpreter (before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import attnkit  # noqa: E402
from attnkit.flash_attn import (  # noqa: E402
    flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func, flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func, flash_attn_with_kvcache,
)  # fmt: skip
from attnkit.reference import attention as reference_attention  # noqa: E402
from attnkit.reference import attention_backward as reference_backward  # noqa: E402
from attnkit.reference.dropout import keep_mask  # noqa: E402
from attnkit.testing import assert_close  # noqa: E402

# Error allowed per unit of the expected values' size (outputs; gradients get 4x): what the kernels'
# arithmetic in each dtype leaves over thousands of random calls, with a margin.
TOLERANCE = {torch.float32: 3e-4, torch.float64: 1e-9, torch.bfloat16: 3e-2, torch.float16: 4e-3}
DTYPES = [torch.float32, torch.float32, torch.bfloat16, torch.float16, torch.float64]


def check(name, got, want, dtype, *, gradient=False, plain=None):
    """assert_close with an error bound that grows with the size of the expected values; with `plain`
    (reference_gradients' second list), at least 3x plain's error."""
    want = np.asarray(want, np.float64)
    finite = want[np.isfinite(want)]
    size = max(1.0, float(np.abs(finite).max())) if finite.size else 1.0
    tolerance = TOLERANCE[dtype]
    atol = tolerance * size * (4 if gradient else 1)
    if plain is not None:
        plain = float64(plain)
        both = np.isfinite(plain) & np.isfinite(want)
        if both.any():
            atol = max(atol, 3 * float(np.abs(plain[both] - want[both]).max()))
    assert_close(got, want, atol=atol, rtol=tolerance, name=name)


# Unit roundoff of the dtypes whose gradients cancel visibly (below)
ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def reference_gradients(q, k, v, d_out, dtype, **spec):
    """[out, lse, dq, dk, dv(, dsinks)] of the float64 reference; and for bf16 / float16 (None
    otherwise) [None, None, the gradients again] from an output off by one rounding of dtype in the
    direction that moves rowsum(dO * O) most. The backward's dS = P (dP - rowsum(dO * O)) cancels to
    ~0 where one key takes a row's weight; what is left is the rounding of the output it returned
    (as in flash-attn) and of dP, of that size but not the same each call, so check allows 3x it."""
    out, lse = reference_attention(q, k, v, return_lse=True, **spec)
    exact = [out, lse, *reference_backward(q, k, v, out, d_out, lse, **spec)]
    if dtype not in ROUNDOFF:
        return exact, [None] * len(exact)
    off_by_a_rounding = out + ROUNDOFF[dtype] * np.abs(out) * np.sign(d_out)
    return exact, [None, None, *reference_backward(q, k, v, off_by_a_rounding, d_out, lse, **spec)]


def check_results(got, want, plain, dtype):
    """check() of [out, lse, dq, dk, dv, dsinks or None] against reference_gradients' two lists."""
    for i, name in enumerate(("out", "lse", "dq", "dk", "dv", "dsinks")[: 5 + (got[5] is not None)]):
        checked_dtype = torch.float32 if name == "dsinks" and dtype == torch.float64 else dtype  # sinks: float32
        check(name, got[i], want[i], checked_dtype, gradient=i >= 2, plain=plain[i])


def float64(x):
    """A tensor or array as a float64 NumPy array (None and bool masks pass through)."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()  # the Triton entry's tensors may live on a GPU
        return x.numpy() if x.dtype == torch.bool else x.double().numpy()
    return x if x.dtype == bool else x.astype(np.float64)


def draw_window(rng):
    if rng.random() < 0.6:
        return None
    return tuple(None if rng.random() < 0.3 else int(rng.integers(0, 40)) for _ in range(2))


def overlapping_rows(rng, shape, dtype):
    """A (..., N, D) tensor whose row i starts one element after row i - 1 (as torch's unfold makes):
    neither contiguous nor readable as a matrix with a leading dimension."""
    strides, span = [1, 1], shape[-2] + shape[-1] - 1  # the elements one (N, D) slab spans
    for size in reversed(shape[:-2]):
        strides.insert(0, span)
        span *= size
    storage = torch.tensor(rng.standard_normal(max(span, 1))).to(dtype)
    return storage.as_strided(shape, strides).detach()


def describe(options):
    """The options of a call as text: tensors by their shape."""
    shown = []
    for name, value in options.items():
        if value is None or value is False or (name == "dropout_p" and value == 0):
            continue
        if isinstance(value, (torch.Tensor, np.ndarray)):
            value = f"{'bool' if value.dtype in (torch.bool, bool) else 'float'}{tuple(value.shape)}"
        shown.append(f"{name}={value}")
    return " ".join(shown)


def dense(rng, large=False):
    """attnkit.attention on torch tensors: every option, forward, lse and gradients."""
    dtype = DTYPES[rng.integers(len(DTYPES))]
    lead = [(), (2,), (1, 2), (3,)][rng.integers(4)]
    hkv = int(rng.choice([1, 2, 3]))
    hq = hkv * int(rng.choice([1, 2, 4]))
    nq = int(rng.choice([1, 1, 1, 2, 5, 16, 33, 64, 70, 130] + ([300, 517, 1030] if large else [])))
    nq = 0 if rng.random() < 0.04 else nq
    nk = int(rng.choice([0, 1, 3, 16, 31, 64, 100, 129, 257] + ([600, 1100, 2049] if large else [])))
    d = int(rng.choice([1, 4, 16, 32, 59, 64, 80, 128] + ([192, 256] if large else [])))
    dv = d if rng.random() < 0.7 else int(rng.choice([8, 24, 64]))
    causal = [False, True, "bottom_right"][rng.integers(3)]
    options = dict(
        causal=causal,
        align=None if causal or rng.random() < 0.7 else ["top_left", "bottom_right"][rng.integers(2)],
        window=draw_window(rng),
        softcap=None if rng.random() < 0.7 else float(rng.choice([5.0, 30.0])),
        scale=None if rng.random() < 0.6 else float(rng.uniform(0.05, 1.5)),
        sinks=None if rng.random() < 0.75 else torch.tensor(rng.standard_normal(hq)).float().requires_grad_(),
        alibi_slopes=None if rng.random() < 0.8 else torch.tensor(rng.uniform(0, 0.5, hq)).float(),
        mask=None,
        dropout_p=0.0 if rng.random() < 0.7 else float(rng.choice([0.1, 0.5])),
        dropout_seed=int(rng.integers(0, 2**63)),
    )
    r = rng.random()
    if r < 0.08:
        options["mask"] = torch.tensor(rng.random((hq, nq, nk)) < 0.7)
    elif r < 0.15:
        options["mask"] = torch.tensor(rng.random((nq, nk)) < 0.8)
    elif r < 0.25:
        options["mask"] = torch.tensor(rng.standard_normal((hq, 1, nk)) * 2).to(dtype)
    elif r < 0.3:  # -inf entries, and a first query that sees no key at all
        additive = np.where(rng.random((hq, nq, nk)) < 0.5, -np.inf, rng.standard_normal((hq, nq, nk)))
        additive[:, :1] = -np.inf
        options["mask"] = torch.tensor(additive).to(dtype)

    def make(shape, keys=False):
        layout = rng.random()
        if keys and layout < 0.1 and shape[-2] > 1:  # rows overlapping in memory: an unfolded sequence
            return overlapping_rows(rng, shape, dtype).requires_grad_()
        x = torch.tensor(rng.standard_normal(shape)).to(dtype)
        if layout < 0.4 and len(shape) >= 3:  # the same values in a (..., N, H, D) memory layout
            x = x.transpose(-2, -3).contiguous().transpose(-2, -3)
        return x.requires_grad_()

    q, k, v = make(lead + (hq, nq, d)), make(lead + (hkv, nk, d), True), make(lead + (hkv, nk, dv), True)
    description = (f"{dtype} q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)} strides k {k.stride()} v "
                   f"{v.stride()} {describe(options)}")  # fmt: skip

    def run():
        d_out = torch.tensor(rng.standard_normal(lead + (hq, nq, dv))).to(dtype)
        sinks = options["sinks"]
        out, lse = attnkit.attention(q, k, v, return_lse=True, **options)
        out.backward(d_out)
        got = [out, lse, q.grad, k.grad, v.grad, None if sinks is None else sinks.grad]
        spec = dict(options, sinks=float64(sinks), alibi_slopes=float64(options["alibi_slopes"]),
                    mask=float64(options["mask"]), dropout_keep=None)  # fmt: skip
        seed = spec.pop("dropout_seed")
        if options["dropout_p"]:
            batch = int(np.prod(lead, dtype=np.int64))
            spec["dropout_keep"] = keep_mask(seed, options["dropout_p"], batch, hq, nq, nk).reshape(lead + (hq, nq, nk))
        want, plain = reference_gradients(*(float64(x) for x in (q, k, v)), float64(d_out), dtype, **spec)
        check_results(got, want, plain, dtype)

    return description, run


def varlen(rng, large=False):
    """attnkit.varlen_attention: packed sequences (some empty) against the reference per sequence."""
    dtype = DTYPES[rng.integers(len(DTYPES))]
    hkv = int(rng.choice([1, 2, 3]))
    hq = hkv * int(rng.choice([1, 2, 4]))
    count = int(rng.integers(0, 5))
    decode = rng.random() < 0.3
    longer = [300, 700] if large else []
    lengths_q = [1 if decode else int(rng.choice([0, 1, 3, 17, 64, 90] + longer)) for _ in range(count)]
    lengths_k = [int(rng.choice([0, 1, 5, 33, 64, 140] + longer)) for _ in range(count)]
    if rng.random() < 0.4:
        lengths_k = [max(a, b) for a, b in zip(lengths_k, lengths_q)]
    d = int(rng.choice([1, 16, 59, 64, 128]))
    dv = d if rng.random() < 0.7 else int(rng.choice([8, 64]))
    options = dict(
        causal=bool(rng.random() < 0.5),
        align=["bottom_right", "top_left"][rng.integers(2)],
        window=draw_window(rng),
        softcap=None if rng.random() < 0.7 else float(rng.choice([5.0, 30.0])),
        scale=None if rng.random() < 0.6 else float(rng.uniform(0.05, 1.5)),
        sinks=None if rng.random() < 0.75 else torch.tensor(rng.standard_normal(hq)).float().requires_grad_(),
        alibi_slopes=None,
        dropout_p=0.0 if rng.random() < 0.75 else 0.2,
        dropout_seed=int(rng.integers(0, 2**63)),
    )
    if rng.random() < 0.2:
        options["alibi_slopes"] = torch.tensor(rng.uniform(0, 0.5, hq if rng.random() < 0.5 else (count, hq))).float()
    cu_q = np.concatenate([[0], np.cumsum(lengths_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lengths_k)]).astype(np.int32)

    def make(shape):
        x = torch.tensor(rng.standard_normal(shape)).to(dtype)
        if rng.random() < 0.4:  # the same values in flash-attn's (total, H, D) memory layout
            x = x.transpose(0, 1).contiguous().transpose(0, 1)
        return x.requires_grad_()

    q, k, v = make((hq, int(cu_q[-1]), d)), make((hkv, int(cu_k[-1]), d)), make((hkv, int(cu_k[-1]), dv))
    description = (f"{dtype} H {hq}/{hkv} lengths q {lengths_q} k {lengths_k} D {d}/{dv} strides q {q.stride()} k "
                   f"{k.stride()} {describe(options)}")  # fmt: skip

    def run():
        d_out = torch.tensor(rng.standard_normal((hq, int(cu_q[-1]), dv))).to(dtype)
        sinks = options["sinks"]

        out, lse = attnkit.varlen_attention(q, k, v, torch.tensor(cu_q), torch.tensor(cu_k), return_lse=True,
                                            **options)  # fmt: skip
        out.backward(d_out)
        got = [out, lse, q.grad, k.grad, v.grad, None if sinks is None else sinks.grad]
        want = [np.zeros(x.shape) for x in got[:5]] + [np.zeros(hq)]
        low_precision = dtype in (torch.bfloat16, torch.float16)
        plain = [None, None] + ([np.zeros(x.shape) for x in got[2:5]] + [np.zeros(hq)] if low_precision else [None] * 4)
        slopes, p = float64(options["alibi_slopes"]), options["dropout_p"]
        causal, align = options["causal"], options["align"]
        for i in range(count):
            rows, keys = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
            spec = dict(
                causal=(True if align == "top_left" else "bottom_right") if causal else False,
                align=None if causal else align, window=options["window"], softcap=options["softcap"],
                scale=options["scale"], sinks=float64(sinks), dropout_p=p,
                alibi_slopes=None if slopes is None else (slopes if slopes.ndim == 1 else slopes[i]),
                dropout_keep=keep_mask(options["dropout_seed"], p, 1, hq, lengths_q[i], lengths_k[i],
                                       first_sequence=i)[0] if p else None,
            )  # fmt: skip
            arrays = float64(q)[:, rows], float64(k)[:, keys], float64(v)[:, keys], float64(d_out)[:, rows]
            exact, from_rounded = reference_gradients(*arrays, dtype, **spec)
            want[0][:, rows], want[1][:, rows] = exact[0], exact[1]
            for whole, part in ((want, exact), (plain, from_rounded)):
                if whole[2] is not None:
                    whole[2][:, rows] = part[2]
                    whole[3][:, keys], whole[4][:, keys] = part[3], part[4]
                    if sinks is not None:
                        whole[5] += part[5]
        check_results(got, want, plain, dtype)

    return description, run


def sdpa(rng, large=False):
    """attnkit.scaled_dot_product_attention against torch's own (its math backend, float64)."""
    dtype = DTYPES[rng.integers(len(DTYPES))]
    lead = [(), (2,), (2, 3), (1,)][rng.integers(4)]
    gqa = bool(rng.random() < 0.3)
    hkv = int(rng.choice([1, 2]))
    hq = hkv * (int(rng.choice([2, 4])) if gqa else 1)
    nq = int(rng.choice([1, 2, 7, 64, 100] + ([400] if large else [])))
    nk = int(rng.choice([1, 5, 64, 129] + ([700] if large else [])))
    d = int(rng.choice([8, 32, 64, 96]))
    dv = d if rng.random() < 0.8 else 16
    causal = bool(rng.random() < 0.4)
    mask = None
    if not causal and rng.random() < 0.5:
        shape = [(nq, nk), (1, nk), (hq, nq, nk), (1, 1, nk), lead + (hq, nq, nk)][rng.integers(5)]
        if rng.random() < 0.5:
            visible = rng.random(shape) < 0.8
            visible[..., 0] = True  # torch's SDPA gives NaN for a row that sees no key
            mask = torch.tensor(visible)
        else:
            mask = torch.tensor(rng.standard_normal(shape)).to(dtype)
    options = dict(attn_mask=mask, is_causal=causal, enable_gqa=gqa,
                   scale=None if rng.random() < 0.6 else float(rng.uniform(0.05, 1.0)))  # fmt: skip

    def make(shape, heads_second=False):
        if heads_second:  # a (..., N, H, D) tensor viewed as (..., H, N, D), as models do
            shape = shape[:-3] + (shape[-2], shape[-3], shape[-1])
            return torch.tensor(rng.standard_normal(shape)).to(dtype).transpose(-2, -3).requires_grad_()
        return torch.tensor(rng.standard_normal(shape)).to(dtype).requires_grad_()

    q = make(lead + (hq, nq, d), heads_second=rng.random() < 0.3)
    k, v = make(lead + (hkv, nk, d)), make(lead + (hkv, nk, dv))
    description = f"{dtype} q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)} {describe(options)}"

    def run():
        out = attnkit.scaled_dot_product_attention(q, k, v, **options)
        d_out = torch.tensor(rng.standard_normal(out.shape)).to(dtype)
        grads = torch.autograd.grad(out, (q, k, v), d_out)
        exact = [x.detach().double().requires_grad_() for x in (q, k, v)]
        exact_options = dict(options, attn_mask=mask if mask is None or mask.dtype == torch.bool else mask.double())
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            want = F.scaled_dot_product_attention(*exact, **exact_options)
        want_grads = torch.autograd.grad(want, exact, d_out.double())
        assert out.dtype == q.dtype and out.shape == want.shape, (out.dtype, tuple(out.shape), tuple(want.shape))
        check("out", out, float64(want), dtype)
        for name, got, want_grad in zip(("dq", "dk", "dv"), grads, want_grads):
            check(name, got, float64(want_grad), dtype, gradient=True)

    return description, run


def rotated(x, positions, cos, sin, interleaved):
    """x (N, H, D) float64 with rotary embeddings at positions (N,): cos, sin (L, R/2) rotate its first R
    columns, as pairs (0, 1), (2, 3)... when interleaved (GPT-J), else (i, i + R/2) (GPT-NeoX)."""
    c, s = cos[positions][:, None, :], sin[positions][:, None, :]  # (N, 1, R/2)
    half = c.shape[-1]
    first, second = (slice(0, 2 * half, 2), slice(1, 2 * half, 2)) if interleaved else (slice(0, half),
                                                                                     slice(half, 2 * half))
    out = x.copy()
    out[..., first] = x[..., first] * c - x[..., second] * s
    out[..., second] = x[..., first] * s + x[..., second] * c
    return out


def kv_cache(rng, large=False):
    """attnkit.flash_attn.flash_attn_with_kvcache: contiguous and paged caches, appends, left pads,
    rotary embeddings (the appended keys and the queries), learnable sinks."""
    dtype = DTYPES[rng.integers(len(DTYPES))]
    batch = int(rng.integers(1, 5))
    hkv = int(rng.choice([1, 2]))
    hq = hkv * int(rng.choice([1, 2, 4]))
    d = int(rng.choice([16, 64, 128]))
    nq = int(rng.choice([1, 1, 1, 2, 5]))
    appended = int(rng.choice([0, 0, 1, nq]))
    paged = rng.random() < 0.35
    capacity = int(rng.choice([16, 40, 130] + ([1000] if large else [])))
    page = int(rng.choice([1, 4, 16])) if paged else None
    if paged:
        capacity = -(-capacity // page) * page
    lengths = rng.integers(0, capacity - appended + 1, batch)
    left_pad = None
    if not paged and rng.random() < 0.3:
        left_pad = np.minimum(rng.integers(0, 10, batch), lengths).astype(np.int32)
    batch_index = None if paged or rng.random() < 0.7 else rng.permutation(batch + 1)[:batch].astype(np.int32)
    causal = bool(rng.random() < 0.5)
    window = (-1, -1) if rng.random() < 0.7 else (int(rng.integers(0, 20)), int(rng.choice([-1, 0, 3])))
    softcap = 0.0 if rng.random() < 0.7 else 20.0
    slopes = None if rng.random() < 0.8 else torch.tensor(rng.uniform(0, 0.3, hq)).float()
    sinks = None if rng.random() < 0.85 else torch.tensor(rng.standard_normal(hq)).float()
    rotary = None
    if rng.random() < 0.3:  # (cos, sin) over every position the call reaches, interleaved or not
        angles = rng.uniform(0, 2 * np.pi, (capacity + nq, int(rng.choice([d // 4, d // 2]))))
        cos, sin = (torch.tensor(f(angles)).to(dtype) for f in (np.cos, np.sin))
        rotary = (cos, sin, bool(rng.random() < 0.5))

    def make(shape):
        return torch.tensor(rng.standard_normal(shape)).to(dtype)

    q = make((batch, nq, hq, d))
    block_table = None
    if paged:
        pages = capacity // page
        k_cache, v_cache = make((batch * pages + 2, page, hkv, d)), make((batch * pages + 2, page, hkv, d))
        order = rng.permutation(batch * pages + 2)[: batch * pages].reshape(batch, pages)
        block_table = torch.tensor(order.astype(np.int32))
    else:
        rows = batch + 1 if batch_index is not None else batch
        k_cache, v_cache = make((rows, capacity, hkv, d)), make((rows, capacity, hkv, d))
    k_new, v_new = (make((batch, appended, hkv, d)) if appended else None for _ in range(2))
    description = (f"{dtype} batch {batch} H {hq}/{hkv} D {d} Nq {nq} appended {appended} page {page} capacity "
                   f"{capacity} lengths {lengths.tolist()} left_pad {None if left_pad is None else left_pad.tolist()} "
                   f"batch_index {None if batch_index is None else batch_index.tolist()} causal {causal} window "
                   f"{window} softcap {softcap} alibi {slopes is not None} sinks {sinks is not None} rotary "
                   f"{None if rotary is None else (tuple(rotary[0].shape), 'interleaved' if rotary[2] else 'halves')}")

    def sequence(cache, i):  # (capacity, Hkv, D): sequence i's cache, a view
        if paged:
            return torch.cat([cache[p] for p in block_table[i].tolist()])
        return cache[batch_index[i] if batch_index is not None else i]

    def run():
        before = [(sequence(k_cache, i).clone(), sequence(v_cache, i).clone()) for i in range(batch)]
        cos, sin, interleaved = rotary or (None, None, True)
        out, lse = flash_attn_with_kvcache(
            q, k_cache, v_cache, k_new, v_new, cache_seqlens=torch.tensor(lengths.astype(np.int32)),
            cache_batch_idx=None if batch_index is None else torch.tensor(batch_index),
            cache_leftpad=None if left_pad is None else torch.tensor(left_pad), block_table=block_table,
            causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes, return_softmax_lse=True,
            rotary_cos=cos, rotary_sin=sin, rotary_interleaved=interleaved, learnable_sink=sinks,
        )  # fmt: skip
        # Queries sit at cache_seqlens + i when causal or local, all at cache_seqlens otherwise (flash-attn's rule)
        query_steps = np.arange(nq) if causal or window != (-1, -1) else np.zeros(nq, np.int64)
        visible_window = None if window == (-1, -1) else tuple(None if x < 0 else x for x in window)
        for i in range(batch):
            new_rows = np.arange(lengths[i], lengths[i] + appended)
            kept = np.setdiff1d(np.arange(capacity), new_rows)
            keys, values = sequence(k_cache, i), sequence(v_cache, i)
            # the new keys and values landed where they belong (keys rotated), and nothing else moved
            assert torch.equal(keys[kept], before[i][0][kept]), f"k cache of sequence {i}"
            assert torch.equal(values[kept], before[i][1][kept]), f"v cache of sequence {i}"
            if appended:
                assert torch.equal(values[new_rows], v_new[i]), f"appended values of sequence {i}"
                if rotary is None:
                    assert torch.equal(keys[new_rows], k_new[i]), f"appended keys of sequence {i}"
                else:
                    check(f"appended keys of sequence {i}", keys[new_rows],
                          rotated(float64(k_new[i]), new_rows, float64(cos), float64(sin), interleaved), dtype)
            queries = float64(q[i])  # (Nq, Hq, D)
            if rotary is not None:
                queries = rotated(queries, lengths[i] + query_steps, float64(cos), float64(sin), interleaved)
            first, end = (0 if left_pad is None else int(left_pad[i])), int(lengths[i]) + appended
            want, want_lse = reference_attention(
                queries.transpose(1, 0, 2), *(float64(x[first:end]).transpose(1, 0, 2) for x in (keys, values)),
                causal="bottom_right" if causal else False, align=None if causal else "bottom_right",
                window=visible_window, softcap=softcap or None, alibi_slopes=float64(slopes), sinks=float64(sinks),
                return_lse=True,
            )  # fmt: skip
            check(f"out[{i}]", float64(out[i]).transpose(1, 0, 2), want, dtype)
            check(f"lse[{i}]", lse[i], want_lse, dtype)

    return description, run


def flash_attn(rng, large=False):
    """flash_attn_func and flash_attn_varlen_func, and their kvpacked / qkvpacked forms: (B, N, H, D)
    and (total, H, D) tensors, bottom-right alignment, window_size with -1, softcap 0 as none, ALiBi,
    learnable sinks; results and gradients against the reference per sequence. With dropout: out is
    S_dmask's kept weights times V."""
    dtype = DTYPES[rng.integers(len(DTYPES))]
    packed = bool(rng.random() < 0.4)
    batch = int(rng.integers(1, 4))
    hkv = int(rng.choice([1, 2]))
    hq = hkv * int(rng.choice([1, 2, 4]))
    d = int(rng.choice([16, 32, 64, 128]))
    longer = [500] if large else []
    if packed:
        lengths_q = [int(rng.choice([0, 1, 7, 40] + longer)) for _ in range(batch)]
        lengths_k = [int(rng.choice([1, 9, 40, 70] + longer)) for _ in range(batch)]
    else:
        lengths_q = [int(rng.choice([1, 7, 40] + longer))] * batch
        lengths_k = [int(rng.choice([1, 9, 40, 70] + longer))] * batch
    options = dict(
        causal=bool(rng.random() < 0.5),
        window_size=(-1, -1) if rng.random() < 0.6 else (int(rng.choice([-1, 0, 5, 30])), int(rng.choice([-1, 0, 3]))),
        softcap=0.0 if rng.random() < 0.7 else 15.0,
        softmax_scale=None if rng.random() < 0.6 else float(rng.uniform(0.05, 1.0)),
        alibi_slopes=None if rng.random() < 0.8 else torch.tensor(rng.uniform(0, 0.3, hq if packed else (batch, hq))),
        learnable_sink=None if rng.random() < 0.8 else torch.tensor(rng.standard_normal(hq)).float().requires_grad_(),
        dropout_p=0.0 if rng.random() < 0.8 else 0.3,
    )  # fmt: skip
    if options["alibi_slopes"] is not None:
        options["alibi_slopes"] = options["alibi_slopes"].float()
    cu_q = np.concatenate([[0], np.cumsum(lengths_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lengths_k)]).astype(np.int32)

    def make(tokens, heads, width):
        shape = (int(tokens[-1]), heads, width) if packed else (batch, int(tokens[1]), heads, width)
        return torch.tensor(rng.standard_normal(shape)).to(dtype).requires_grad_()

    q, k, v = make(cu_q, hq, d), make(cu_k, hkv, d), make(cu_k, hkv, d)
    # the kvpacked / qkvpacked variants: K and V (and Q) stacked on the axis before the heads
    packing = ["", "kv"][rng.integers(2)]
    if hq == hkv and lengths_q == lengths_k and rng.random() < 0.5:
        packing = "qkv"
    stacked = None
    if packing:
        stacked = torch.stack([x.detach() for x in ((q, k, v) if packing == "qkv" else (k, v))], dim=-3)
        stacked.requires_grad_()
    name = f"flash_attn_{'varlen_' if packed else ''}{packing + 'packed_' if packing else ''}func"
    description = (f"{dtype} {name} batch {batch} H {hq}/{hkv} D {d} lengths q {lengths_q} k {lengths_k} "
                   f"{describe(options)}")  # fmt: skip

    def call():
        """(out, lse, S_dmask) and [dq, dk, dv] as they will be once out is differentiated."""
        offsets = [torch.tensor(cu_q), torch.tensor(cu_k)]
        if packing == "qkv":
            arguments = (stacked, offsets[0], max(lengths_q)) if packed else (stacked,)
            function = flash_attn_varlen_qkvpacked_func if packed else flash_attn_qkvpacked_func
        elif packing == "kv":
            arguments = (q, stacked, *offsets, max(lengths_q), max(lengths_k)) if packed else (q, stacked)
            function = flash_attn_varlen_kvpacked_func if packed else flash_attn_kvpacked_func
        else:
            arguments = (q, k, v, *offsets, max(lengths_q), max(lengths_k)) if packed else (q, k, v)
            function = flash_attn_varlen_func if packed else flash_attn_func
        results = function(*arguments, return_attn_probs=True, **options)

        def gradients():
            if packing == "qkv":
                return [stacked.grad.select(-3, i) for i in range(3)]
            if packing == "kv":
                return [q.grad, stacked.grad.select(-3, 0), stacked.grad.select(-3, 1)]
            return [q.grad, k.grad, v.grad]

        return results, gradients

    def sequence(x, i, offsets):  # sequence i of a (total, H, D) or (B, N, H, D) tensor as (H, N, D) float64
        x = x[offsets[i] : offsets[i + 1]] if packed else x[i]
        return float64(x).transpose(1, 0, 2)

    def run():
        (out, lse, probs), gradients = call()
        sinks, p = options["learnable_sink"], options["dropout_p"]
        if p:  # the weights S_dmask holds (dropped ones negated), kept and scaled, times V
            for i in range(batch):
                weights = np.clip(float64(probs[i]), 0, None)[:, : lengths_q[i], : lengths_k[i]] / (1 - p)
                values = np.repeat(sequence(v, i, cu_k), hq // hkv, axis=0)
                # S_dmask is float32 for float64 calls too
                check(f"out[{i}] from S_dmask", sequence(out, i, cu_q), weights @ values,
                      torch.float32 if dtype == torch.float64 else dtype)  # fmt: skip
            return
        d_out = torch.tensor(rng.standard_normal(out.shape)).to(dtype)
        out.backward(d_out)
        window = tuple(None if side < 0 else side for side in options["window_size"])
        slopes = float64(options["alibi_slopes"])
        for i in range(batch):
            spec = dict(
                causal="bottom_right" if options["causal"] else False,
                align=None if options["causal"] else "bottom_right",
                window=None if window == (None, None) else window, softcap=options["softcap"] or None,
                scale=options["softmax_scale"], sinks=float64(sinks),
                alibi_slopes=None if slopes is None else (slopes if slopes.ndim == 1 else slopes[i]),
            )  # fmt: skip
            arrays = [sequence(x, i, offsets) for x, offsets in ((q, cu_q), (k, cu_k), (v, cu_k), (d_out, cu_q))]
            want, plain = reference_gradients(*arrays, dtype, **spec)
            check(f"out[{i}]", sequence(out, i, cu_q), want[0], dtype)
            lse_i = lse[:, cu_q[i] : cu_q[i + 1]] if packed else lse[i]
            check(f"lse[{i}]", lse_i, want[1], dtype)
            for j, (name, grad, offsets) in enumerate(zip(("dq", "dk", "dv"), gradients(), (cu_q, cu_k, cu_k))):
                check(f"{name}[{i}]", sequence(grad, i, offsets), want[2 + j], dtype, gradient=True,
                      plain=plain[2 + j])  # fmt: skip

    return description, run


def triton_kernel(rng, large=False):
    """The Triton kernels themselves (kernels/triton_attention.py: dense and packed, forward and
    backward), on a GPU or, without one, under Triton's interpreter on the CPU: every option."""
    from attnkit.kernels import triton_attention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = [torch.float32, torch.float32, torch.float16][rng.integers(3)]
    packed = bool(rng.random() < 0.3)
    batch, hkv = int(rng.integers(1, 4 if packed else 3)), int(rng.choice([1, 2]))
    hq = hkv * int(rng.choice([1, 2, 3]))
    longer = [200] if large else []
    if packed:
        lengths_q = [int(rng.choice([0, 1, 9, 33] + longer)) for _ in range(batch)]
        lengths_k = [int(rng.choice([0, 1, 16, 40] + longer)) for _ in range(batch)]
    else:
        lengths_q = [int(rng.choice([1, 2, 17, 40, 70] + longer))] * batch
        lengths_k = [int(rng.choice([1, 5, 33, 64, 90] + longer))] * batch
    d = int(rng.choice([8, 16, 40, 64] + ([128] if large else [])))
    dv = d if packed or rng.random() < 0.7 else int(rng.choice([8, 24]))
    causal = [None, "top_left", "bottom_right"][rng.integers(3)]
    options = dict(
        scale=float(rng.uniform(0.1, 0.5)),
        causal=causal,
        align=["top_left", "bottom_right"][rng.integers(2)] if packed or (not causal and rng.random() < 0.4) else None,
        window=draw_window(rng),
        softcap=None if rng.random() < 0.75 else 10.0,
        alibi=None if rng.random() < 0.8 else torch.tensor(rng.uniform(0, 0.4, [hq, (batch, hq)][rng.integers(2)])),
        dropout_p=0.0 if rng.random() < 0.75 else 0.3,
        dropout_seed=int(rng.integers(0, 2**40)),
    )  # fmt: skip
    if options["alibi"] is not None:
        options["alibi"] = options["alibi"].float()
    if packed and causal:
        options["causal"] = options["align"]  # a packed call's causal follows its alignment
    sinks = None if rng.random() < 0.8 else torch.tensor(rng.standard_normal(hq)).float().to(device)
    mask = None
    if not packed and rng.random() < 0.3:
        mask = torch.tensor(rng.random((batch, 1, lengths_q[0], lengths_k[0])) < 0.7)
        if rng.random() < 0.5:
            mask = torch.tensor(rng.standard_normal((1, hq, lengths_q[0], lengths_k[0]))).to(dtype)
    cu_q = np.concatenate([[0], np.cumsum(lengths_q)]).astype(np.int64)
    cu_k = np.concatenate([[0], np.cumsum(lengths_k)]).astype(np.int64)

    def make(heads, tokens, width):
        shape = (heads, int(tokens[-1]), width) if packed else (batch, heads, int(tokens[1]), width)
        return torch.tensor(rng.standard_normal(shape)).to(dtype).to(device)

    q, k, v, d_out = make(hq, cu_q, d), make(hkv, cu_k, d), make(hkv, cu_k, dv), make(hq, cu_q, dv)
    description = (f"{dtype} {'packed' if packed else 'dense'} on {device} batch {batch} H {hq}/{hkv} D {d}/{dv} "
                   f"lengths q {lengths_q} k {lengths_k} mask {None if mask is None else mask.dtype} sinks "
                   f"{sinks is not None} {describe(options)}")  # fmt: skip

    def sequence(x, i, offsets):  # sequence i as (H, N, X) float64
        return float64(x[:, offsets[i] : offsets[i + 1]] if packed else x[i])

    def run():
        kernel_options = dict(options, alibi=None if options["alibi"] is None else options["alibi"].to(device))
        if packed:
            out, lse = triton_attention.varlen_forward(q, k, v, cu_q, cu_k, sinks=sinks, **kernel_options)
            grads = triton_attention.varlen_backward(q, k, v, out, d_out, lse, cu_q, cu_k, **kernel_options)
        else:
            device_mask = None if mask is None else mask.to(device)
            out, lse = triton_attention.flash_forward(q, k, v, device_mask, sinks=sinks, **kernel_options)
            grads = triton_attention.flash_backward(q, k, v, device_mask, out, d_out, lse, **kernel_options)
        got = [out.cpu(), lse.cpu(), *(g.cpu() for g in grads), None]  # sinks' gradient: attnkit.sinks, not the kernel
        want = [np.zeros(x.shape) for x in got[:5]]
        want[1][:] = -np.inf  # packed rows of no sequence
        plain = [None, None] + ([np.zeros(x.shape) for x in got[2:5]] if dtype == torch.float16 else [None] * 3)
        slopes, p = float64(options["alibi"]), options["dropout_p"]
        for i in range(batch):
            rows, keys = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
            spec = dict(
                scale=options["scale"], causal=options["causal"] or False,
                align=None if options["causal"] else options["align"],
                window=options["window"], softcap=options["softcap"], sinks=float64(sinks), dropout_p=p,
                mask=None if mask is None else float64(mask)[min(i, mask.shape[0] - 1)],
                alibi_slopes=None if slopes is None else (slopes if slopes.ndim == 1 else slopes[i]),
                dropout_keep=keep_mask(options["dropout_seed"], p, 1, hq, lengths_q[i], lengths_k[i],
                                       first_sequence=i)[0] if p else None,
            )  # fmt: skip
            arrays = [sequence(x, i, offsets) for x, offsets in ((q, cu_q), (k, cu_k), (v, cu_k), (d_out, cu_q))]
            exact, from_rounded = reference_gradients(*arrays, dtype, **spec)
            for whole, part in ((want, exact), (plain, from_rounded)):
                for j, offsets in enumerate((cu_q, cu_q, cu_q, cu_k, cu_k)):
                    if whole[j] is not None:
                        index = slice(offsets[i], offsets[i + 1])
                        if packed:
                            whole[j][:, index] = part[j]
                        else:
                            whole[j][i] = part[j]
        check_results(got, want, plain, dtype)

    return description, run


def odd_layout(rng, x):
    """x, or the same values in another memory layout: reversed strides, a step, Fortran order,
    read-only, a zero-stride (broadcast) leading axis."""
    kind = rng.integers(6)
    if kind == 0:
        return np.ascontiguousarray(x[..., ::-1, :])[..., ::-1, :]
    if kind == 1:
        wide = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    if kind == 2:
        return np.asfortranarray(x)
    if kind == 3:
        x = x.copy()
        x.setflags(write=False)
        return x
    if kind == 4 and x.ndim >= 3 and x.shape[0] == 1:
        return np.broadcast_to(x, x.shape)
    return x


def numpy_arrays(rng, large=False):
    """attnkit.attention on NumPy arrays in odd memory layouts: results, dtypes, inputs left unchanged."""
    dtype = [np.float32, np.float32, np.float64, np.float16][rng.integers(4)]
    lead = [(), (1,), (2,), (1, 2)][rng.integers(4)]
    hkv = int(rng.choice([1, 2]))
    hq = hkv * int(rng.choice([1, 2, 4]))
    nq = int(rng.choice([1, 2, 7, 33, 64, 130] + ([600] if large else [])))
    nk = int(rng.choice([1, 5, 64, 100, 257] + ([900] if large else [])))
    d = int(rng.choice([1, 8, 32, 64, 96]))
    dv = d if rng.random() < 0.7 else int(rng.choice([8, 64]))
    options = dict(
        causal=[False, True, "bottom_right"][rng.integers(3)],
        window=None if rng.random() < 0.7 else (int(rng.integers(0, 20)), None),
        softcap=None if rng.random() < 0.8 else 20.0,
        mask=None,
    )
    if rng.random() < 0.2:
        options["mask"] = odd_layout(rng, rng.random((hq, nq, nk)) < 0.7)
    elif rng.random() < 0.2:
        options["mask"] = odd_layout(rng, rng.standard_normal((1, nq, nk)).astype(dtype))
    shapes = (lead + (hq, nq, d), lead + (hkv, nk, d), lead + (hkv, nk, dv))
    q, k, v = (odd_layout(rng, rng.standard_normal(shape).astype(dtype)) for shape in shapes)
    torch_dtype = {np.float32: torch.float32, np.float64: torch.float64, np.float16: torch.float16}[dtype]
    description = (f"{np.dtype(dtype).name} q{q.shape} k{k.shape} v{v.shape} strides "
                   f"{[x.strides for x in (q, k, v)]} {describe(options)}")  # fmt: skip

    def run():
        before = [x.copy() for x in (q, k, v)]
        out, lse = attnkit.attention(q, k, v, return_lse=True, **options)
        assert isinstance(out, np.ndarray) and out.dtype == dtype, (type(out), getattr(out, "dtype", None))
        for name, x, x_before in zip("qkv", (q, k, v), before):
            np.testing.assert_array_equal(x, x_before, err_msg=f"{name} was changed")
        spec = dict(options, mask=float64(options["mask"]))
        want, want_lse = reference_attention(*(float64(x) for x in (q, k, v)), return_lse=True, **spec)
        check("out", out, want, torch_dtype)
        check("lse", lse, want_lse, torch_dtype)

    return description, run


def compiled(rng, large=False):
    """attention / varlen_attention inside torch.compile(fullgraph=True, backend="aot_eager"): the
    same results and gradients as the eager call (attnkit's torch operators and their fake tensors)."""
    dtype = [torch.float32, torch.bfloat16, torch.float16][rng.integers(3)]
    hkv = int(rng.choice([1, 2]))
    hq = hkv * int(rng.choice([1, 2, 4]))
    nq, nk = int(rng.choice([1, 5, 33, 64])), int(rng.choice([1, 16, 64, 100]))
    d, batch = int(rng.choice([8, 32, 64])), int(rng.choice([1, 2]))
    packed = bool(rng.random() < 0.25)
    options = dict(causal=[False, True, "bottom_right"][rng.integers(3)])
    if rng.random() < 0.3:
        options["window"] = (int(rng.integers(0, 20)), None)
    if rng.random() < 0.3:
        options["softcap"] = 10.0
    if rng.random() < 0.3:
        options["sinks"] = torch.tensor(rng.standard_normal(hq)).float().requires_grad_()
    if rng.random() < 0.2:
        options["alibi_slopes"] = torch.tensor(rng.uniform(0, 0.3, hq)).float()
    if rng.random() < 0.3:
        options.update(dropout_p=0.2, dropout_seed=int(rng.integers(0, 2**40)))
    if not packed and rng.random() < 0.3:
        options["mask"] = torch.tensor(rng.random((hq, nq, nk)) < 0.7)
    with_lse = bool(rng.random() < 0.4)

    def make(shape):
        return torch.tensor(rng.standard_normal(shape)).to(dtype).requires_grad_()

    if packed:
        cu_q = torch.tensor(np.concatenate([[0], np.cumsum(rng.integers(0, nq + 1, batch))]), dtype=torch.int32)
        cu_k = torch.tensor(np.concatenate([[0], np.cumsum(rng.integers(1, nk + 1, batch))]), dtype=torch.int32)
        q, k, v = make((hq, int(cu_q[-1]), d)), make((hkv, int(cu_k[-1]), d)), make((hkv, int(cu_k[-1]), d))
        causal = options.pop("causal")
        options.update(causal=bool(causal), align="top_left" if causal is True else "bottom_right")

        def call(q, k, v):
            return attnkit.varlen_attention(q, k, v, cu_q, cu_k, return_lse=with_lse, **options)
    else:
        q, k, v = make((batch, hq, nq, d)), make((batch, hkv, nk, d)), make((batch, hkv, nk, d))

        def call(q, k, v):
            return attnkit.attention(q, k, v, return_lse=with_lse, **options)

    description = f"{dtype} packed={packed} q{tuple(q.shape)} k{tuple(k.shape)} lse={with_lse} {describe(options)}"

    def run():
        torch._dynamo.reset()  # each case compiles afresh (one function, new closures: dynamo's limit)
        leaves = [x for x in (q, k, v, options.get("sinks")) if x is not None]
        results = []
        for fn in (call, torch.compile(call, fullgraph=True, backend="aot_eager")):
            out = fn(q, k, v)
            out, lse = out if with_lse else (out, None)
            d_out = torch.tensor(np.random.default_rng(1).standard_normal(out.shape)).to(dtype)
            results.append((out, lse, *torch.autograd.grad(out, leaves, d_out)))
        for name, got, want in zip(("out", "lse", "dq", "dk", "dv", "dsinks"), results[1], results[0]):
            if want is not None:
                torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6, msg=lambda m, name=name: f"{name}: {m}")

    return description, run


ENTRY_POINTS = {
    "dense": dense,
    "varlen": varlen,
    "sdpa": sdpa,
    "kv_cache": kv_cache,
    "flash_attn": flash_attn,
    "triton_kernel": triton_kernel,
    "numpy_arrays": numpy_arrays,
    "compiled": compiled,
}


def case_generator(seed, index):
    """The generator of case `index` of a run with this seed: any case can be run again alone."""
    return np.random.default_rng([seed, index])


def run_case(entry_point, seed, index, large=False):
    """Draw and run one case; an AssertionError (or any error) names the case and how to repeat it."""
    description, run = ENTRY_POINTS[entry_point](case_generator(seed, index), large)
    again = f"python tests/random_calls.py {entry_point} --seed {seed} --first {index} --cases 1" + (
        " --large" if large else ""
    )
    try:
        run()
    except Exception as error:
        raise AssertionError(f"{entry_point} case {index}: {description}\n  {type(error).__name__}: {error}\n"
                             f"  again: {again}") from error  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("entry_point", choices=[*ENTRY_POINTS, "all"])
    parser.add_argument("--cases", type=int, default=200, help="cases per entry point (default 200)")
    parser.add_argument("--seed", type=int, default=None, help="the run's seed (default: a new one)")
    parser.add_argument("--first", type=int, default=0, help="the first case's index (default 0)")
    parser.add_argument("--large", action="store_true", help="also draw longer sequences and head sizes to 256")
    args = parser.parse_args(argv)
    seed = np.random.SeedSequence().entropy % 2**32 if args.seed is None else args.seed
    entry_points = list(ENTRY_POINTS) if args.entry_point == "all" else [args.entry_point]
    failed = 0
    for entry_point in entry_points:
        started = time.perf_counter()
        for index in range(args.first, args.first + args.cases):
            try:
                run_case(entry_point, seed, index, args.large)
            except AssertionError as error:
                failed += 1
                print(f"FAIL {error}", flush=True)
        print(f"{entry_point}: {args.cases} cases from {args.first}, seed {seed}, "
              f"{time.perf_counter() - started:.1f} s", flush=True)  # fmt: skip
    print(f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
