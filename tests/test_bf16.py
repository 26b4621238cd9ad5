"""Low precision on the CPU: the micro-kernels' products (bf16 and float32), the kernel in bf16,
fp16 and torch's precision setting.

Accuracy rule (flash-attn's): against a float64 reference on the same (bf16)
inputs, the kernel's error may be at most 2x (forward) or 3x (gradients) the
error of the reference computed in float32 on those inputs and rounded to the
output dtype, plus a tiny floor.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import attnkit
from attnkit.kernels import microkernels as bf16
from attnkit.kernels.numba_attention import flash_backward, flash_forward
from attnkit.reference import attention, attention_backward

from attnkit.testing import assert_within_rule

from kernel_cases import Case, make_mask

needs_bf16_cpu = pytest.mark.skipif(
    bf16.BF16_PRODUCTS == "fp32", reason=f"bf16 micro-kernel not in use here: {bf16.BF16_DETAIL}"
)


def run_python(script, **environment):
    """stdout of `python -c script` in a fresh process with these environment variables set
    (the micro-kernel paths are chosen at import, so a forced path needs its own process)."""
    result = subprocess.run([sys.executable, "-c", script], env={**os.environ, **environment},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def as_float(bits):
    return bf16.bf16_to_float32(bits)


# ---------------------------------------------------------------------------
# The building blocks
# ---------------------------------------------------------------------------


def test_bf16_rounding_matches_torch():
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.standard_normal(10_000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 10_000),
        np.array([0.0, -0.0, np.inf, -np.inf, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 3.4e38], np.float32),
    ]).astype(np.float32)  # fmt: skip
    expected = torch.from_numpy(x).bfloat16().view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bf16.bf16_bits(x), expected)
    np.testing.assert_array_equal(as_float(expected), torch.from_numpy(expected.view(np.int16)).view(torch.bfloat16).float().numpy())
    nan = bf16.bf16_bits(np.array([np.nan], np.float32))
    assert np.isnan(as_float(nan)).all()


# AMX covers C in 16-row x 16-column tiles and the reduction in chunks of 16 pairs: (37, 45, 41)
# has a last row tile of 5 rows, a lone last column tile and a chunk plus a 5-pair tail.
@needs_bf16_cpu
@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (7, 33, 5), (6, 64, 64), (13, 130, 63), (128, 512, 64), (130, 70, 512),
                                     (37, 45, 41), (16, 16, 32), (33, 48, 66)], ids=lambda x: str(x))
@pytest.mark.parametrize("accumulate", [False, True], ids=["overwrite", "accumulate"])
def test_gemm_against_float64(m, n, k, accumulate):
    rng = np.random.default_rng(m * 1000 + n + k)
    a = bf16.bf16_bits(rng.standard_normal((m, k)))
    b = bf16.bf16_bits(rng.standard_normal((k, n)))
    pairs = (k + 1) // 2
    a_padded = np.zeros((m, 2 * pairs + 2), np.uint16)  # a wider row than needed: lda is read
    a_padded[:, :k] = a
    b_packed = np.full((pairs, 2 * bf16.padded(n, 16) + 6), 7, np.uint16)  # garbage past the packing
    bf16.pack_pairs(b, b_packed)
    c = rng.standard_normal((m, bf16.padded(n, 16))).astype(np.float32)
    start = c.copy()
    bf16.gemm(a_padded, b_packed, c, m, n, pairs, accumulate)
    expected = as_float(a).astype(np.float64) @ as_float(b).astype(np.float64)
    if accumulate:
        expected += start[:, :n]
    err = np.abs(c[:, :n] - expected)
    bound = 1e-6 * (np.abs(as_float(a)).astype(np.float64) @ np.abs(as_float(b)) + np.abs(start[:, :n]) + 1) * k
    assert (err <= bound).all(), f"max error {err.max():.3g} at {np.unravel_index(err.argmax(), err.shape)}"


@pytest.mark.skipif(bf16.F32_PRODUCTS != "fma", reason=bf16.F32_DETAIL)
@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (7, 33, 5), (6, 64, 64), (13, 130, 63), (128, 512, 64), (130, 70, 512)],
                         ids=lambda x: str(x))
@pytest.mark.parametrize("accumulate", [False, True], ids=["overwrite", "accumulate"])
def test_gemm_f32_against_float64(m, n, k, accumulate):
    rng = np.random.default_rng(m * 1000 + n + k)
    a = np.zeros((m, k + 3), np.float32)  # a wider row than needed: lda is read
    a[:, :k] = rng.standard_normal((m, k))
    b = np.full((k, bf16.padded(n, 16) + 5), 7.0, np.float32)  # finite garbage past column n
    b[:, :n] = rng.standard_normal((k, n))
    c = rng.standard_normal((m, bf16.padded(n, 16))).astype(np.float32)
    start = c.copy()
    bf16.gemm_f32(a, b, c, m, n, k, accumulate)
    expected = a[:, :k].astype(np.float64) @ b[:, :n] + (start[:, :n] if accumulate else 0)
    err = np.abs(c[:, :n] - expected)
    bound = 2e-7 * (np.abs(a[:, :k]).astype(np.float64) @ np.abs(b[:, :n]) + np.abs(start[:, :n]) + 1) * (k + 1)
    assert (err <= bound).all(), f"max error {err.max():.3g} at {np.unravel_index(err.argmax(), err.shape)}"


def test_forced_blas_path_for_float32():
    """ATTNKIT_CPU_F32=blas (what a CPU without AVX-512 gets): float32 forward through the BLAS, still exact."""
    script = (
        "import numpy as np, attnkit\n"
        "from attnkit.kernels import microkernels\n"
        "from attnkit.reference import attention\n"
        "rng = np.random.default_rng(0)\n"
        "q, k, v = (rng.standard_normal((2, 4, 300, 80)).astype(np.float32) for _ in range(3))\n"
        "print(microkernels.F32_PRODUCTS)\n"
        "out = attnkit.attention(q, k, v, causal=True)\n"
        "print('error', np.abs(out - attention(*(x.astype(np.float64) for x in (q, k, v)), causal=True)).max())\n"
        "from attnkit.kernels.numba_attention import flash_backward, flash_forward\n"
        "from attnkit.reference import attention_backward\n"
        "kw = dict(scale=0.1, causal='top_left', window=None, softcap=None)\n"
        "o, l = flash_forward(q, k, v, None, **kw)\n"
        "grads = flash_backward(q, k, v, None, o, q, l, **kw)\n"
        "q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))\n"
        "o64, l64 = attention(q64, k64, v64, scale=0.1, causal=True, return_lse=True)\n"
        "want = attention_backward(q64, k64, v64, o64, q64, l64, scale=0.1, causal=True)\n"
        "print('grad_error', max(np.abs(g - w).max() for g, w in zip(grads, want)))\n"
    )
    stdout = run_python(script, ATTNKIT_CPU_F32="blas")
    assert stdout.split()[0] == "blas"
    assert float(stdout.split("grad_error")[0].split("error")[-1]) < 1e-5
    assert float(stdout.split("grad_error")[-1]) < 1e-4


def test_environment_variable_is_checked(monkeypatch):
    """A bad setting is kept as an error and raised at the call (import stays possible: `attnkit info` says it)."""
    monkeypatch.setenv("ATTNKIT_CPU_F32", "avx2")
    path, _, error = bf16.choose_f32_path()
    assert path == bf16.F32_PRODUCTS and error == "ATTNKIT_CPU_F32 must be one of auto, fma, blas; got 'avx2'"
    monkeypatch.setenv("ATTNKIT_CPU_BF16", "tmul")
    assert bf16.choose_bf16_path()[2] == "ATTNKIT_CPU_BF16 must be one of auto, amx, dpbf16, bfdot, widen, fp32; got 'tmul'"
    monkeypatch.setenv("ATTNKIT_CPU_BF16", "fp32")
    assert bf16.choose_bf16_path()[:3:2] == ("fp32", None)
    script = (
        "import numpy as np, attnkit\n"
        "q = np.ones((1, 1, 4, 8), np.float32)\n"
        "try:\n    attnkit.attention(q, q, q, backend='numba')\n"
        "except ValueError as error:\n    print('refused:', error)\n"
    )
    stdout = run_python(script, ATTNKIT_CPU_BF16="tmul")  # imports, then refuses at the call
    assert "refused: ATTNKIT_CPU_BF16 must be one of auto, amx, dpbf16, bfdot, widen, fp32; got 'tmul'" in stdout


def test_amx_path_follows_the_target_and_the_os(monkeypatch):
    """AMX runs where the target has it and the OS grants it; otherwise the vector path, and forcing
    amx there is an error naming why."""
    from dataclasses import replace

    from attnkit.kernels.target import TARGET

    monkeypatch.delenv("ATTNKIT_CPU_BF16", raising=False)
    with_amx = replace(TARGET, amx=True, bf16_dot=True, arch="x86_64", lanes=16)
    assert bf16.choose_bf16_path(with_amx, (True, "granted"))[0] == "amx"
    path, _, error = bf16.choose_bf16_path(with_amx, (False, "the OS refused AMX (errno 22)"))
    assert path == "dpbf16" and error is None
    monkeypatch.setenv("ATTNKIT_CPU_BF16", "amx")
    assert "has AMX, but the OS refused AMX (errno 22)" in bf16.choose_bf16_path(with_amx, (False, "the OS refused AMX (errno 22)"))[2]
    assert "has no AMX" in bf16.choose_bf16_path(replace(with_amx, amx=False))[2]
    monkeypatch.setenv("ATTNKIT_CPU_BF16", "dpbf16")
    assert bf16.choose_bf16_path(with_amx, (True, "granted"))[0] == "dpbf16"
    if TARGET.amx and bf16.os_grants_amx()[0] and not os.environ.get("ATTNKIT_CPU_BF16"):
        assert bf16.BF16_PRODUCTS == "amx"  # this machine: its products really run on AMX


@pytest.mark.skipif(bf16.BF16_PRODUCTS != "amx", reason=f"no AMX here: {bf16.BF16_DETAIL}")
def test_amx_and_vector_paths_keep_apart_in_the_cache(tmp_path):
    """ATTNKIT_CPU_BF16=dpbf16 compiles gemm to other code than AMX's: a process of each kind
    sharing a cache folder loads its own (a miss the first time, then a hit), and both are right."""
    script = (
        "import numpy as np\n"
        "from attnkit.kernels import microkernels as mk\n"
        "rng = np.random.default_rng(0)\n"
        "a = mk.bf16_bits(rng.standard_normal((37, 42))); b = mk.bf16_bits(rng.standard_normal((42, 45)))\n"
        "bp = np.zeros((21, 2 * 48), np.uint16); mk.pack_pairs(b, bp); c = np.zeros((37, 48), np.float32)\n"
        "mk.gemm(a, bp, c, 37, 45, 21, False)\n"
        "want = mk.bf16_to_float32(a).astype(np.float64) @ mk.bf16_to_float32(b)\n"
        "stats = mk.gemm.stats\n"
        "print(mk.BF16_PRODUCTS, sum(stats.cache_hits.values()), sum(stats.cache_misses.values()),\n"
        "      float(np.abs(c[:, :45] - want).max()))\n"
    )
    cache = {"NUMBA_CACHE_DIR": str(tmp_path)}
    runs = [run_python(script, **cache, ATTNKIT_CPU_BF16=path).split() for path in ("amx", "dpbf16", "amx", "dpbf16")]
    assert [run[:3] for run in runs] == [["amx", "0", "1"], ["dpbf16", "0", "1"], ["amx", "1", "0"], ["dpbf16", "1", "0"]]
    assert all(float(run[3]) < 1e-4 for run in runs)


# ---------------------------------------------------------------------------
# The kernel in bf16, against the reference
# ---------------------------------------------------------------------------


def bf16_inputs(case):
    rng = np.random.default_rng(case.seed)
    amplitude = 5.0 if case.scale_inputs else 1.0
    q, k, v, d_out = (
        bf16.bf16_bits(amplitude * rng.standard_normal(shape))
        for shape in ((case.b, case.hq, case.nq, case.d), (case.b, case.hkv, case.nk, case.d),
                      (case.b, case.hkv, case.nk, case.dv), (case.b, case.hq, case.nq, case.dv))
    )  # fmt: skip
    return q, k, v, d_out, make_mask(case, rng)


def reference_in(case, q, k, v, d_out, mask, dtype):
    q, k, v, d_out = (as_float(x).astype(dtype) for x in (q, k, v, d_out))
    if mask is not None and mask.dtype != np.bool_:
        mask = mask.astype(dtype)
    kw = dict(causal=case.causal or False, mask=mask, scale=case.scale, window=case.window, softcap=case.softcap)
    out, lse = attention(q, k, v, return_lse=True, **kw)
    return out, lse, attention_backward(q, k, v, out, d_out, lse, **kw)


def torch_bf16_reference(case, q, k, v, d_out, mask):
    """(out, dq, dk, dv) of plain attention in torch bf16 ops, float64 arrays.

    Every product accumulates in float32 and is stored in bf16 (torch's CPU bf16
    matmul), the softmax runs in float32 and is stored in bf16: "the reference
    computed in bf16 with fp32 accumulation" (flash-attn's upcast=False
    reference). Causal alignment and window become a dense mask. None for
    softcap. Rows that see no key give NaN there, replaced by 0.
    """
    if case.softcap is not None:
        return None
    from attnkit.reference import visible_keys

    visible = visible_keys(case.nq, case.nk, case.causal, case.window)
    visible = torch.ones(case.nq, case.nk, dtype=torch.bool) if visible is None else torch.from_numpy(visible)
    additive = None
    if mask is not None and mask.dtype == np.bool_:
        visible = torch.from_numpy(mask) & visible
    elif mask is not None:
        additive = torch.from_numpy(mask).bfloat16()
    q, k, v = (torch.from_numpy(x.view(np.int16)).view(torch.bfloat16).requires_grad_() for x in (q, k, v))
    group = case.hq // case.hkv
    scores = (q @ k.repeat_interleave(group, dim=1).transpose(-1, -2)) * case.scale  # (B, H, Nq, Nk) bf16
    if additive is not None:
        scores = scores + additive
    scores = scores.masked_fill(~visible, -math.inf)
    weights = torch.softmax(scores.float(), dim=-1).bfloat16()
    out = weights @ v.repeat_interleave(group, dim=1)
    grads = torch.autograd.grad(out, (q, k, v), torch.from_numpy(d_out.view(np.int16)).view(torch.bfloat16))
    return [np.nan_to_num(x.detach().double().numpy()) for x in (out, *grads)]


def baseline(*candidates):
    """The larger error of the low-precision baselines that exist, as an array for assert_close."""
    return max((c for c in candidates if c is not None), key=lambda pair: np.abs(pair[0] - pair[1]).max())[0]


class Bf16Case(Case):
    def __init__(self, scale_inputs=False, **kw):
        super().__init__(dtype=np.float32, **kw)
        self.scale_inputs = scale_inputs

    @property
    def id(self):
        return super().id.replace("float32", "bf16") + ("-x5" if self.scale_inputs else "")


BF16_CASES = [
    Bf16Case(nq=1, d=64),
    Bf16Case(hq=4, nq=333, d=64, causal="top_left"),
    Bf16Case(nq=1100, d=64, causal="bottom_right"),
    Bf16Case(nq=129, nk=511, d=80, causal="bottom_right"),
    Bf16Case(nq=511, nk=129, d=80, causal="top_left"),
    Bf16Case(nq=511, nk=129, d=128, causal="bottom_right"),
    Bf16Case(b=2, hq=4, hkv=1, nq=333, d=128, causal="top_left"),
    Bf16Case(hq=8, hkv=2, nq=257, d=256, window=(64, 0)),
    Bf16Case(nq=300, d=59, window=(32, 7)),
    Bf16Case(nq=200, d=64, dv=48, softcap=5.0, causal="top_left"),
    Bf16Case(nq=300, d=64, scale_inputs=True),
    Bf16Case(hq=4, hkv=2, nq=333, nk=200, d=128, scale_inputs=True, causal="bottom_right"),
    Bf16Case(b=3, nq=129, nk=300, d=64, mask="bool_key_pad"),
    Bf16Case(b=2, hq=4, nq=127, nk=200, d=80, mask="add_full"),
    Bf16Case(nq=200, nk=129, d=64, mask="bool_shared", causal="bottom_right"),
    Bf16Case(nq=129, d=64, scale=-0.3),
    # decode-shaped: the decode backward, bf16 read in place and widened
    Bf16Case(b=2, hq=8, hkv=2, nq=1, nk=700, d=64, causal="bottom_right"),
    Bf16Case(hq=4, hkv=2, nq=3, nk=300, d=59, softcap=5.0, mask="bool_key_pad"),
]


@needs_bf16_cpu
@pytest.mark.parametrize("case", BF16_CASES, ids=lambda c: c.id)
def test_kernel_bf16_against_reference(case):
    q, k, v, d_out, mask = bf16_inputs(case)
    kw = dict(scale=case.scale, causal=case.causal, window=case.window, softcap=case.softcap)
    out, lse = flash_forward(q, k, v, mask, **kw)
    grads = flash_backward(q, k, v, mask, out, d_out, lse, **kw)
    assert out.dtype == np.uint16 and lse.dtype == np.float32
    assert all(g.dtype == np.uint16 for g in grads)
    out64, lse64, grads64 = reference_in(case, q, k, v, d_out, mask, np.float64)
    out32, lse32, grads32 = reference_in(case, q, k, v, d_out, mask, np.float32)

    empty = lse64 == -np.inf
    assert np.array_equal(empty, lse == -np.inf), "rows with no visible key differ from the reference"
    assert np.all(as_float(out)[empty] == 0), "fully masked rows are not exactly 0"
    assert np.all(as_float(grads[0])[empty] == 0), "dq of fully masked rows is not exactly 0"
    # Low-precision baselines: float32 on the bf16 inputs with its result stored in
    # bf16, and attention in torch bf16 ops; the larger error of the two sets the bar.
    peer = torch_bf16_reference(case, q, k, v, d_out, mask) or [None] * 4
    assert_within_rule("out", as_float(out), out64, baseline(
        (as_float(bf16.bf16_bits(out32)), out64), peer[0] is not None and (peer[0], out64) or None), 2)
    assert_within_rule("lse", lse[~empty], lse64[~empty], lse32[~empty], 2)
    for name, got, want64, want32, theirs in zip(("dq", "dk", "dv"), grads, grads64, grads32, peer[1:]):
        candidates = [(as_float(bf16.bf16_bits(want32)), want64)]
        if theirs is not None:
            candidates.append((theirs, want64))
        assert_within_rule(name, as_float(got), want64, baseline(*candidates), 3)


@pytest.mark.skipif(bf16.BF16_PRODUCTS != "amx" or not hasattr(os, "fork"), reason=f"no AMX here: {bf16.BF16_DETAIL}")
def test_amx_in_a_forked_child():
    """The OS's AMX grant is the process's: a forked child (a DataLoader worker) runs AMX tiles too,
    where a missing grant would kill it at its first tile instruction."""
    rng = np.random.default_rng(1)
    a, b = bf16.bf16_bits(rng.standard_normal((20, 40))), bf16.bf16_bits(rng.standard_normal((40, 30)))
    packed = np.zeros((20, 64), np.uint16)
    bf16.pack_pairs(b, packed)
    parent = np.zeros((20, 32), np.float32)
    bf16.gemm(a, packed, parent, 20, 30, 20, False)
    pid = os.fork()
    if pid == 0:  # the child: exit 0 when its product equals the parent's
        child = np.zeros((20, 32), np.float32)
        bf16.gemm(a, packed, child, 20, 30, 20, False)
        os._exit(0 if np.array_equal(parent, child) else 3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child status {status}"


@pytest.mark.skipif(bf16.BF16_PRODUCTS != "amx", reason="no AMX here: the tests above run the vector path")
def test_the_vector_path_on_an_amx_machine():
    """Where this process runs bf16 on AMX, the kernel and product checks above run again in a process
    whose bf16 runs on VDPBF16PS (ATTNKIT_CPU_BF16=dpbf16), so neither path goes untested."""
    selection = "kernel_bf16_against_reference or gemm_against_float64"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", selection],
        env={**os.environ, "ATTNKIT_CPU_BF16": "dpbf16"}, capture_output=True, text=True, timeout=1200,
        cwd=os.path.dirname(__file__),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # every selected case ran and passed there: none skipped (a count written here went stale as
    # cases were added: 34, then 36)
    summary = result.stdout.strip().splitlines()[-1]
    assert re.search(r"\b[1-9]\d* passed", summary) and "skipped" not in summary, result.stdout[-2000:]


@needs_bf16_cpu
def test_bf16_repeated_backward_is_bitwise_equal():
    case = Bf16Case(b=1, hq=4, hkv=2, nq=300, d=64, causal="top_left")
    q, k, v, d_out, _ = bf16_inputs(case)
    kw = dict(scale=case.scale, causal=case.causal, window=None, softcap=None)
    out, lse = flash_forward(q, k, v, None, **kw)
    first = flash_backward(q, k, v, None, out, d_out, lse, **kw)
    for _ in range(5):
        again = flash_backward(q, k, v, None, out, d_out, lse, **kw)
        for a, b in zip(first, again):
            np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------
# Through the public API: torch tensors, autograd, the precision setting
# ---------------------------------------------------------------------------


@needs_bf16_cpu
def test_bf16_tensors_reach_the_kernel_without_conversion():
    from attnkit.kernels import numba_attention

    q, k, v = (torch.randn(2, 4, 40, 32).bfloat16().requires_grad_() for _ in range(3))
    with numba_attention.recording() as launches:
        attnkit.scaled_dot_product_attention(q, k, v, is_causal=True).float().sum().backward()
    assert sorted(launch.worker.removesuffix("_serial") for launch in launches) == ["backward", "forward"]
    for launch in launches:
        name = launch.worker
        for array, tensor in zip((launch.q, launch.k, launch.v), (q, k, v)):
            assert array.dtype == np.uint16
            assert np.shares_memory(array, tensor.detach().view(torch.int16).numpy()), f"{name} got a copy"


@needs_bf16_cpu
@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
def test_bf16_autograd_matches_torch_rule(gqa):
    """Forward and gradients of bf16 tensors within 2x / 3x torch SDPA's own bf16 error."""
    torch.manual_seed(0)
    hkv = 2 if gqa else 4
    q = torch.randn(2, 4, 150, 64).bfloat16().requires_grad_()
    k, v = (torch.randn(2, hkv, 150, 64).bfloat16().requires_grad_() for _ in range(2))
    d_out = torch.randn(2, 4, 150, 64).bfloat16()
    kw = dict(is_causal=True, enable_gqa=gqa)

    def run(fn, inputs):
        out = fn(*inputs, **kw)
        grads = torch.autograd.grad(out, inputs, d_out.to(out.dtype))
        return (out, *grads)

    ours = run(attnkit.scaled_dot_product_attention, (q, k, v))
    peer = run(torch.nn.functional.scaled_dot_product_attention, (q, k, v))
    exact = run(torch.nn.functional.scaled_dot_product_attention,
                tuple(x.detach().double().requires_grad_() for x in (q, k, v)))
    for name, got, theirs, want, factor in zip(("out", "dq", "dk", "dv"), ours, peer, exact, (2, 3, 3, 3)):
        assert got.dtype == torch.bfloat16
        err = (got.double() - want).abs().max().item()
        allowed = factor * (theirs.double() - want).abs().max().item() + 1e-6
        assert err <= allowed, f"{name}: error {err:.3g} > {allowed:.3g} ({factor} x torch SDPA bf16's)"


