"""The `attnkit` command line, run as a user would: a separate process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).with_name("attnkit")


def run(*args, cwd, env=None):
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "attnkit"]
    return subprocess.run(command + list(args), cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})


def test_info_reports_versions_cpu_cuda_and_backends(tmp_path):
    result = run("info", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert set(info["versions"]) >= {"python", "numpy", "scipy", "numba", "torch", "triton"}
    assert info["cpu"]["logical_cores"] >= 1 and info["cpu"]["model"]
    assert info["cpu"]["last_level_cache_bytes"] >= 1 << 16
    assert "devices" in info["cuda"] and (info["cuda"]["devices"] or info["cuda"]["reason"])
    assert info["backends"]["reference"] is None
    from attnkit.kernels.target import TARGET

    cpu_kernel = info["cpu_bf16"]  # the target Numba compiles for, as LLVM sees it (every OS)
    assert cpu_kernel["lanes"] == TARGET.lanes and cpu_kernel["target"].startswith(TARGET.cpu)
    assert cpu_kernel["error"] is None and set(cpu_kernel["blocks"]) == {"f32", "bf16"}

    text = run("info", cwd=tmp_path)
    assert text.returncode == 0 and "backends:" in text.stdout and "reference" in text.stdout
    assert f"target   {TARGET.cpu} (" in text.stdout


def test_info_reports_a_forced_path_the_target_cannot_run(tmp_path):
    """ATTNKIT_CPU_F32=fma on a target without FMA: info still runs and says why calls will be refused."""
    result = run("info", cwd=tmp_path, env={"NUMBA_CPU_NAME": "generic", "ATTNKIT_CPU_F32": "fma"})
    assert result.returncode == 0, result.stderr
    assert "target   generic (x86_64, SSE" in result.stdout or "target   generic (aarch64" in result.stdout
    assert "error    ATTNKIT_CPU_F32=fma, but the target Numba compiles for (generic" in result.stdout


def test_bench_prints_a_table_and_writes_json_csv_and_charts(tmp_path):
    out = tmp_path / "results"
    result = run("bench", "--n", "32,64", "--heads", "2", "--backends", "reference,torch-sdpa-flash",
                 "--repeats", "2", "--min-time", "0.01", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "GFLOP/s" in result.stdout and "roofline:" in result.stdout
    document = json.loads((out / "results.json").read_text())
    assert document["schema"] == "attnkit-bench/1" and document["complete"] is True
    assert document["machine"]["cpu"]["model"] and document["roofline"]["flops_per_s"] > 0
    rows = document["results"]
    assert {(r["N"], r["backend"]) for r in rows} == {
        (n, b) for n in (32, 64) for b in ("reference", "torch-sdpa-flash")}
    assert all(r["status"] == "ok" and r["p20_s"] <= r["median_s"] <= r["p80_s"] for r in rows)
    assert len((out / "results.csv").read_text().splitlines()) == 1 + len(rows)
    assert all((out / name).stat().st_size > 0 for name in ("time.png", "memory.png", "flops.png"))


def test_bench_interrupted_keeps_its_results_and_exits_130(tmp_path):
    out = tmp_path / "results"
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "attnkit"]
    # SIGINT back to its default in the child: a suite started as a background
    # job of a non-interactive shell (`make test &`) inherits SIGINT ignored,
    # and Python then never raises KeyboardInterrupt (the sweep ran to the end).
    process = subprocess.Popen(
        command + ["bench", "--n", "32,64,128,256,512,1024,2048", "--heads", "2",
                   "--backends", "reference", "--repeats", "2", "--min-time", "0.5",
                   "--out", str(out)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if json.loads((out / "results.json").read_text())["results"]:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    document = json.loads((out / "results.json").read_text())
    assert document["complete"] is False and 1 <= len(document["results"]) < 7
    assert "interrupted" in stderr and (out / "time.png").exists()
    replot = run("bench", "--plot", str(out / "results.json"), "--out", str(tmp_path / "again"),
                 cwd=tmp_path)
    assert replot.returncode == 0, replot.stderr
    assert (tmp_path / "again" / "memory.png").exists()


@pytest.mark.parametrize("args,message", [
    (("bench", "--n", "0"), "positive integers"),
    (("bench", "--n", "512..256"), "positive integers or ranges"),
    (("bench", "--backends", "nope"), "unknown backend(s) nope"),
    (("bench", "--backends", "flash-attn", "--device", "cpu"), "flash-attn cannot run this sweep"),
    (("bench", "--heads", "0"), "expected a positive number"),
    (("bench", "--heads", "8", "--kv-heads", "3"), "--kv-heads must divide --heads (8); got 3"),
    (("bench", "--ladder", "--causal", "--kv-heads", "1"), "it takes no --kv-heads, --causal"),
    (("bench", "--mode", "sideways"), "invalid choice"),
    (("bench", "--plot", "missing.json"), "--plot"),
    (("frobnicate",), "invalid choice"),
])
def test_bad_arguments_exit_with_a_message(tmp_path, args, message):
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr
