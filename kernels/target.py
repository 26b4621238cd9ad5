"""The CPU that Numba compiles for, and what the micro-kernels may use on it.

Numba compiles for the host unless NUMBA_CPU_NAME / NUMBA_CPU_FEATURES say
otherwise (people set them to share a cache between machines, and the tests
set them to build for CPUs this machine is not). Every instruction choice of
the kernels follows *that* target, never llvmlite's host features: an
intrinsic the target lacks (VDPBF16PS on Haswell, say) makes LLVM abort the
process while compiling, with no Python exception to catch.

What the target has is asked of LLVM itself: a few one-line functions are
compiled for Numba's target machine (same triple, CPU name and feature string)
and the assembly is read. That settles every combination of a CPU name and a
partial feature list the way LLVM will settle it for the kernels, with no
table of CPU names to keep up to date. The probe never runs the code it
compiles, so nothing in it can fault.

On this probe rest:
- LANES, the float32 lanes of the widest vector register: 16 with AVX-512F,
  8 with AVX/AVX2, 4 with SSE or NEON (AArch64);
- REGISTERS, the vector registers: 32 with AVX-512F or on AArch64, else 16;
- FMA, fused multiply-add in hardware (x86 `fma`; always on AArch64);
- bf16_dot, a bf16 pair dot product into float32 lanes: VDPBF16PS (x86
  avx512_bf16 with AVX-512F, 16 lanes) or BFDOT (AArch64 with the bf16
  extension: Apple M2 and later, Graviton 3 and 4, Neoverse V1/V2/N2; 4 lanes);
- BF16_CONVERT, a float32 -> bf16 conversion instruction (VCVTNEPS2BF16, or
  BFCVTN on AArch64 with the bf16 extension); elsewhere integer rounding;
- amx, Intel AMX tiles with bf16 (amx-tile and amx-bf16). Not probed by compiling (an AMX
  instruction for a target without it stops LLVM): read off the feature string Numba passes,
  which lists every feature for the host; a CPU name given without features counts as no AMX.
"""

from __future__ import annotations

import functools
import platform
import re
from dataclasses import dataclass

import llvmlite.binding as llvm

__all__ = ["Target", "TARGET", "assembly", "describe", "function_assembly", "probe"]


@dataclass(frozen=True)
class Target:
    """What the micro-kernels may use on the CPU Numba compiles for."""

    triple: str
    cpu: str  # the CPU name LLVM compiles for ("znver5", "haswell", "generic", ...)
    features: str  # the feature string Numba passes to LLVM ("" = the CPU name's own)
    arch: str  # "x86_64", "aarch64" or what the triple names
    lanes: int
    registers: int
    fma: bool
    bf16_dot: bool
    bf16_convert: bool
    host: bool  # Numba compiles for the CPU it runs on (no NUMBA_CPU_NAME / NUMBA_CPU_FEATURES)
    amx: bool = False  # AMX tiles with bf16 products (amx-tile, amx-bf16)

    @property
    def vector_isa(self):
        """The vector instruction set of the float32 micro-kernel: AVX-512, AVX2, AVX, SSE or NEON."""
        if self.arch == "aarch64":
            return "NEON"
        if self.arch != "x86_64":
            return f"{self.lanes} x float32 vectors"
        return {16: "AVX-512", 8: "AVX2" if self.fma else "AVX"}.get(self.lanes, "SSE")

    @property
    def isa(self):
        """vector_isa, with BF16 where the target has bf16 instructions."""
        return self.vector_isa + (" + BF16" if self.bf16_dot else "") + (" + AMX" if self.amx else "")


def _numba_target():
    """(triple, cpu name, features, host?) exactly as Numba's CPU code generator uses them."""
    from numba.core import config
    from numba.core.codegen import get_host_cpu_features, initialize_llvm

    initialize_llvm()
    triple = llvm.get_process_triple()
    cpu = config.CPU_NAME or llvm.get_host_cpu_name()
    features = config.CPU_FEATURES if config.CPU_FEATURES is not None else get_host_cpu_features()
    host = config.CPU_NAME is None and config.CPU_FEATURES is None
    return triple, cpu, features, host


