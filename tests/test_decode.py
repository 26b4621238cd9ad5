"""Decode (flash-decoding): few queries against many keys, keys split across cores, partials merged by lse."""

from __future__ import annotations

import math

import numpy as np
import pytest

from attnkit.kernels import numba_attention as kernel
from attnkit.kernels.cpu import decode
from attnkit.kernels.bf16 import bf16_bits, bf16_to_float32
from attnkit.reference import attention

from attnkit.testing import assert_within_rule


def _assert_matches_the_reference(out, lse, q, k, v, dtype, **options):
    """out and lse within the error rule of the float64 reference on q, k, v (bf16 inputs: the
    float64 values of their bits), against the float32 reference's own error (bf16: rounded to bf16)."""
    out64, lse64 = attention(q, k, v, return_lse=True, **options)
    out32, lse32 = attention(*(x.astype(np.float32) for x in (q, k, v)), return_lse=True, **options)
    if dtype == np.uint16:
        out, out32 = bf16_to_float32(out), bf16_to_float32(bf16_bits(out32))
    assert_within_rule("out", out, out64, out32, 2)
    assert_within_rule("lse", lse, lse64, lse32, 2)


CASES = [
    # (B, Hq, Hkv, Nq, Nk, D, causal, window, mask)
    (1, 4, 1, 1, 1, 64, None, None, None),
    (1, 4, 2, 1, 255, 64, None, None, None),  # just below the decode path
    (1, 32, 8, 1, 1024, 128, None, None, None),
    (1, 8, 2, 16, 2049, 64, "bottom_right", (100, 0), None),
    (2, 4, 4, 3, 1000, 80, "bottom_right", None, None),
    (3, 4, 2, 1, 700, 32, None, None, "key_padding"),
    (2, 4, 2, 2, 1500, 64, None, None, "bool_full"),
    (1, 4, 1, 1, 10000, 64, None, None, None),
    (1, 2, 2, 5, 300, 32, "top_left", None, None),  # Nq > 1, top-left: later keys hidden
    (1, 6, 3, 7, 4097, 59, None, (None, 0), None),  # odd head dim: V padded a block at a time
    (2, 8, 8, 1, 777, 64, None, None, "key_padding"),  # MHA: one row per tile, P V four keys a step (777 = 4k + 1)
    (1, 4, 4, 1, 1500, 128, "bottom_right", (300, 0), None),
    (1, 8, 2, 1, 333, 40, None, None, "key_padding"),  # 4 rows a tile: both products a key at a time, D 40
    (1, 6, 2, 1, 515, 64, None, None, None),  # 3 rows (bf16: one pass over key pairs), an odd block of 3 keys
    (1, 14, 2, 1, 601, 48, "bottom_right", (200, 0), None),  # 7 rows: 4 + 3, an odd last block
    (5, 10, 10, 1, 50, 16, None, None, None),  # 50 tasks: claimed in runs, the last one short (schedule.run_queue)
    (6, 12, 6, 2, 80, 32, "bottom_right", None, None),  # 36 tasks of 4 rows, in runs
]


def case_id(case):
    b, hq, hkv, nq, nk, d, causal, window, mask = case
    parts = [f"B{b}", f"H{hq}kv{hkv}", f"Nq{nq}-Nk{nk}", f"D{d}"]
    if causal:
        parts.append(f"causal_{causal}")
    if window:
        parts.append(f"window_{window[0]}_{window[1]}")
    if mask:
        parts.append(mask)
    return "-".join(parts)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16], ids=["float32", "float64", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_decode_against_reference(case, dtype):
    """bf16 (bits, uint16) takes the decode kernel wherever float32 does: K / V widened as read."""
    b, hq, hkv, nq, nk, d, causal, window, mask_kind = case
    rng = np.random.default_rng(nk + nq)
    q = rng.standard_normal((b, hq, nq, d))
    k, v = (rng.standard_normal((b, hkv, nk, d)) for _ in range(2))
    if dtype == np.uint16:  # the reference runs on the bf16 values
        bits = [bf16_bits(x) for x in (q, k, v)]
        q, k, v = (bf16_to_float32(x).astype(np.float64) for x in bits)
    mask = None
    if mask_kind == "key_padding":  # one sequence fully padded, one of five keys
        lengths = np.array([0, 5, nk])[:b]
        mask = np.arange(nk)[None, None, None, :] < lengths[:, None, None, None]
    elif mask_kind == "bool_full":
        mask = rng.random((b, 1, nq, nk)) < 0.5
        mask[:, :, 0, 600:] = False
    scale = 1.0 / math.sqrt(d)
    options = dict(scale=scale, causal=causal, window=window, softcap=None)
    inputs = bits if dtype == np.uint16 else [x.astype(dtype) for x in (q, k, v)]
    with kernel.recording() as launches:
        out, lse = kernel.flash_forward(*inputs, mask, **options)
    with kernel.recording() as float32_launches:
        kernel.flash_forward(*(x.astype(np.float32) for x in (q, k, v)), mask, **options)
    # the same kernel; serial or not follows the machine's load at the time (kernels/cpu/threads.py)
    assert [x.worker.removesuffix("_serial") for x in launches] == [
        x.worker.removesuffix("_serial") for x in float32_launches]
    kw = dict(mask=mask, scale=scale, causal=causal or False, window=window, return_lse=True)
    out64, lse64 = attention(q, k, v, **kw)
    out32, lse32 = attention(*(x.astype(np.float32) for x in (q, k, v)), **kw)
    empty = lse64 == -np.inf
    assert np.array_equal(empty, lse == -np.inf)
    assert np.all(out[empty] == 0)
    if dtype == np.float64:
        np.testing.assert_allclose(out, out64, atol=1e-12)
        return
    if dtype == np.uint16:  # bf16 out; the plain implementation's output rounded to bf16 too
        assert out.dtype == np.uint16 and lse.dtype == np.float32
        out, out32 = bf16_to_float32(out), bf16_to_float32(bf16_bits(out32))
    assert_within_rule("out", out, out64, out32, 2)
    assert_within_rule("lse", lse[~empty], lse64[~empty], lse32[~empty], 2)


@pytest.mark.parametrize("dtype", [np.float32, np.uint16], ids=["float32", "bf16"])
def test_decode_splits_keys_when_there_are_few_heads(monkeypatch, dtype):
    import numba

    monkeypatch.setattr(kernel, "worker_count", numba.get_num_threads)  # all threads, however busy the machine
    if numba.get_num_threads() == 1:
        pytest.skip("one thread: nothing to split the keys across")
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 4, 1, 64))
    k, v = (rng.standard_normal((1, 1, 5000, 64)) for _ in range(2))
    if dtype == np.uint16:
        inputs = [bf16_bits(x) for x in (q, k, v)]
        q, k, v = (bf16_to_float32(x).astype(np.float64) for x in inputs)
    else:
        inputs = [x.astype(dtype) for x in (q, k, v)]
    with kernel.recording() as launches:
        out, lse = kernel.flash_forward(*inputs, None, scale=0.125, causal=None, window=None, softcap=None)
    assert [launch.worker for launch in launches] == ["decode"] and launches[0].n_splits > 1
    out64, lse64 = attention(q, k, v, scale=0.125, return_lse=True)
    out32, lse32 = attention(*(x.astype(np.float32) for x in (q, k, v)), scale=0.125, return_lse=True)
    if dtype == np.uint16:  # the partials merge in float32, rounded to bf16 once
        out, out32 = bf16_to_float32(out), bf16_to_float32(bf16_bits(out32))
    assert_within_rule("out", out, out64, out32, 2)
    assert_within_rule("lse", lse, lse64, lse32, 2)


