"""Machine code only where an address is taken (kernels/jit.py): helpers that only compiled code
calls are linked as LLVM IR and get no machine code of their own, in the process that compiles
them or in the on-disk cache, nor their own run of the module passes; the kernels and their steps
still load ready to run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from attnkit.kernels import jit

# A training step and a decode step in float32 (and with "float64", a float64 forward, which
# compiles new kernels linking the helpers the cache holds as bitcode), against the NumPy
# reference; then what the cache holds, by kind, and what this process compiled and deferred.
_STEPS = r"""
import glob, io, json, pickle, sys
import numpy as np, torch
from numba.core import event
import attnkit
from attnkit.kernels import jit
from attnkit.reference import attention, attention_backward

compiled = []
class Count(event.Listener):
    def on_start(self, ev): compiled.append(ev.data["dispatcher"].py_func.__qualname__)
    def on_end(self, ev): pass
event.register("numba:compile", Count())

libraries = []
real = jit.numba_codegen.JITCodeLibrary._finalize_final_module
def spy(self):
    real(self)
    libraries.append(self)
jit.numba_codegen.JITCodeLibrary._finalize_final_module = spy

rng = np.random.default_rng(int(sys.argv[2]))
errors = []
q, k, v, d_out = (torch.from_numpy(rng.standard_normal((1, 4, 40, 16)).astype(np.float32)) for _ in range(4))
leaves = [x.clone().requires_grad_() for x in (q, k, v)]
out = attnkit.attention(*leaves, causal=True)
out.backward(d_out)
want_out, want_lse = attention(*(x.double().numpy() for x in (q, k, v)), causal=True, return_lse=True)
want_grads = attention_backward(*(x.double().numpy() for x in (q, k, v)), want_out, d_out.double().numpy(), want_lse,
                                causal=True)[:3]
errors.append(float(np.abs(out.detach().double().numpy() - want_out).max()))
errors += [float(np.abs(x.grad.double().numpy() - g).max()) for x, g in zip(leaves, want_grads)]
q1 = q[:, :, -1:]
errors.append(float(np.abs(attnkit.attention(q1, k, v).double().numpy()
                           - attention(*(x.double().numpy() for x in (q1, k, v)))).max()))
if "float64" in sys.argv[3:]:
    compiled.append("-- float64 --")
    q64, k64, v64 = (x.double() for x in (q, k, v))
    errors.append(float(np.abs(attnkit.attention(q64, k64, v64).numpy()
                               - attention(q64.numpy(), k64.numpy(), v64.numpy())).max()))

class Anything:
    def __new__(cls, *a, **kw): return object.__new__(cls)
    def __init__(self, *a, **kw): pass
    def __setstate__(self, state): pass
class NoImports(pickle.Unpickler):
    def find_class(self, module, name): return Anything
kinds = {}
for path in glob.glob(sys.argv[1] + "/**/*.nbc", recursive=True):
    name, kind, _ = NoImports(io.BytesIO(open(path, "rb").read())).load()[0]
    kinds.setdefault(kind, []).append(name)
deferred = [lib.name for lib in libraries if getattr(lib, "_attnkit_deferred", False)]
# of those, the ones whose module passes are still to run (a caller ran them over the linked IR)
unoptimized = [lib.name for lib in libraries if getattr(lib, "_attnkit_deferred", False) and lib._attnkit_unoptimized]
tuned_alone = [lib.name for lib in libraries if jit._tuned_alone(lib._final_module)]
print(json.dumps(dict(errors=errors, kinds=kinds, compiled=compiled, deferred=deferred, unoptimized=unoptimized,
                      tuned_alone=tuned_alone, lazy=jit.LAZY_MACHINE_CODE)))
"""

_STEP_NAMES = {"_forward_worker", "_backward_worker", "_decode_worker", "_pack_forward_head", "_finish_kv_grad"}


def _run(cache, seed, *extra, lazy="1"):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache), ATTNKIT_COMPILE_NOTICE="0", ATTNKIT_WHILE_COMPILING="wait",
               ATTNKIT_LAZY_MACHINE_CODE=lazy)  # fmt: skip
    result = subprocess.run([sys.executable, "-c", _STEPS, str(cache), str(seed), *extra], env=env,
                            capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not jit.LAZY_MACHINE_CODE, reason="Numba is laid out otherwise here: every library compiles")
def test_link_only_helpers_get_no_machine_code_and_the_cache_still_loads_the_kernels_ready_to_run(tmp_path):
    cache = tmp_path / "cache"
    first = _run(cache, 1)
    assert first["lazy"] and max(first["errors"]) < 1e-4, first["errors"]
    assert len(first["deferred"]) >= 10, first["deferred"]  # helpers left as LLVM IR in this process
    assert not _STEP_NAMES & set(first["deferred"]), first["deferred"]  # steps ran: they have machine code
    # and their module passes skipped, but for helpers that ask for a vector width of their own
    assert set(first["deferred"]) - set(first["unoptimized"]) <= set(first["tuned_alone"]), first
    assert len(first["unoptimized"]) >= 10, first["unoptimized"]
    kinds = first["kinds"]
    assert len(kinds.get("bitcode", [])) >= 10, kinds  # the helpers, cached as bitcode to link
    assert _STEP_NAMES <= set(kinds["object"]) and not _STEP_NAMES & set(kinds.get("bitcode", [])), kinds
    # A new process loads every kernel and step from the cache, ready to run: nothing compiles. Then
    # a float64 forward compiles its kernels, linking helpers the cache holds as bitcode.
    second = _run(cache, 2, "float64")
    assert max(second["errors"]) < 1e-4, second["errors"]
    float64_from = second["compiled"].index("-- float64 --")
    assert second["compiled"][:float64_from] == [], second["compiled"][:float64_from]
    assert "_forward_kernel" in second["compiled"][float64_from:], second["compiled"]  # float64 compiled here
    # The switch: every library compiled as Numba does, machine code in the cache.
    plain = _run(tmp_path / "plain", 3, lazy="0")
    assert not plain["lazy"] and max(plain["errors"]) < 1e-4 and not plain["deferred"], plain
    assert set(plain["kinds"]) == {"object"}, plain["kinds"]
