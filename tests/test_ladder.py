"""The optimisation ladder: every rung equals the reference, and the runner reports each."""

from __future__ import annotations

import json

import numpy as np
import pytest

from attnkit.bench import ladder as runner
from attnkit.kernels import ladder
from attnkit.reference import attention
from attnkit.testing import assert_close


# The loop rung takes seconds at N=300, so it runs at the small size only; the GPU
# rung is checked by the Triton tests and bench/gpu_check.py.
CASES = [(name, n, d) for name, _, _ in ladder.RUNGS if name != "triton"
         for n, d in ((37, 16), (300, 64)) if not (name == "python_loops" and n > 100)]


@pytest.mark.parametrize("name,n,d", CASES, ids=[f"{c[0]}-N{c[1]}-D{c[2]}" for c in CASES])
def test_rung_equals_reference(name, n, d):
    fn = dict((r[0], r[1]) for r in ladder.RUNGS)[name]
    rng = np.random.default_rng(n)
    q, k, v = (rng.standard_normal((2, 2, n, d), dtype=np.float32) for _ in range(3))
    if name == "bf16_products":
        if ladder.bf16_unavailable():
            pytest.skip(ladder.bf16_unavailable())
        # flash-attn's rule: at most 2x the error of a plain float32 attention on the bf16-rounded inputs
        from attnkit.kernels.microkernels import bf16_bits, bf16_to_float32

        rounded = [bf16_to_float32(bf16_bits(x)) for x in (q, k, v)]
        exact = attention(*(x.astype(np.float64) for x in rounded))
        plain = bf16_to_float32(bf16_bits(attention(*rounded)))  # stored in bf16, as the kernel stores it
        assert np.abs(fn(q, k, v) - exact).max() <= 2 * np.abs(plain - exact).max() + 1e-6
        return
    expected = attention(*(x.astype(np.float64) for x in (q, k, v)))
    assert_close(fn(q, k, v), expected, atol=2e-6, rtol=1e-5, name=name)


def test_ladder_runner_writes_table_json_and_chart(tmp_path, capsys):
    assert runner.main(n=48, heads=1, head_dim=16, repeats=2, out_dir=tmp_path) == 0
    table = capsys.readouterr().out
    rungs = json.loads((tmp_path / "ladder.json").read_text())["rungs"]
    assert [r["name"] for r in rungs] == [r[0] for r in ladder.RUNGS]
    measured = [r for r in rungs if r["status"] == "ok"]
    assert len(measured) >= 8 and all(r["gflops"] > 0 and r["max_error"] < ladder.TOLERANCES.get(r["name"], 1e-4)
                                      for r in measured)
    assert measured[0]["speedup"] is None and all(r["speedup"] > 0 for r in measured[1:])
    assert "numba_tiles_exp2" in table and (tmp_path / "ladder.png").stat().st_size > 1000
