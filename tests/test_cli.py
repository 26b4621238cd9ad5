"""The `attnkit` command line, run as a user would: a separate process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).with_name("attnkit")


def run(*args, cwd):
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "attnkit"]
    return subprocess.run(command + list(args), cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_info_reports_versions_cpu_cuda_and_backends(tmp_path):
    result = run("info", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert set(info["versions"]) >= {"python", "numpy", "scipy", "numba", "torch", "triton"}
    assert info["cpu"]["logical_cores"] >= 1 and info["cpu"]["model"]
    assert "devices" in info["cuda"] and (info["cuda"]["devices"] or info["cuda"]["reason"])
    assert info["backends"]["reference"] is None

    text = run("info", cwd=tmp_path)
    assert text.returncode == 0 and "backends:" in text.stdout and "reference" in text.stdout


def test_bench_prints_a_table_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = run("bench", "--n", "32,64", "--heads", "2", "--repeats", "2", "--json", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "GFLOP/s" in result.stdout
    rows = json.loads(out.read_text())["results"]
    assert {(r["N"], r["backend"]) for r in rows} == {(n, b) for n in (32, 64) for b in ("reference", "torch-sdpa")}
    assert all(r["median_s"] > 0 and r["p20_s"] <= r["median_s"] <= r["p80_s"] for r in rows)


@pytest.mark.parametrize("args,message", [
    (("bench", "--n", "0"), "positive integers"),
    (("bench", "--backends", "nope"), "unknown backend(s) nope"),
    (("frobnicate",), "invalid choice"),
])
def test_bad_arguments_exit_with_a_message(tmp_path, args, message):
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr
