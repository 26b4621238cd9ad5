"""Ahead-of-time compilation of the Triton kernels' production configurations (no GPU needed).

Every forward configuration the autotuner may pick is compiled for sm_80 and
sm_90 (float16) and must not spill (no stack, no LDL/STL); on sm_90 the code
must use HGMMA (Hopper warpgroup tensor-core instructions). The backward
configurations are compiled for one head dim per architecture and reported
(registers / spills) without failing: their spills are a performance matter.

Compilation runs in a subprocess without TRITON_INTERPRET, so it is not
affected by the interpreter mode the kernel tests switch on. The full table
for every configuration lives in bench/results/triton_aot_report.md
(`python -m attnkit.bench.triton_aot bench/results/triton_aot_report.md`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
try:
    import triton  # noqa: F401
except Exception as error:
    pytest.skip(f"triton cannot be imported ({type(error).__name__}: {error})", allow_module_level=True)

_SCRIPT = r"""
import json, sys, torch
from attnkit.bench import triton_aot
rows = triton_aot.aot_report(archs=(80, 90), head_dims=(64, 128, 256), kernels=("fwd",))
rows += triton_aot.aot_report(archs=(80, 90), head_dims=(128,), kernels=("dkdv", "dq"), first_only=True)
# torch.compile's Inductor passes the float arguments as fp64: the kernels must compile so too
from attnkit.kernels.triton_attention import production_configs
for kernel in ("fwd", "dkdv", "dq"):
    try:
        row = triton_aot.aot_compile(kernel, 90, production_configs(kernel, 9, 128)[0], float_type="fp64")
    except Exception as error:
        row = dict(kernel=kernel, error=f"{type(error).__name__}: {error}"[:500])
    rows.append(dict(row, float_type="fp64"))
print("AOT-JSON" + json.dumps(rows))
"""


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    try:
        done = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                              env=env, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.fail("AOT compilation took more than 15 minutes")
    lines = [line for line in done.stdout.splitlines() if line.startswith("AOT-JSON")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout)[-3000:]
        if "cuobjdump" in tail and ("No such file" in tail or "not found" in tail):
            pytest.skip("this triton wheel ships no cuobjdump")
        pytest.fail(f"AOT compilation failed:\n{tail}")
    rows = json.loads(lines[-1][len("AOT-JSON"):])
    from attnkit.bench.triton_aot import format_aot_report

    _FP64_ROWS[:] = [r for r in rows if r.get("float_type") == "fp64"]
    rows = [r for r in rows if "float_type" not in r]
    print("\n" + format_aot_report(rows))  # shown with pytest -s
    return rows


_FP64_ROWS = []  # the fixture's compilations with fp64 float arguments (torch.compile's types)


def test_every_production_forward_config_compiles_without_spilling(report):
    fwd = [r for r in report if r["kernel"] == "fwd"]
    assert {r["arch"] for r in fwd} == {"sm_80", "sm_90"}
    spilled = [r for r in fwd if r["stack_bytes"] or r["spill_loads"] or r["spill_stores"]]
    assert not spilled, "forward configurations that spill:\n" + "\n".join(map(str, spilled))


def test_sm90_uses_hgmma(report):
    sm90 = [r for r in report if r["arch"] == "sm_90"]
    assert sm90
    without = [r for r in sm90 if r["hgmma"] == 0]
    assert not without, "sm_90 code without HGMMA:\n" + "\n".join(map(str, without))
    assert all(r["hgmma"] == 0 for r in report if r["arch"] == "sm_80")


def test_backward_configs_compile(report):
    bwd = [r for r in report if r["kernel"] in ("dkdv", "dq")]
    assert {(r["kernel"], r["arch"]) for r in bwd} == {
        (k, a) for k in ("dkdv", "dq") for a in ("sm_80", "sm_90")
    }
    assert all(r["registers"] for r in bwd)


_FLEX_SCRIPT = r"""
import json, torch
from attnkit.bench import flex_aot
print("AOT-JSON" + json.dumps(flex_aot.flex_aot(arch=90, block=(64, 64), warps=8, head_dim=64)))
"""


def test_kernels_compile_with_fp64_float_arguments_as_torch_compile_passes_them(report):
    """Inductor types a Python float argument fp64 (seen on an H200: the forward's accumulator became
    fp64 and tl.dot refused it). The kernels cast their float arguments to float32 at entry."""
    rows = _FP64_ROWS
    assert {r["kernel"] for r in rows} == {"fwd", "dkdv", "dq"}
    for row in rows:
        assert "error" not in row, row
        assert row["hgmma"] > 0, row


def test_generated_flex_kernels_compile_for_sm90_on_tensor_cores():
    """A generated Triton flex module (learnable bias table, document mask) compiles for sm_90 with
    the launcher's settings: HGMMA in all three kernels, no spill in the forward and dQ."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", _FLEX_SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("AOT-JSON")]
    tail = (done.stderr or done.stdout)[-3000:]
    if "cuobjdump" in tail and ("No such file" in tail or "not found" in tail):
        pytest.skip("this triton wheel ships no cuobjdump")
    assert done.returncode == 0 and lines, f"AOT compilation of the flex kernels failed:\n{tail}"
    rows = {r["kernel"]: r for r in json.loads(lines[-1][len("AOT-JSON"):])}
    assert set(rows) == {"flex_forward", "flex_backward_dkdv", "flex_backward_dq"}
    assert all(r["hgmma"] > 0 for r in rows.values()), rows
    for name in ("flex_forward", "flex_backward_dq"):
        assert not (rows[name]["stack_bytes"] or rows[name]["spill_loads"] or rows[name]["spill_stores"]), rows[name]