@pytest.mark.parametrize("dtype", [np.float32, np.uint16], ids=["float32", "bf16"])
@pytest.mark.parametrize("dv", [59, 48, 8, 1])
def test_any_value_width_takes_the_decode_kernel(dv, dtype):
    """V rows not a multiple of 16 wide are padded a block at a time (the P V product reads whole
    16-column groups), not sent down the prefill path."""
    rng = np.random.default_rng(dv)
    q = rng.standard_normal((2, 8, 3, 64))
    k, v = rng.standard_normal((2, 2, 300, 64)), rng.standard_normal((2, 2, 300, dv))
    inputs = [x.astype(np.float32) for x in (q, k, v)]
    if dtype == np.uint16:
        inputs = [bf16_bits(x) for x in (q, k, v)]
        q, k, v = (bf16_to_float32(x).astype(np.float64) for x in inputs)
    options = dict(scale=0.125, causal="bottom_right", window=None, softcap=None)
    with kernel.recording() as launches:
        out, _ = kernel.flash_forward(*inputs, None, **options)
    assert [x.worker.removesuffix("_serial") for x in launches] == ["decode"]
    kw = dict(scale=0.125, causal="bottom_right")
    out64 = attention(q, k, v, **kw)
    out32 = attention(*(x.astype(np.float32) for x in (q, k, v)), **kw)
    if dtype == np.uint16:
        out, out32 = bf16_to_float32(out), bf16_to_float32(bf16_bits(out32))
    assert_within_rule("out", out, out64, out32, 2)


@pytest.mark.parametrize("hq", [16, 14], ids=["8-rows", "7-rows"])
@pytest.mark.parametrize("cache_bytes", [0, 1 << 40], ids=["kv-larger-than-the-cache", "kv-in-the-cache"])
def test_float32_groups_of_eight_rows_read_keys_in_order_when_the_cache_cannot_hold_them(monkeypatch, cache_bytes, hq):
    """Tiles of 8 or 7 rows (GQA 16/2, 14/2): a key at a time, K and V in memory order (the dot
    products 4 + 4 or 4 + 2 + 1 rows at once), when float32 K / V exceed the last-level cache; the
    micro-kernel when they fit. Both against the reference."""
    monkeypatch.setattr(kernel, "last_level_cache_bytes", lambda: cache_bytes)
    nk = (700 if cache_bytes else 701) + 2 * (hq == 14)  # other shapes: no plan of another setting is reused
    rng = np.random.default_rng(nk)
    q = rng.standard_normal((2, hq, 1, 64))
    k, v = (rng.standard_normal((2, 2, nk, 64)) for _ in range(2))
    mask = np.arange(nk)[None, None, None, :] < np.array([nk, 300])[:, None, None, None]
    options = dict(scale=0.125, causal=None, window=None, softcap=None)
    with kernel.recording() as launches:
        out, lse = kernel.flash_forward(*(x.astype(np.float32) for x in (q, k, v)), mask, **options)
    assert [x.worker.removesuffix("_serial") for x in launches] == ["decode"]
    assert launches[0].in_order_rows == (5 if cache_bytes else 9)
    kw = dict(mask=mask, scale=0.125, return_lse=True)
    out64, lse64 = attention(q, k, v, **kw)
    out32, lse32 = attention(*(x.astype(np.float32) for x in (q, k, v)), **kw)
    assert_within_rule("out", out, out64, out32, 2)
    assert_within_rule("lse", lse, lse64, lse32, 2)


