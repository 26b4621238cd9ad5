"""Every CPU target: the kernels built for CPUs this machine is not, and run on the ones it can emulate.

Two kinds of check:
- cross-compilation: the micro-kernels and row operations are built for
  x86 (haswell, skylake-avx512, znver4, generic) and AArch64 (generic,
  neoverse-v1, apple-m1, apple-m2) at O3 and the assembly is read: the expected
  instructions are there, the ones a target lacks are not, and the inner
  loop of every micro-kernel touches no stack (no spills);
- emulation: tests/target_checks.py runs in a process whose Numba compiles
  for haswell (AVX2), skylake-avx512 (AVX-512F without BF16) or generic
  x86-64, each with its own Numba cache folder, and for the host; the
  kernels are checked against the reference there.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
from llvmlite import ir

from attnkit.kernels import key_dots, microkernels, pv_pairs, simd
from attnkit.kernels.target import TARGET, assembly, function_assembly, probe

X86, ARM = "x86_64-unknown-linux-gnu", "aarch64-unknown-linux-gnu"
HASWELL = "+avx,+avx2,+fma,+sse4.2,+popcnt,+bmi2,+f16c"
SKYLAKE_AVX512 = HASWELL + ",+avx512f,+avx512bw,+avx512dq,+avx512vl,+avx512cd"

# (triple, cpu, features, lanes, bf16 kernel, float32 FMA instruction, bf16 instruction)
CROSS_TARGETS = [
    (X86, "haswell", "", 8, "widen", r"vfmadd\d+ps\s+%ymm", r"vpslld"),
    (X86, "skylake-avx512", "", 16, "widen", r"vfmadd\d+ps\s+%zmm", r"vpslld"),
    (X86, "znver4", "", 16, "dpbf16", r"vfmadd\d+ps\s+%zmm", r"vdpbf16ps\s+%zmm"),
    (X86, "generic", "", 4, "widen", r"mulps", r"pslld"),
    (ARM, "generic", "", 4, "widen", r"fmla\s+v\d+\.4s", r"shl\s+v\d+\.4s"),
    (ARM, "neoverse-v1", "", 4, "bfdot", r"fmla\s+v\d+\.4s", r"bfdot\s+v\d+\.4s"),
    (ARM, "apple-m1", "", 4, "widen", r"fmla\s+v\d+\.4s", r"shl\s+v\d+\.4s"),
    (ARM, "apple-m2", "", 4, "bfdot", r"fmla\s+v\d+\.4s", r"bfdot\s+v\d+\.4s"),
]


def target_id(case):
    return f"{case[0].split('-')[0]}-{case[1]}"


def function_text(text, name):
    """One function's lines from emitted assembly (target.function_assembly), which must be there."""
    body = function_assembly(text, name)
    assert body, f"{name} not in the assembly"
    return body


_BRANCH = re.compile(r"^\s*(?:j\w+|b(?:\.\w+)?|cbn?z|tbn?z)\s+(?:\w+,\s*)*(?:#\d+,\s*)?(\.LBB\w+)", re.M)


def loops(text):
    """Each loop of emitted assembly: the lines from a label up to a branch back to it."""
    lines = text.splitlines()
    labels = {line.rstrip(":").strip(): i for i, line in enumerate(lines) if re.match(r"^\.LBB\w+:", line)}
    for i, line in enumerate(lines):
        match = _BRANCH.match(line)
        if match and labels.get(match.group(1), i + 1) <= i:
            yield lines[labels[match.group(1)] : i + 1]


def inner_loop(text, work):
    """The lines of the loop holding the most `work` instructions (none: [])."""
    counted = [(sum(bool(re.search(work, x)) for x in body), body) for body in loops(text)]
    return max(((n, body) for n, body in counted if n), key=lambda pair: pair[0], default=(0, []))[1]


def innermost_loop(text, work):
    """The shortest loop holding a `work` instruction: the loop over keys of a function whose outer
    loop (over column blocks) holds it too."""
    return min((body for body in loops(text) if any(re.search(work, x) for x in body)), key=len, default=[])


def stack_traffic(loop):
    """Lines of a loop that read or write the stack (register spills and reloads)."""
    return [line for line in loop if re.search(r"\(%rsp\)|\(%rbp\)|\[sp\b|\[x29\b", line)]


def compile_for(triple, cpu, features, build):
    module = ir.Module(name="attnkit_cross")
    names = build(module)
    for function in module.functions:
        if not function.is_declaration:
            function.linkage = ""  # external: kept by the optimiser although nothing here calls it
    return assembly(str(module), triple, cpu, features), names


@pytest.mark.parametrize("case", CROSS_TARGETS, ids=target_id)
def test_micro_kernels_cross_compile_without_spills(case):
    triple, cpu, features, lanes, bf16_kind, fma, bf16_instruction = case
    target = probe(triple, cpu, features)
    assert target.lanes == lanes and microkernels.bf16_kind(target) == bf16_kind
    text, names = compile_for(triple, cpu, features, lambda m: microkernels.define_target_kernels(m, target))
    for kind, instruction in (("f32", fma), (bf16_kind, bf16_instruction)):
        body = function_text(text, names[kind])
        loop = inner_loop(body, fma if kind == "f32" or kind == "widen" else bf16_instruction)
        assert loop, f"{cpu} {kind}: no loop found in\n{body}"
        assert re.search(instruction, "\n".join(loop)), f"{cpu} {kind}: no {instruction!r} in the inner loop"
        assert not stack_traffic(loop), f"{cpu} {kind} {microkernels.register_block(kind, target)}: spills:\n" + \
            "\n".join(stack_traffic(loop))
    if not target.bf16_dot:
        assert not re.search(r"vdpbf16ps|bfdot", text)
    convert = function_text(text, names["f32_to_bf16"])
    assert ("cvtneps2bf16" in convert or "bfcvt" in convert) == target.bf16_convert
    assert "__truncsfbf2" not in text  # not resolvable under Numba's JIT


@pytest.mark.parametrize("case", CROSS_TARGETS, ids=target_id)
def test_decode_dots_cross_compile_without_spills(case):
    """Decode's block dot products (kernels/key_dots.py) at each target's width: the FMAs (or the bf16
    pair product) in the loop over D, nothing spilled there (4 rows x lanes / 4 keys accumulators, or
    1 row x lanes keys: 16 of 32 registers with AVX-512, 8 of 16 with AVX2), for float32 K, bf16 bits
    widened, and bf16 pairs where the target multiplies them (VDPBF16PS, BFDOT)."""
    triple, cpu, features, lanes, bf16_kind, fma, bf16_instruction = case
    target = probe(triple, cpu, features)
    elements = {"f32": fma, "bf16": fma}
    if bf16_kind in ("dpbf16", "bfdot"):  # bf16 K and q multiplied as pairs (key_dots.PAIRS)
        elements[bf16_kind] = bf16_instruction
    shapes = [(element, rows) for element in elements for rows in (4, 1)]  # a GQA group's 4 rows, MHA's 1
    text, names = compile_for(triple, cpu, features, lambda m: [
        key_dots.dots_function(m, element, target.lanes, rows).name for element, rows in shapes])
    for name, (element, _) in zip(names, shapes):
        # x86 may fold a load into the FMA: "vfmadd231ps 64(%rdi,%rax), %zmm1, %zmm2"
        instruction = elements[element].replace(r"\s+%", r"\s+(?:[^%\n]*\([^)]*\),\s*)?%")
        loop = inner_loop(function_text(text, name), instruction)
        assert loop and re.search(instruction, "\n".join(loop)), f"{cpu} {name}: no {instruction!r} in a loop"
        assert not stack_traffic(loop), f"{cpu} {name}: spills:\n" + "\n".join(stack_traffic(loop))


@pytest.mark.parametrize("case", CROSS_TARGETS, ids=target_id)
def test_decode_pv_pairs_cross_compile_without_spills(case):
    """Decode's bf16 P V on the pair product (kernels/pv_pairs.py), where the target has one, for 4 rows
    and for MHA's 1: the pair instruction in the loop over keys, nothing spilled there (4 rows x 4
    accumulators, 4 V pairs and the rows' weight pairs in 32 registers; 2 accumulators a row with 16)."""
    triple, cpu, features, lanes, bf16_kind, fma, bf16_instruction = case
    if bf16_kind not in ("dpbf16", "bfdot"):
        pytest.skip(f"{cpu}: no bf16 pair product, so decode's P V widens bf16 (decode.py _pv_four_rows_blocked)")
    target = probe(triple, cpu, features)
    groups = 4 if target.registers >= 32 else 2  # pv_pairs' own choice for this target (1 row: twice)
    shapes = [(4, groups), (1, 2 * groups)]  # a GQA group's 4 rows, MHA's 1
    text, names = compile_for(triple, cpu, features, lambda m: [
        pv_pairs.pv_pairs_function(m, bf16_kind, target.lanes, n, rows).name for rows, n in shapes])
    for name, (rows, groups) in zip(names, shapes):
        loop = innermost_loop(function_text(text, name), bf16_instruction)
        assert loop and re.search(bf16_instruction, "\n".join(loop)), f"{cpu} {name}: no {bf16_instruction!r} in a loop"
        assert len(re.findall(bf16_instruction, "\n".join(loop))) >= rows * groups  # rows x groups a key pair
        assert not stack_traffic(loop), f"{cpu} {name}: spills:\n" + "\n".join(stack_traffic(loop))
    assert "__truncsfbf2" not in text  # P's rounding is the target's instruction, not a library call


def test_amx_is_read_off_the_feature_string():
    """AMX only where the features Numba passes list amx-tile and amx-bf16 (the host's list does,
    on a CPU that has them); a CPU name alone never turns it on (LLVM would stop on an AMX
    instruction for a CPU without it)."""
    listed = SKYLAKE_AVX512 + ",+avx512bf16,+amx-tile,+amx-bf16"
    assert probe(X86, "sapphirerapids", listed).amx
    assert not probe(X86, "sapphirerapids", listed.replace("+amx-bf16", "-amx-bf16")).amx
    assert not probe(X86, "sapphirerapids", "").amx and not probe(X86, "znver4", "").amx


def test_spill_check_sees_spills():
    """The check above would fail a block too big for the register file (6 x 4 widened on AVX2)."""
    assert microkernels.register_block("widen", probe(X86, "haswell", "")) != (6, 4)
    text, names = compile_for(X86, "haswell", "", lambda m: [microkernels.define_micro_kernel(m, "widen", 8, 6, 4).name])
    assert stack_traffic(inner_loop(function_text(text, names[0]), r"vfmadd"))


@pytest.mark.parametrize("case", CROSS_TARGETS, ids=target_id)
def test_row_operations_cross_compile(case):
    """Softmax row passes: vector code with no libm calls on every target (rint is one instruction
    from SSE4.1 / on AArch64; generic x86-64 calls nothing either, see below)."""
    triple, cpu, features, *_ = case
    target = probe(triple, cpu, features)
    text, names = compile_for(triple, cpu, features, lambda module: simd.define_row_functions(module, target=target))
    exp2 = function_text(text, names[1])
    assert not re.search(r"call\w*\s+_?(fmaf|exp2f|expf)\b|\bbl\s+_?(fmaf|exp2f|expf)\b", exp2)
    expected = {"aarch64": r"frintn|frintx", "x86_64": r"vrndscaleps|vroundps|roundps"}[target_id(case).split("-")[0]]
    if cpu != "generic" or triple == ARM:
        assert re.search(expected, exp2), f"{cpu}: no vector rounding in exp2"
    # 2**n applied by AVX-512's VSCALEF where the target has it, by the exponent's bits elsewhere
    assert ("vscalefps" in exp2) == (target.arch == "x86_64" and target.lanes == 16)


def test_host_target_matches_numba():
    """The probed target is the one Numba compiles for here (name and features as Numba passes them)."""
    from numba.core import config

    assert TARGET.host == (config.CPU_NAME is None and config.CPU_FEATURES is None)
    assert TARGET.lanes in (4, 8, 16) and TARGET.registers in (16, 32)


# ---------------------------------------------------------------------------
# Emulated targets: the kernels run, compiled for another CPU
# ---------------------------------------------------------------------------

