"""The benchmark's peer runtimes (bench/peer_runtimes.py) compute attention: each against attnkit's
reference on fresh random inputs, where the runtime is installed (attnkit[peers]); skipped with the
reason where it is not."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from attnkit.bench.peer_runtimes import PEER_DTYPES, import_openvino, run_peer
from attnkit.reference import attention

MODULES = {"jax-xla": "jax", "onnxruntime-attention": "onnxruntime", "onnxruntime-gqa": "onnxruntime",
           "openvino-sdpa": "openvino"}  # fmt: skip


def needs(name):
    try:
        if name == "openvino-sdpa":
            import_openvino()  # telemetry off, as the benchmark imports it
        importlib.import_module(MODULES[name])
    except ImportError as error:
        pytest.skip(f"{MODULES[name]} is not installed ({error}); pip install 'attnkit[peers]'")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("hq, hkv", [(4, 4), (8, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("name", list(PEER_DTYPES))
def test_peer_matches_the_reference(name, hq, hkv, causal):
    needs(name)
    rng = np.random.default_rng(hq + hkv + causal)
    q = rng.standard_normal((2, hq, 37, 32))
    k, v = (rng.standard_normal((2, hkv, 37, 32)) for _ in range(2))
    if name == "onnxruntime-gqa" and not causal:
        with pytest.raises(ValueError, match="causal only"):
            run_peer(name, *(x.astype(np.float32) for x in (q, k, v)), causal)
        return
    out = run_peer(name, *(x.astype(np.float32) for x in (q, k, v)), causal)
    want = attention(q, k, v, causal=causal)
    assert out.shape == want.shape
    np.testing.assert_allclose(out.astype(np.float64), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", [n for n in PEER_DTYPES if n != "onnxruntime-gqa"])
def test_peer_decodes_one_query_against_a_cache(name):
    needs(name)
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 8, 1, 32))
    k, v = (rng.standard_normal((2, 2, 300, 32)) for _ in range(2))
    out = run_peer(name, *(x.astype(np.float32) for x in (q, k, v)), False)
    np.testing.assert_allclose(out.astype(np.float64), attention(q, k, v), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", [n for n, dtypes in PEER_DTYPES.items() if "bfloat16" in dtypes])
def test_peer_in_bf16_is_within_bf16_error(name):
    needs(name)
    import ml_dtypes

    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 4, 40, 32)) for _ in range(3))
    out = run_peer(name, *(x.astype(ml_dtypes.bfloat16) for x in (q, k, v)), True)
    want = attention(*(x.astype(ml_dtypes.bfloat16).astype(np.float64) for x in (q, k, v)), causal=True)
    assert np.abs(out.astype(np.float64) - want).max() < 3e-2  # a few bf16 ulps of values below ~4
