"""The Numba flash kernel (attnkit.kernels.numba_attention) against the NumPy reference.

Accuracy rule (flash-attn's): on the same inputs, the kernel's error against the
reference computed in float64 may be at most 2x (3x for gradients) the error of
the reference itself computed in float32, plus a tiny absolute floor.
"""

from __future__ import annotations

import numpy as np
import pytest

from attnkit.kernels import numba_attention as kernel
from attnkit.kernels.cpu import memory
from attnkit.kernels.numba_attention import flash_backward, flash_forward
from attnkit.reference import attention, attention_backward
from attnkit.testing import assert_within_rule

from kernel_cases import Case, make_mask


def make_inputs(case):
    rng = np.random.default_rng(case.seed)
    q = rng.standard_normal((case.b, case.hq, case.nq, case.d))
    k = rng.standard_normal((case.b, case.hkv, case.nk, case.d))
    v = rng.standard_normal((case.b, case.hkv, case.nk, case.dv))
    d_out = rng.standard_normal((case.b, case.hq, case.nq, case.dv))
    return q, k, v, d_out, make_mask(case, rng)


def reference(case, q, k, v, d_out, mask, dtype):
    """Reference forward (out, lse) and gradients computed in `dtype`."""
    q, k, v, d_out = (x.astype(dtype) for x in (q, k, v, d_out))
    if mask is not None and mask.dtype != np.bool_:
        mask = mask.astype(dtype)
    kw = dict(causal=case.causal or False, mask=mask, scale=case.scale, window=case.window, softcap=case.softcap)
    out, lse = attention(q, k, v, return_lse=True, **kw)
    grads = attention_backward(q, k, v, out, d_out, lse, **kw)
    return out, lse, grads


def run_kernel(case, q, k, v, d_out, mask):
    q, k, v, d_out = (x.astype(case.dtype) for x in (q, k, v, d_out))
    kw = dict(scale=case.scale, causal=case.causal, window=case.window, softcap=case.softcap)
    out, lse = flash_forward(q, k, v, mask, **kw)
    grads = flash_backward(q, k, v, mask, out, d_out, lse, **kw)
    return out, lse, grads


def check_case(case):
    q, k, v, d_out, mask = make_inputs(case)
    out, lse, grads = run_kernel(case, q, k, v, d_out, mask)
    out64, lse64, grads64 = reference(case, q, k, v, d_out, mask, np.float64)
    out32, lse32, grads32 = reference(case, q, k, v, d_out, mask, np.float32)

    assert out.dtype == case.dtype and lse.dtype == case.dtype
    assert out.shape == (case.b, case.hq, case.nq, case.dv) and lse.shape == (case.b, case.hq, case.nq)

    # Rows with no visible key: out exactly 0, lse -inf, no gradient through them.
    empty = lse64 == -np.inf
    bad = np.argwhere(empty != (lse == -np.inf))
    assert bad.size == 0, f"lse: -inf rows differ from the reference at {bad[:5].tolist()}"
    assert np.all(out[empty] == 0), f"out: fully masked rows not exactly 0 at {np.argwhere(empty)[:5].tolist()}"
    assert np.all(grads[0][empty] == 0), "dq: fully masked rows not exactly 0"

    assert_within_rule("out", out, out64, out32, 2)
    finite = ~empty
    assert_within_rule("lse", lse[finite], lse64[finite], lse32[finite], 2)
    for name, got, want64, want32 in zip(("dq", "dk", "dv"), grads, grads64, grads32):
        assert got.dtype == case.dtype
        assert_within_rule(name, got, want64, want32, 3)


F32, F64 = np.float32, np.float64
CASES = [
    # sizes at block edges, head dims, dtypes
    Case(nq=1, d=16),
    Case(b=2, nq=2, d=32, causal="top_left", dtype=F64),
    Case(hq=4, nq=127, d=64, causal="top_left"),
    Case(hq=4, nq=129, d=64, causal="bottom_right"),
    Case(nq=511, d=59, dtype=F64),
    Case(b=2, hq=4, hkv=1, nq=1000, d=64, causal="top_left"),
    Case(hq=1, nq=1000, d=32),
    Case(nq=300, d=256, causal="top_left"),
    Case(nq=200, d=80, dv=48),
    # Nq != Nk both ways; bottom-right with Nq > Nk leaves the first rows empty
    Case(nq=129, nk=511, d=59, causal="bottom_right"),
    Case(nq=511, nk=129, d=80, causal="bottom_right"),
    Case(nq=511, nk=129, d=96, causal="top_left", dtype=F64),
    Case(nq=129, nk=511, d=96, causal="top_left"),
    Case(nq=1, nk=1000, d=64, causal="bottom_right"),
    Case(nq=1000, nk=1, d=64),
    Case(nq=257, nk=129, d=128, causal="top_left", window=(16, None)),
    # GQA ratios
    Case(b=2, hq=4, hkv=2, nq=129, d=64, causal="top_left"),
    Case(hq=8, hkv=2, nq=257, d=96, window=(64, 0)),
    Case(hq=8, hkv=1, nq=100, nk=300, d=32, causal="bottom_right", dtype=F64),
    # backward tasks per (batch, kv head): 8 pairs own their kv head outright;
    # 3 query blocks in 2 chunks leave the second chunk one block short
    Case(b=4, hq=8, hkv=2, nq=300, d=64, causal="top_left"),
    Case(b=2, hq=4, hkv=2, nq=257, d=64, mask="add_key_pad"),
    # windows
    Case(nq=300, d=128, window=(32, 32)),
    Case(nq=300, d=32, window=(None, 16)),
    Case(nq=300, d=32, window=(16, None), dtype=F64),
    Case(nq=200, nk=300, d=64, causal="bottom_right", window=(40, None)),
    # softcap
    Case(nq=129, d=256, causal="top_left", softcap=30.0),
    Case(nq=200, d=64, softcap=5.0, mask="add_full", dtype=F64),
    Case(hq=4, hkv=2, nq=129, nk=200, d=64, softcap=2.0, causal="bottom_right"),
    # masks: every form, bool and additive
    Case(b=3, nq=129, nk=300, d=64, mask="bool_key_pad"),
    Case(b=2, nq=129, d=32, mask="add_key_pad", causal="top_left"),
    Case(b=2, hq=4, nq=127, nk=200, d=64, mask="add_full"),
    Case(b=2, hq=4, nq=127, d=64, mask="bool_full", dtype=F64),
    Case(nq=200, nk=129, d=32, mask="bool_shared", causal="bottom_right"),
    Case(nq=200, d=16, mask="add_shared", window=(8, 8)),
    Case(nq=100, nk=511, d=64, mask="add_row"),
    Case(hq=4, hkv=2, nq=100, d=64, mask="bool_head", dtype=F64),
    # scale: negative and large
    Case(nq=129, d=64, scale=-0.3),
    Case(nq=129, d=32, scale=2.0, causal="top_left"),
]

# Decode-shaped calls (Nq <= 16, a GQA group's rows at most 128): the decode backward.
DECODE_BACKWARD_CASES = [
    Case(b=2, hq=8, hkv=2, nq=1, nk=700, d=64, causal="bottom_right"),
    Case(hq=4, hkv=1, nq=16, nk=300, d=59, causal="bottom_right", window=(100, 0)),
    Case(b=3, hq=4, hkv=2, nq=2, nk=300, d=32, mask="bool_key_pad", dtype=F64),
    Case(b=2, hq=4, hkv=4, nq=1, nk=129, d=64, dv=48, mask="add_full"),
    Case(hq=4, hkv=2, nq=3, nk=200, d=64, softcap=2.0, causal="bottom_right"),
    Case(hq=16, hkv=2, nq=16, nk=150, d=32, scale=-0.3),
    Case(hq=2, nq=5, nk=300, d=32, causal="top_left", mask="bool_full"),
    Case(nq=7, nk=16, d=16, window=(None, 3)),
    Case(b=9, hq=8, hkv=4, nq=1, nk=40, d=16, causal="bottom_right"),  # 36 tasks: claimed in runs (schedule.run_queue)
]
CASES += DECODE_BACKWARD_CASES


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_reference(case):
    check_case(case)


@pytest.mark.parametrize("case", DECODE_BACKWARD_CASES + [Case(nq=1, nk=1000, d=64, causal="bottom_right")],
                         ids=lambda c: c.id)  # fmt: skip
def test_decode_shaped_backward_runs_the_decode_backward(case):
    """(test_matches_reference checks its results.) Few query rows: no packing, no partial slots."""
    from attnkit.kernels.numba_attention import recording

    q, k, v, d_out, mask = make_inputs(case)
    with recording() as launches:
        run_kernel(case, q, k, v, d_out, mask)
    assert [x.worker.removesuffix("_serial") for x in launches][-1] == "decode_backward"


@pytest.mark.parametrize("dtype", [F32, F64])
def test_no_keys_gives_zeros_and_minus_inf(dtype):
    q = np.ones((1, 2, 3, 8), dtype)
    k = np.ones((1, 2, 0, 8), dtype)
    v = np.ones((1, 2, 0, 4), dtype)
    out, lse = flash_forward(q, k, v, None, scale=1.0, causal=None, window=None, softcap=None)
    assert out.shape == (1, 2, 3, 4) and out.dtype == dtype and np.all(out == 0)
    assert lse.dtype == dtype and np.all(lse == -np.inf)
    dq, dk, dv = flash_backward(q, k, v, None, out, np.ones_like(out), lse,
                                scale=1.0, causal=None, window=None, softcap=None)  # fmt: skip
    assert dq.shape == q.shape and np.all(dq == 0) and dk.shape == k.shape and dv.shape == v.shape


def test_no_queries_gives_empty():
    q = np.ones((2, 2, 0, 8), np.float32)
    k = np.ones((2, 1, 5, 8), np.float32)
    out, lse = flash_forward(q, k, k, None, scale=1.0, causal="top_left", window=None, softcap=None)
    assert out.shape == (2, 2, 0, 8) and lse.shape == (2, 2, 0)
    dq, dk, dv = flash_backward(q, k, k, None, out, out, lse, scale=1.0, causal="top_left", window=None, softcap=None)
    assert dq.shape == q.shape and np.all(dk == 0) and np.all(dv == 0)


def test_everything_masked_is_exact_zero_not_nan():
    case = Case(b=2, hq=4, hkv=2, nq=70, nk=90, d=32, softcap=3.0)
    q, k, v, d_out, _ = make_inputs(case)
    q, k, v, d_out = (x.astype(np.float32) for x in (q, k, v, d_out))
    for mask in (np.zeros((1, 1, 1, 90), bool), np.full((2, 1, 70, 90), -np.inf, np.float32)):
        kw = dict(scale=0.2, causal=None, window=None, softcap=3.0)
        out, lse = flash_forward(q, k, v, mask, **kw)
        assert np.all(out == 0) and np.all(lse == -np.inf)
        for g in flash_backward(q, k, v, mask, out, d_out, lse, **kw):
            assert np.all(g == 0), "gradient of a fully masked input is not exactly 0"
    # A window that sees nothing (right < -left): no key for any row.
    out, lse = flash_forward(q, k, v, None, scale=0.2, causal=None, window=(-5, -10), softcap=None)
    assert np.all(out == 0) and np.all(lse == -np.inf)


def test_backward_is_deterministic():
    # Few (batch, head) pairs: the backward splits query rows into chunks whose
    # dK/dV partial sums are combined; every run must give the same bits.
    case = Case(b=1, hq=4, hkv=1, nq=700, nk=650, d=64, causal="bottom_right", mask="add_row")
    q, k, v, d_out, mask = make_inputs(case)
    q, k, v, d_out = (x.astype(np.float32) for x in (q, k, v, d_out))
    kw = dict(scale=0.125, causal="bottom_right", window=None, softcap=None)
    out, lse = flash_forward(q, k, v, mask, **kw)
    first = flash_backward(q, k, v, mask, out, d_out, lse, **kw)
    for _ in range(5):
        again = flash_backward(q, k, v, mask, out, d_out, lse, **kw)
        for a, b in zip(first, again):
            assert np.array_equal(a, b)
        out2, lse2 = flash_forward(q, k, v, mask, **kw)
        assert np.array_equal(out, out2) and np.array_equal(lse, lse2)


def test_nan_input_stays_in_its_row():
    q = np.random.default_rng(0).standard_normal((1, 2, 40, 16)).astype(np.float32)
    k = q.copy()
    q[0, 1, 7, 3] = np.nan
    out, lse = flash_forward(q, k, k, None, scale=0.25, causal=None, window=None, softcap=None)
    assert np.isnan(out[0, 1, 7]).all() and np.isnan(lse[0, 1, 7])
    clean = np.ones(out.shape[:3], bool)
    clean[0, 1, 7] = False
    assert np.isfinite(out[clean]).all() and np.isfinite(lse[clean]).all()


def test_inputs_are_not_modified():
    case = Case(nq=100, d=32, mask="add_full")
    q, k, v, d_out, mask = make_inputs(case)
    q, k, v, d_out = (x.astype(np.float32) for x in (q, k, v, d_out))
    copies = [x.copy() for x in (q, k, v, d_out, mask)]
    kw = dict(scale=0.1, causal="top_left", window=None, softcap=None)
    out, lse = flash_forward(q, k, v, mask, **kw)
    flash_backward(q, k, v, mask, out, d_out, lse, **kw)
    for x, c in zip((q, k, v, d_out, mask), copies):
        assert np.array_equal(x, c)


def test_uncacheable_location_falls_back_to_no_cache(monkeypatch):
    # Numba raises RuntimeError when no cache directory is writable (read-only
    # installs): no locator takes the file. The module must still work there.
    from numba.core import caching

    from attnkit.kernels import jit as jit_module

    monkeypatch.setattr(caching.CacheImpl, "_locator_classes", [])

    @jit_module.jit()
    def add_one(x):
        return x + 1

    assert isinstance(add_one._cache, caching.NullCache)
    assert add_one(1) == 2