@needs_bf16_cpu
def test_bf16_broadcast_batch_gradients_are_summed_in_float():
    k, v = (torch.randn(1, 2, 30, 16).bfloat16().requires_grad_() for _ in range(2))
    q = torch.randn(3, 2, 20, 16).bfloat16().requires_grad_()
    attnkit.attention(q, k, v).float().sum().backward()
    k64, v64 = (x.detach().double().requires_grad_() for x in (k, v))
    attnkit.attention(q.detach().double(), k64, v64).sum().backward()
    for name, got, want in (("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
        assert got.shape == want.shape
        err = (got.double() - want).abs().max().item()
        assert err <= 0.02 * want.abs().max().item(), f"{name}: error {err:.3g}"


@pytest.fixture
def matmul_precision():
    """Sets torch's float32 matmul precision for one test and restores it afterwards."""
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


def _causal_float32_with_exact():
    """q, k, v (1, 4, 300, 64) float32 and their causal attention in float64."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 4, 300, 64) for _ in range(3))
    return q, k, v, torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)


def _assert_float32_products(q, k, v, exact):
    assert "float32 products" in attnkit.explain(q, k, v, causal=True)
    out = attnkit.attention(q, k, v, causal=True)
    assert (out.double() - exact).abs().max().item() < 1e-5  # exact float32


@pytest.mark.skipif(bf16.BF16_DOT, reason="this CPU has bf16 products faster than float32's")
def test_float32_under_medium_stays_float32_without_bf16_instructions(matmul_precision):
    """Widened bf16 is no faster than float32 (AVX2, AVX-512F): "medium" keeps float32's exact products."""
    q, k, v, exact = _causal_float32_with_exact()
    matmul_precision("medium")
    _assert_float32_products(q, k, v, exact)


@pytest.mark.skipif(not bf16.BF16_DOT, reason=f"no bf16 products faster than float32's here: {bf16.BF16_DETAIL}")
def test_float32_under_medium_takes_bf16_products(matmul_precision):
    q, k, v, exact = _causal_float32_with_exact()
    matmul_precision("highest")
    _assert_float32_products(q, k, v, exact)

    matmul_precision("medium")
    assert "bf16 products" in attnkit.explain(q, k, v, causal=True)
    out = attnkit.attention(q, k, v, causal=True)
    peer = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    lowp = torch.nn.functional.scaled_dot_product_attention(
        *(x.bfloat16().double() for x in (q, k, v)), is_causal=True)
    baseline = max((peer.double() - exact).abs().max().item(), (lowp - exact).abs().max().item())
    err = (out.double() - exact).abs().max().item()
    assert out.dtype == torch.float32
    assert 1e-5 < err <= 2 * baseline, f"medium: error {err:.3g}, allowed {2 * baseline:.3g}"
    q.requires_grad_()
    attnkit.attention(q, k, v, causal=True).sum().backward()
    assert q.grad.dtype == torch.float32 and torch.isfinite(q.grad).all()


def test_float16_keeps_float16_precision():
    """fp16 is never rounded to bf16: its error stays at fp16's level, far below bf16's."""
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 4, 200, 64).half() for _ in range(3))
    assert "float16 converted to float32" in attnkit.explain(q, k, v)
    out = attnkit.attention(q, k, v, causal=True)
    exact = attention(*(x.double().numpy() for x in (q, k, v)), causal=True)
    err = np.abs(out.double().numpy() - exact).max()
    fp16_rounding = np.abs(torch.from_numpy(exact).half().double().numpy() - exact).max()
    assert out.dtype == torch.float16 and err <= 2 * fp16_rounding, (err, fp16_rounding)


