"""The package as pip installs it: a wheel built from this checkout, installed into a fresh venv
(torch and the other dependencies reused from the test environment, nothing downloaded), imported
and run from outside the checkout. The wheel carries the licence and no test files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, **kwargs)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Built from a copy of the checkout's files (git's view: tracked, and untracked not ignored),
    so nothing left in a local build/ folder can slip in."""
    source, folder = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    files = run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT).split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(folder),
         str(source)])  # fmt: skip
    (built,) = folder.glob("attnkit-*.whl")
    return built


def test_wheel_holds_the_licence_and_no_tests(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert any(name.endswith(".dist-info/licenses/LICENSE") or name.endswith(".dist-info/LICENSE") for name in names)
    assert not [name for name in names if Path(name).name.startswith("test_") or "/tests/" in name]
    for needed in ("attnkit/backends/cpu.py", "attnkit/kernels/cpu/forward.py", "attnkit/reference/attention.py",
                   "attnkit/bench/cpu_dtypes_cases.csv", "attnkit/viz/template.html"):  # fmt: skip
        assert needed in names, needed


def test_wheel_installs_and_runs_outside_the_checkout(wheel, tmp_path):
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    # The test environment's packages (torch, numba, ...) after the new venv's own, as plain paths:
    # their .pth files (attnkit's editable install among them) are not run.
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    (site / "test-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)])
    script = (
        "import numpy as np, attnkit\n"
        "assert 'site-packages' in attnkit.__file__ and '/venv/' in attnkit.__file__, attnkit.__file__\n"
        "rng = np.random.default_rng(0)\n"
        "q, k, v = (rng.standard_normal((1, 2, 8, 16)).astype(np.float32) for _ in range(3))\n"
        "out = attnkit.attention(q, k, v, causal=True, backend='numba')\n"
        "want = attnkit.reference.attention(q, k, v, causal=True)\n"
        "print('error', float(np.abs(out - want).max()))\n"
    )
    environment = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "NUMBA_CACHE_DIR")}
    stdout = run([str(python), "-c", script], cwd=tmp_path, env=environment)
    assert float(stdout.split("error")[-1]) < 1e-5