_PROBE = """
define <16 x float> @attnkit_probe_fma(<16 x float> %a, <16 x float> %b, <16 x float> %c) {
  %r = call <16 x float> @llvm.fma.v16f32(<16 x float> %a, <16 x float> %b, <16 x float> %c)
  ret <16 x float> %r
}
define <8 x float> @attnkit_probe_fma8(<8 x float> %a, <8 x float> %b, <8 x float> %c) {
  %r = call <8 x float> @llvm.fma.v8f32(<8 x float> %a, <8 x float> %b, <8 x float> %c)
  ret <8 x float> %r
}
define <16 x bfloat> @attnkit_probe_bf16(<16 x float> %a) {
  %r = fptrunc <16 x float> %a to <16 x bfloat>
  ret <16 x bfloat> %r
}
declare <16 x float> @llvm.fma.v16f32(<16 x float>, <16 x float>, <16 x float>)
declare <8 x float> @llvm.fma.v8f32(<8 x float>, <8 x float>, <8 x float>)
"""


def assembly(ir_text, triple, cpu, features, opt=3):
    """The assembly LLVM emits for ir_text on (triple, cpu, features) after its O`opt` pipeline
    (as Numba optimises a module before code generation); nothing is run."""
    if triple != llvm.get_process_triple():
        llvm.initialize_all_targets()  # cross-compiling (tests, the target survey): every backend llvmlite has
        llvm.initialize_all_asmprinters()
    module = llvm.parse_assembly(ir_text)
    module.triple = triple
    machine = llvm.Target.from_triple(triple).create_target_machine(cpu=cpu, features=features, opt=opt)
    module.verify()
    if opt:
        tuning = llvm.create_pipeline_tuning_options(speed_level=opt)
        builder = llvm.create_pass_builder(machine, tuning)
        builder.getModulePassManager().run(module, builder)
    return machine.emit_assembly(module)


def function_assembly(text, name):
    """One function's lines in emitted assembly (from its label to its end), or "" when absent."""
    match = re.search(rf"^_?{name}:.*?(?=^\s*\.(?:cfi_endproc|size)|\Z)", text, re.S | re.M)
    return match.group(0) if match else ""


def probe(triple, cpu, features, host=False):
    """A Target for (triple, cpu, features), read off the assembly LLVM emits for them."""
    arch = triple.split("-")[0]
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(arch, arch)
    text = assembly(_PROBE, triple, cpu, features)
    fma16, fma8 = function_assembly(text, "attnkit_probe_fma"), function_assembly(text, "attnkit_probe_fma8")
    bf16 = function_assembly(text, "attnkit_probe_bf16")
    if arch == "x86_64":
        avx512 = "zmm" in fma16
        lanes = 16 if avx512 else 8 if "ymm" in fma8 else 4
        fma = "vfmadd" in fma8
        listed = set(features.split(","))
        return Target(triple, cpu, features, arch, lanes, 32 if avx512 else 16, fma,
                      bf16_dot=avx512 and "vcvtneps2bf16" in bf16 and "zmm" in bf16,
                      bf16_convert="vcvtneps2bf16" in bf16, host=host,
                      amx={"+amx-tile", "+amx-bf16"} <= listed)  # fmt: skip
    if arch == "aarch64":
        has_bf16 = "bfcvt" in bf16  # the bf16 extension brings BFCVT(N) and BFDOT together
        return Target(triple, cpu, features, arch, 4, 32, "fmla" in fma16, bf16_dot=has_bf16,
                      bf16_convert=has_bf16, host=host)  # fmt: skip
    return Target(triple, cpu, features, arch, 4, 16, False, False, False, host)


@functools.lru_cache(maxsize=1)
def _current():
    return probe(*_numba_target())


TARGET = _current()


def describe(target=TARGET):
    """One line for `attnkit info` and explain(): the target, its vector width and where it came from."""
    origin = "this CPU" if target.host else "NUMBA_CPU_NAME / NUMBA_CPU_FEATURES"
    return (f"{target.cpu} ({target.arch}, {target.isa}: {target.lanes} float32 lanes, "
            f"{target.registers} vector registers{', FMA' if target.fma else ''}; compiled for {origin}; "
            f"{platform.system() or 'unknown OS'})")  # fmt: skip