def test_forced_float32_path_for_bf16():
    """ATTNKIT_CPU_BF16=fp32 (what a CPU without AVX-512 BF16 gets): bf16 still right, through float32."""
    script = (
        "import torch, attnkit, numpy as np\n"
        "from attnkit.reference import attention\n"
        "torch.manual_seed(5)\n"
        "q, k, v = (torch.randn(2, 4, 77, 64).bfloat16().requires_grad_() for _ in range(3))\n"
        "print(attnkit.explain(q, k, v))\n"
        "out = attnkit.attention(q, k, v, causal=True); out.float().sum().backward()\n"
        "exact = attention(*(x.detach().double().numpy() for x in (q, k, v)), causal=True)\n"
        "assert out.dtype == torch.bfloat16 and q.grad.dtype == torch.bfloat16\n"
        "got = out.double().detach().numpy()\n"
        "print('error', (np.abs(got - exact) - 2.0 ** -8 * np.abs(exact)).max())\n"
    )
    stdout = run_python(script, ATTNKIT_CPU_BF16="fp32")
    assert "float32 products" in stdout and "ATTNKIT_CPU_BF16=fp32" in stdout
    # bf16 rounds each output to 2^-8 of its size (an early causal row is one value of v, up to ~4:
    # a bound of 2^-7 for all once failed at 0.0113, unseeded); beyond that only float32's error
    error = float(stdout.split("error")[-1])
    assert error < 1e-5, error  # (4e-8 with this seed)