def test_warmup_runs():
    kernel.warmup(["float32", "float64"], backward=False)


def test_a_changed_kernel_source_discards_the_cache(tmp_path):
    """Numba checks only a function's own file; an edit to a helper module must still recompile."""
    from attnkit.kernels.jit import discard_stale_cache

    (tmp_path / "kernel.py").write_text("x = 1\n")
    (tmp_path / "helper.py").write_text("y = 1\n")
    cache = tmp_path / "__pycache__"
    cache.mkdir()
    (cache / "kernel.f-10.py311.nbi").write_text("old")
    assert discard_stale_cache(tmp_path) is True  # no stamp yet: built from unknown sources
    assert not (cache / "kernel.f-10.py311.nbi").exists()
    (cache / "kernel.f-10.py311.nbi").write_text("fresh")
    assert discard_stale_cache(tmp_path) is False  # same sources: kept
    assert (cache / "kernel.f-10.py311.nbi").exists()
    (tmp_path / "helper.py").write_text("y = 2\n")  # only the helper changes
    assert discard_stale_cache(tmp_path) is True
    assert not (cache / "kernel.f-10.py311.nbi").exists()
    # a kernel in a subfolder (kernels/cpu/) calling a helper of the folder above
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "worker.py").write_text("z = 1\n")
    discard_stale_cache(tmp_path)
    (tmp_path / "cpu" / "__pycache__" / "worker.w-3.py311.nbi").write_text("fresh")
    assert discard_stale_cache(tmp_path) is False
    (tmp_path / "helper.py").write_text("y = 3\n")
    assert discard_stale_cache(tmp_path) is True
    assert not (tmp_path / "cpu" / "__pycache__" / "worker.w-3.py311.nbi").exists()


def test_a_changed_kernel_source_discards_a_numba_cache_dir(tmp_path, monkeypatch):
    """With NUMBA_CACHE_DIR (the emulated targets' tests, shared caches) the folder Numba uses there is checked."""
    from numba.core import config

    from attnkit.kernels.jit import cache_folder, discard_stale_cache

    sources, caches = tmp_path / "kernels", tmp_path / "caches"
    sources.mkdir()
    (sources / "helper.py").write_text("y = 1\n")
    monkeypatch.setattr(config, "CACHE_DIR", str(caches))
    folder = cache_folder(sources)
    assert folder.parent == caches and folder.name.startswith("kernels_")
    discard_stale_cache(sources)
    (folder / "kernel.f-10.py311.nbi").write_text("fresh")
    assert discard_stale_cache(sources) is False
    (sources / "helper.py").write_text("y = 2\n")
    assert discard_stale_cache(sources) is True
    assert not (folder / "kernel.f-10.py311.nbi").exists()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_arrays_together_are_aligned_disjoint_views(dtype):
    shapes = ((1, 3, 5, 7), (2, 1, 4), (0, 3), (9,))
    arrays = memory.arrays_together(dtype, shapes, zero=True)
    for array, shape in zip(arrays, shapes):
        assert array.shape == shape and array.dtype == dtype and array.flags.c_contiguous
        assert array.size == 0 or array.ctypes.data % 64 == 0, f"{shape}: not 64-byte aligned"
        assert np.all(array == 0)
    for i, array in enumerate(arrays):  # writing one leaves the others untouched
        array[...] = i + 1
    for i, array in enumerate(arrays):
        assert np.all(array == i + 1), f"array {i} overlaps another"


def test_workspace_hands_out_zeroed_views_and_drops_big_requests():
    workspace = memory.Workspace(keep_bytes=4096)
    first = workspace.zeroed(np.float64, ((3, 10), (3, 5)))
    for array in first:
        array[...] = 7.0  # dirty the kept buffer
    again = workspace.zeroed(np.float32, ((4, 20),))  # same buffer, another dtype
    assert again[0].dtype == np.float32 and np.all(again[0] == 0)
    assert np.shares_memory(again[0], workspace.buffer)
    big = workspace.zeroed(np.float32, ((64, 64),))  # 16 KiB > keep_bytes: fresh, not kept
    assert np.all(big[0] == 0) and not np.shares_memory(big[0], workspace.buffer)
    assert workspace.buffer.nbytes <= 4096


def test_backward_with_uncached_partials_matches_reference(monkeypatch):
    # Partial sums over the keep limit take freshly allocated memory instead.
    monkeypatch.setattr(memory.WORKSPACE, "keep_bytes", 0)
    check_case(Case(hq=8, hkv=2, nq=257, d=64, causal="top_left"))