@pytest.mark.parametrize("dtype", [np.float32, np.uint16], ids=["float32", "bf16"])
@pytest.mark.parametrize("hq, batch", [(2, 3), (4, 1), (6, 2), (8, 1)], ids=["1-row", "2-rows", "3-rows", "4-rows"])
@pytest.mark.parametrize("cache_bytes", [0, 1 << 40], ids=["kv-larger-than-the-cache", "kv-in-the-cache"])
def test_decode_reads_ahead_only_when_the_cache_cannot_hold_kv(monkeypatch, cache_bytes, hq, batch, dtype):
    """K and V larger than the cache: the dot products prefetch K 16 keys ahead and V's row of the
    same key (past the last key too, which must be harmless); the same results as the reference
    either way. 1-4 rows a tile; a single (batch, kv head) splits its keys across the workers; an
    odd last block (1031 keys = 512 + 512 + 7)."""
    monkeypatch.setattr(kernel, "last_level_cache_bytes", lambda: cache_bytes)
    nk = (1031 if cache_bytes else 1030) + 4 * hq + (dtype == np.uint16)  # no plan of another setting is reused
    rng = np.random.default_rng(nk)
    q = rng.standard_normal((batch, hq, 1, 64))
    k, v = (rng.standard_normal((batch, 2, nk, 64)) for _ in range(2))
    mask = np.arange(nk)[None, None, None, :] < rng.integers(nk // 2, nk + 1, batch)[:, None, None, None]
    if dtype == np.uint16:
        bits = [bf16_bits(x) for x in (q, k, v)]
        q, k, v = (bf16_to_float32(x).astype(np.float64) for x in bits)  # the reference runs on the bf16 values
    else:
        bits = [x.astype(np.float32) for x in (q, k, v)]
    with kernel.recording() as launches:
        out, lse = kernel.flash_forward(*bits, mask, scale=0.125, causal=None, window=None, softcap=None)
    assert [(x.worker.removesuffix("_serial"), x.read_ahead) for x in launches] == [("decode", not cache_bytes)]
    _assert_matches_the_reference(out, lse, q, k, v, dtype, mask=mask, scale=0.125)


_BLOCK = decode._PV_COLUMNS  # output columns a row that the in-order P V holds in registers


@pytest.mark.parametrize("dtype", [np.float32, np.uint16], ids=["float32", "bf16"])
@pytest.mark.parametrize("hq", [4, 6, 8], ids=["2-rows", "3-rows", "4-rows"])
@pytest.mark.parametrize("dv", [_BLOCK - 7, 2 * _BLOCK, 2 * _BLOCK + 9],
                         ids=["under-a-block", "blocks", "blocks-and-tail"])  # fmt: skip
def test_in_order_p_v_of_any_value_width_matches_the_reference(monkeypatch, dv, hq, dtype):
    """P V of a tile read in order: four rows take the output a block of columns at a time, held in
    registers across the key block (decode._pv_four_rows_blocked), then the columns past the last
    whole block; two and three rows the columns' loops alone. V widths under a block, of whole
    blocks, and with a tail, against the reference."""
    monkeypatch.setattr(kernel, "last_level_cache_bytes", lambda: 0)  # float32 in order too
    nk = 300 + 7 * hq + dv % 5 + (dtype == np.uint16)  # no plan of another setting is reused
    rng = np.random.default_rng(nk + dv)
    q, k = rng.standard_normal((2, hq, 1, 32)), rng.standard_normal((2, 2, nk, 32))
    v = rng.standard_normal((2, 2, nk, dv))
    mask = np.arange(nk)[None, None, None, :] < np.array([nk, 130])[:, None, None, None]
    if dtype == np.uint16:
        bits = [bf16_bits(x) for x in (q, k, v)]
        q, k, v = (bf16_to_float32(x).astype(np.float64) for x in bits)
    else:
        bits = [x.astype(np.float32) for x in (q, k, v)]
    with kernel.recording() as launches:
        out, lse = kernel.flash_forward(*bits, mask, scale=0.2, causal=None, window=None, softcap=None)
    assert [x.worker.removesuffix("_serial") for x in launches] == ["decode"]
    assert launches[0].in_order_rows > hq // 2  # the tile's rows read the keys in order
    _assert_matches_the_reference(out, lse, q, k, v, dtype, mask=mask, scale=0.2)


@pytest.mark.parametrize("cache_bytes", [0, 1 << 40], ids=["kv-larger-than-the-cache", "kv-in-the-cache"])
@pytest.mark.parametrize("hq", [16, 10], ids=["8-rows", "5-rows"])
def test_bf16_groups_of_up_to_eight_rows_read_keys_in_order_wherever_they_are(monkeypatch, cache_bytes, hq):
    """bf16 tiles of 5-8 rows read the keys in order from memory and from the cache alike (each
    key's elements widened once per four rows), against the reference."""
    monkeypatch.setattr(kernel, "last_level_cache_bytes", lambda: cache_bytes)
    nk = (640 if cache_bytes else 641) + 2 * (hq == 10)  # no plan of another setting is reused
    rng = np.random.default_rng(nk)
    q = rng.standard_normal((2, hq, 1, 64))
    k, v = (rng.standard_normal((2, 2, nk, 64)) for _ in range(2))
    mask = np.arange(nk)[None, None, None, :] < np.array([nk, 250])[:, None, None, None]
    bits = [bf16_bits(x) for x in (q, k, v)]
    with kernel.recording() as launches:
        out, lse = kernel.flash_forward(*bits, mask, scale=0.125, causal=None, window=None, softcap=None)
    assert [x.worker.removesuffix("_serial") for x in launches] == ["decode"]
    assert launches[0].in_order_rows == 9
    q, k, v = (bf16_to_float32(x).astype(np.float64) for x in bits)  # the reference runs on the bf16 values
    out64, lse64 = attention(q, k, v, mask=mask, scale=0.125, return_lse=True)
    out32, lse32 = attention(*(x.astype(np.float32) for x in (q, k, v)), mask=mask, scale=0.125, return_lse=True)
    assert out.dtype == np.uint16  # bf16 out; the plain implementation's output rounded to bf16 too
    assert_within_rule("out", bf16_to_float32(out), out64, bf16_to_float32(bf16_bits(out32)), 2)
    assert_within_rule("lse", lse, lse64, lse32, 2)


def _cache_view(kind, values):
    """A (B, H, N, D) view of another layout made from the array `values` (B, H, N, D): what a caller
    may hand a decode. The overlapping views hold other values than `values`: compare with what they hold."""
    b, h, n, d = values.shape
    if kind == "flash_attn_layout":  # (B, N, H, D) memory: read in place
        return np.ascontiguousarray(values.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    if kind == "rows_reversed":  # a reversed NumPy view: the rows run backwards in memory
        return np.ascontiguousarray(values[:, :, ::-1])[:, :, ::-1]
    if kind == "heads_reversed":
        return np.ascontiguousarray(values.transpose(0, 2, 1, 3)[:, :, ::-1]).transpose(0, 2, 1, 3)[:, ::-1]
    item = values.itemsize
    row_step = {"rows_overlapping": item, "rows_repeated": 0}[kind]  # an unfolded sequence, an expanded key
    strides = (h * n * d * item, n * d * item, row_step, item)
    return np.lib.stride_tricks.as_strided(np.ascontiguousarray(values), (b, h, n, d), strides, writeable=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16], ids=["float32", "float64", "bf16"])
@pytest.mark.parametrize(
    "kind", ["flash_attn_layout", "rows_reversed", "heads_reversed", "rows_overlapping", "rows_repeated"]
)
def test_decode_reads_what_any_strided_cache_holds(kind, dtype):
    """K and V that are not C-contiguous: the decode kernel reads flash-attn's layout in place and
    copies what it cannot read so (rows that overlap or run backwards: float64's BLAS products take a
    row's stride as a leading dimension). Before the copy, such float64 caches gave wrong values or NaN."""
    rng = np.random.default_rng(len(kind))
    arrays = [rng.standard_normal(shape) for shape in ((2, 8, 3, 64), (2, 2, 300, 64), (2, 2, 300, 64))]
    arrays = [bf16_bits(x) if dtype == np.uint16 else x.astype(dtype) for x in arrays]
    q, k, v = arrays[0], *(_cache_view(kind, x) for x in arrays[1:])
    with kernel.recording() as launches:
        out, lse = kernel.flash_forward(q, k, v, None, scale=0.125, causal="bottom_right", window=None, softcap=None)
    assert [x.worker.removesuffix("_serial") for x in launches] == ["decode"]
    held = [(bf16_to_float32(np.ascontiguousarray(x)) if dtype == np.uint16 else x).astype(np.float64)
            for x in (q, k, v)]  # fmt: skip
    _assert_matches_the_reference(out, lse, *held, dtype, scale=0.125, causal="bottom_right")