def test_float16_widens_exactly_for_every_bit_pattern():
    """float16 -> float32 at the boundary (kernels/bf16.py): every one of the 65,536 values, subnormals,
    infinities and NaNs included, equals NumPy's conversion (NaN as NaN, with its sign)."""
    from attnkit.kernels.bf16 import float16_to_float32

    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    got, want = float16_to_float32(halves), halves.astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
    assert np.array_equal(np.signbit(got[nan]), np.signbit(want[nan]))
    strided = np.random.default_rng(0).standard_normal((3, 40, 7)).astype(np.float16)[:, ::3]
    assert np.array_equal(float16_to_float32(strided), strided.astype(np.float32))


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["chunked-slots", "task-owned-keys"])
def test_the_backward_relies_on_no_zeros_in_memory_it_reuses(kv_heads):
    """The backward's workers pack K and V into buffers of their own and accumulate dK and dV there,
    and the results come from np.empty: memory that an earlier call (longer keys, other values)
    left behind. Every element read is written first: the same call gives the same gradients, bit
    for bit, before and after such a call, and they are finite. Two kv heads a batch entry: each
    splits its queries into chunks with partial slots; four: each task owns its keys' gradients."""
    generator = torch.Generator().manual_seed(3)

    def leaves(*shape):
        return torch.randn(*shape, generator=generator).bfloat16().requires_grad_()

    q, k, v = leaves(2, 8, 70, 40), leaves(2, kv_heads, 61, 40), leaves(2, kv_heads, 61, 40)
    d_out = torch.randn(2, 8, 70, 40, generator=generator).bfloat16()

    def gradients():
        out = attnkit.attention(q, k, v, causal=True, backend="numba")
        return torch.autograd.grad(out, (q, k, v), d_out)

    first = gradients()
    big = [leaves(2, 8, 300, 40) * 1e4 for _ in range(3)]  # longer keys, larger values, in the same buffers
    attnkit.attention(*big, backend="numba").sum().backward()
    second = gradients()
    for a, b in zip(first, second):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
        assert torch.isfinite(b.float()).all()