EMULATED = {
    "haswell": {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": HASWELL},
    "skylake-avx512": {"NUMBA_CPU_NAME": "skylake-avx512", "NUMBA_CPU_FEATURES": SKYLAKE_AVX512},
    "generic": {"NUMBA_CPU_NAME": "generic"},
    "host": {},
}
if platform.machine().lower() not in ("x86_64", "amd64"):  # x86 code cannot run here: the host alone
    EMULATED = {"host": {}}
CHECKS = Path(__file__).with_name("target_checks.py")


def missing_on_host(name):
    """The instruction-set features target `name` is compiled with that this CPU lacks (its code would
    stop at the first such instruction: an AVX-512 target on an AVX2 host)."""
    from llvmlite import binding as llvm

    host = llvm.get_host_cpu_features()
    listed = EMULATED[name].get("NUMBA_CPU_FEATURES", "")
    return [f[1:] for f in listed.split(",") if f.startswith("+") and not host.get(f[1:], False)]


RUNNABLE = [name for name in EMULATED if not missing_on_host(name)]


def numba_cache(name):
    """A Numba cache folder of the target's own, kept between runs (the host uses the package's)."""
    folder = Path(os.environ.get("ATTNKIT_TARGET_CACHE", Path.home() / ".cache" / "attnkit-targets")) / name
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder)


def target_environment(name, extra=None):
    """This process's environment, Numba compiling for target `name` with its own cache."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("NUMBA_CPU")}
    environment.update(EMULATED[name], **(extra or {}))
    if name != "host":
        environment["NUMBA_CACHE_DIR"] = numba_cache(name)
    return environment


def run_checks(name, *arguments, extra=None):
    return subprocess.run([sys.executable, *arguments], env=target_environment(name, extra), capture_output=True,
                          text=True, timeout=900)  # fmt: skip


@pytest.fixture(scope="module")
def emulated_runs():
    """Start every target's process at once (two cores: the compiles overlap), collect them as asked."""
    processes = {
        name: subprocess.Popen([sys.executable, str(CHECKS)], env=target_environment(name), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        for name in RUNNABLE
    }  # fmt: skip
    results = {}
    yield lambda name: results.setdefault(name, processes[name].communicate(timeout=1200))
    for process in processes.values():
        if process.poll() is None:
            process.kill()


@pytest.mark.parametrize("name", list(EMULATED))
def test_kernels_on_target(name, emulated_runs):
    if name not in RUNNABLE:
        pytest.skip(f"this CPU cannot run {name}'s code (it lacks {', '.join(missing_on_host(name))}); "
                    "the cross-compiled assembly checks still read it")  # fmt: skip
    stdout, stderr = emulated_runs(name)
    assert stdout.rstrip().endswith("done"), f"{name}:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    lines = stdout.splitlines()
    assert sum(line.startswith("ok ") for line in lines) == 41, stdout  # every check of tests/target_checks.py
    if name == "haswell":
        assert "AVX2" in lines[0] and "8 float32 lanes" in lines[0] and "paths widen fma" in stdout
    if name == "skylake-avx512":
        assert "AVX-512:" in lines[0] and "paths widen fma" in stdout
    if name == "generic":
        assert "SSE" in lines[0] and "paths fp32 blas" in stdout


@pytest.mark.skipif("haswell" not in EMULATED, reason="an x86 target runs only on an x86-64 host")
def test_forcing_a_path_the_target_lacks_is_a_value_error():
    """ATTNKIT_CPU_BF16=dpbf16 on a Haswell target: a ValueError at the call, never an abort."""
    script = (
        "import numpy as np, attnkit\n"
        "q = np.random.default_rng(0).random((1, 2, 64, 32)).astype(np.float32)\n"
        "try:\n"
        "    attnkit.attention(q, q, q)\n"
        "except ValueError as error:\n"
        "    print('refused:', error)\n"
    )
    result = run_checks("haswell", "-c", script, extra={"ATTNKIT_CPU_BF16": "dpbf16"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "refused: ATTNKIT_CPU_BF16=dpbf16, but the target Numba compiles for (haswell" in result.stdout
    assert "AVX-512 BF16" in result.stdout
