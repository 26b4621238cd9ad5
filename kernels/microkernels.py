"""Tile products for the CPU kernel: micro-kernels shaped per target (bf16 pairs, float32 FMAs), callable from Numba.

Why our own: the issue that asked for this (bf16 at AMX speed) assumed MKL's
`cblas_gemm_bf16bf16f32`, which torch's libtorch_cpu exports. On the project's
machines of 2026-12-02 (AMD EPYC, Zen 5: avx512_bf16, no AMX) that MKL runs its
generic path. One thread, on the forward's tile products (`python -m
attnkit.bench.cpu_parts`, bench/results/cpu-parts.txt):

  MKL sgemm ~88-91, MKL's bf16 GEMM 105-138 (on 128x512x64 ... 128x64x512),
  this module's bf16 micro-kernel 420-426 and float32 micro-kernel 198-215 GFLOP/s

while torch's own bf16 matmul (oneDNN) reached 700-744 GFLOP/s on two threads.
oneDNN's GEMM is not exported, so this module writes its micro-kernels as LLVM
IR, one generator for every CPU (kernels/target.py says which CPU Numba
compiles for; nothing here looks at the host):

- float32: C += A B with fused multiply-adds on vectors of the target's width
  (16 lanes with AVX-512, 8 with AVX2, 4 with NEON);
- bf16 with AVX-512 BF16: VDPBF16PS, which multiplies 16 pairs of bf16 numbers
  and adds both products into 16 float32 lanes; on AArch64 with the bf16
  extension BFDOT does the same on 4 lanes;
- bf16 elsewhere: the same pair-packed operands, each pair widened to two
  float32 vectors as it is loaded (a shift and a mask) and multiplied with
  FMAs. Nothing is converted ahead of the product;
- bf16 on a CPU with AMX (Intel Sapphire Rapids and later) whose OS grants it:
  kernels/amx.py's tiles take the same operands (pair-packing is AMX's layout
  for B), 4-7x the VDPBF16PS micro-kernel on the 2-vCPU Xeon of 2026-12-03.

The register block (MR rows of C times NR vectors) is shaped per target by its
register count and was chosen by measuring the candidates
(`python -m attnkit.bench.cpu_blocks`, bench/results/cpu-targets.md); the
cross-compiled assembly of every block (tests/test_targets.py) has no stack
traffic in its inner loop.

Layout. C (M, N) float32 += A (M, K) @ B (K, N), where
- A is bf16 (stored as uint16), row-major, K even (rows padded with a zero),
  or float32;
- bf16 B is "pair-packed": Bp[p, n, t] = B[2p + t, n], so one vector load gives
  LANES columns times one pair of the reduction axis; float32 B holds plain rows;
- C rows are padded to a multiple of 16 columns (PAD), so no load or store
  needs a mask on any target (16 is a multiple of every vector width).

Versions (one thread):
  v1  (Zen 5) AVX-512 only, 6 x 64 block: bf16 402-446 GFLOP/s, float32 198-215
      on the forward's tile products (bench/results/cpu-parts.txt).
  v2  one generator for every target (lanes and block from kernels/target.py);
      the widened bf16 kernel first split A's pair in general registers and
      broadcast each half (AVX2: 56 GFLOP/s against float32's 98), then
      broadcast the pair from memory and split it in vector registers (83-88).

bf16 <-> float32: float32 -> bf16 rounds to nearest even (one instruction where
the target has it, integer arithmetic elsewhere: LLVM's soft conversion,
`__truncsfbf2`, is not resolvable under Numba's JIT); bf16 -> float32 is exact
(a shift).
"""

from __future__ import annotations

import os

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .bf16 import (  # noqa: F401  (re-exported: the conversions are part of this module's interface)
    _BFloat, bf16_bits, bf16_of, bf16_to_f32, bf16_to_float32, f32_to_bf16, f32_to_bf16_ir,
)
from .amx import os_grants_amx, tiles as _amx_tiles
from .jit import jit, set_code_variant
from .target import TARGET

__all__ = [
    "BF16_DOT",
    "BF16_PRODUCTS",
    "BF16_DETAIL",
    "BLOCKS",
    "F32_PRODUCTS",
    "F32_DETAIL",
    "PAD",
    "bf16_bits",
    "bf16_kind",
    "bf16_of",
    "bf16_to_float32",
    "bf16_to_f32",
    "check_paths",
    "define_micro_kernel",
    "define_target_kernels",
    "f32_to_bf16",
    "gemm",
    "gemm_f32",
    "micro_kernel_intrinsic",
    "pack_pair_columns",
    "pack_pairs",
    "padded",
    "register_block",
    "tile_loop",
]

PAD = 16  # C, and B's columns, are padded to this many columns


def bf16_kind(target):
    """The bf16 micro-kernel a target gets: "dpbf16" (x86 VDPBF16PS) or "bfdot" (AArch64 BFDOT)
    where it has a bf16 dot product, else "widen"."""
    if not target.bf16_dot:
        return "widen"
    return "bfdot" if target.arch == "aarch64" else "dpbf16"


def register_block(kind, target=TARGET):
    """(MR rows, NR vectors) of C held in registers by the micro-kernel of `kind` on `target`.

    kind: "f32", "dpbf16" (VDPBF16PS), "bfdot" (AArch64 BFDOT) or "widen" (bf16 widened to float32).
    Live registers per step: MR * NR accumulators, the NR vectors of B (two
    each when bf16 is widened), the broadcast of A (two when widened). Chosen
    among the blocks that fit by timing them (`python -m attnkit.bench.cpu_blocks`
    on emulated targets, bench/results/cpu-targets.md); NEON's by the same
    count and its cross-compiled assembly (no AArch64 hardware here to time).
    """
    if target.registers >= 32:
        # AVX-512 and NEON: 6 x 4 = 24 accumulators + 4 B + 1 A; widened 4 x 4 = 16 + 8 + 2
        # (AVX-512F, D 64 / 128: 4 x 4 136-141 GFLOP/s, 6 x 3 132, 5 x 3 125-127)
        return (4, 4) if kind == "widen" else (6, 4)  # BFDOT: 6 x 4 as VDPBF16PS
    # AVX2 / SSE: 16 registers. 6 x 2 = 12 + 2 + 1 (AVX2: 96-100 GFLOP/s, 4 x 3 90-96);
    # widened 4 x 2 = 8 + 4 + 2 (83-88; 5 x 2 spills: 67-69); without FMA each product needs a
    # register of its own: 3 x 2 (never chosen there automatically: such targets convert bf16)
    if kind == "widen":
        return (4, 2) if target.fma else (3, 2)
    return (6, 2)


def _choose_path(variable, choices, auto, unavailable):
    """(path, why, error) for one product path from an environment variable.

    choices: {name: detail}; auto: the target's own choice; unavailable:
    {name: why the target cannot run it}. A forced path the target cannot run
    is not taken: `error` says why, and check_paths() raises it at the call.
    """
    choice = os.environ.get(variable, "auto").strip().lower() or "auto"
    if choice not in ("auto", *choices):
        return auto, choices[auto], f"{variable} must be one of auto, {', '.join(choices)}; got {choice!r}"
    if choice == "auto":
        return auto, choices[auto], None
    if choice in unavailable:
        return auto, choices[auto], f"{variable}={choice}, but {unavailable[choice]}"
    return choice, f"{variable}={choice}: {choices[choice]}", None


def _target_name(target):
    return f"the target Numba compiles for ({target.cpu}, {target.isa})"


def choose_bf16_path(target=TARGET, amx_grant=None):
    """(path, detail, error or None): whether bf16 runs on AMX tiles ("amx"), VDPBF16PS ("dpbf16") or
    BFDOT ("bfdot"), widened to float32 in the micro-kernel ("widen"), or converted to float32 at the
    boundary ("fp32"), from ATTNKIT_CPU_BF16 and what the target has (an error is raised at the call).
    amx_grant: (granted, why) from the OS (amx.os_grants_amx(), asked only for a target with AMX)."""
    choices = {
        "amx": "bf16 products on Intel AMX tiles (TDPBF16PS) with float32 accumulation",
        "dpbf16": "bf16 products on AVX-512 BF16 (VDPBF16PS) with float32 accumulation",
        "bfdot": "bf16 products on AArch64 BFDOT with float32 accumulation",
        "widen": f"bf16 stays bf16; each pair widened to float32 in the micro-kernel ({target.lanes}-lane FMAs)",
        "fp32": "bf16 runs in float32 (converted at the boundary)",
    }
    dot = bf16_kind(target)
    if target.amx and amx_grant is None:
        amx_grant = os_grants_amx()
    amx = target.amx and amx_grant[0]
    auto = "amx" if amx else dot if target.bf16_dot else "widen" if target.fma else "fp32"
    unavailable = {}
    if not target.amx:
        unavailable["amx"] = f"{_target_name(target)} has no AMX (amx-tile, amx-bf16)"
    elif not amx:
        unavailable["amx"] = f"{_target_name(target)} has AMX, but {amx_grant[1]}"
    if dot != "dpbf16":
        unavailable["dpbf16"] = f"{_target_name(target)} has no AVX-512 BF16 (avx512_bf16)"
    if dot != "bfdot":
        unavailable["bfdot"] = f"{_target_name(target)} is no AArch64 CPU with the bf16 extension"
    if target.bf16_dot:
        unavailable["widen"] = f"{_target_name(target)} runs bf16 on {dot} ({dot} or fp32)"
    elif not target.fma:
        unavailable["widen"] = f"{_target_name(target)} has no FMA"
    if amx and target.bf16_dot:
        detail = f"{choices['amx']}; VDPBF16PS with ATTNKIT_CPU_BF16=dpbf16"
        choices = {**choices, "amx": detail}
    return _choose_path("ATTNKIT_CPU_BF16", choices, auto, unavailable)


def choose_f32_path(target=TARGET):
    """(path, detail, error or None): whether float32 products run on the FMA micro-kernel ("fma")
    or the BLAS ("blas"), from ATTNKIT_CPU_F32 and the target."""
    choices = {
        "fma": f"float32 products on attnkit's {target.vector_isa} FMA micro-kernel ({target.lanes} lanes)",
        "blas": "float32 products through the BLAS",
    }
    unavailable = {} if target.fma else {"fma": f"{_target_name(target)} has no FMA"}
    return _choose_path("ATTNKIT_CPU_F32", choices, "fma" if target.fma else "blas", unavailable)


BF16_PRODUCTS, BF16_DETAIL, _BF16_ERROR = choose_bf16_path()
BF16_DOT = BF16_PRODUCTS in ("amx", "dpbf16", "bfdot")  # bf16 products faster than float32's: "medium" may use them
F32_PRODUCTS, F32_DETAIL, _F32_ERROR = choose_f32_path()
_BF16_KIND = bf16_kind(TARGET)
set_code_variant(f"bf16 products: {'amx' if BF16_PRODUCTS == 'amx' else _BF16_KIND}")  # gemm's code differs
BLOCKS = {"f32": register_block("f32"), "bf16": register_block(_BF16_KIND)}


def check_paths():
    """Raise the ValueError of an ATTNKIT_CPU_BF16 / ATTNKIT_CPU_F32 setting this target cannot honour."""
    for error in (_BF16_ERROR, _F32_ERROR):
        if error:
            raise ValueError(error)


@jit(inline="always")
def padded(n, multiple):
    """n rounded up to a multiple of `multiple`."""
    return -(-n // multiple) * multiple


# ---------------------------------------------------------------------------
# IR helpers
# ---------------------------------------------------------------------------


_F32 = ir.FloatType()
_I16, _I32, _I64 = ir.IntType(16), ir.IntType(32), ir.IntType(64)


def _splat(builder, vector_type, value):
    lane0 = builder.insert_element(ir.Constant(vector_type, ir.Undefined), value, ir.Constant(_I32, 0))
    zeros = ir.Constant(ir.VectorType(_I32, vector_type.count), [0] * vector_type.count)
    return builder.shuffle_vector(lane0, ir.Constant(vector_type, ir.Undefined), zeros)


def _intrinsic_call(builder, name, result, arguments):
    function = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(result, [a.type for a in arguments]), name
    )
    return builder.call(function, arguments)


class _Kind:
    """One micro-kernel's element types and update, for a vector width.

    "f32": A and B hold floats; acc += splat(a) * b (llvm.fmuladd: an FMA where
    the target has one). "dpbf16" / "bfdot": A holds bf16 pairs (one i32), a B
    vector LANES pairs; acc = VDPBF16PS / BFDOT(acc, splat(pair), b). "widen": the same
    operands, the pair's halves widened to float32 (even = low 16 bits shifted
    up, odd = the high 16 bits masked) and two multiply-adds.
    """

    def __init__(self, name, lanes):
        self.name, self.lanes = name, lanes
        self.pairs = name != "f32"
        self.element = _I16 if self.pairs else _F32  # the pointer type of A and B
        self.a_unit = _I32 if self.pairs else _F32  # one step of the reduction in A
        self.b_step = 2 * lanes if self.pairs else lanes  # elements per B vector
        self.f32x = ir.VectorType(_F32, lanes)
        self.b_vector_type = ir.VectorType(_I32, lanes) if self.pairs else self.f32x

    def _halves(self, builder, x):
        """(even, odd) bf16 halves of i32 pairs as float32 (scalar or vector)."""
        vector = isinstance(x.type, ir.VectorType)
        constant = (lambda v: ir.Constant(x.type, [v] * self.lanes)) if vector else (lambda v: ir.Constant(_I32, v))
        even = builder.shl(x, constant(16))
        odd = builder.and_(x, constant(-65536))  # 0xFFFF0000
        target = self.f32x if vector else _F32
        return builder.bitcast(even, target), builder.bitcast(odd, target)

    def prepare_b(self, builder, b_vector):
        if self.name == "widen":
            return self._halves(builder, b_vector)
        if self.name in ("dpbf16", "bfdot"):
            return builder.bitcast(b_vector, ir.VectorType(_BFloat(), 2 * self.lanes))
        return b_vector

    def prepare_a(self, builder, a_unit):
        if self.name == "widen":  # the pair broadcast from memory, then split in vector registers
            return self._halves(builder, _splat(builder, ir.VectorType(_I32, self.lanes), a_unit))
        if self.name in ("dpbf16", "bfdot"):
            return builder.bitcast(_splat(builder, ir.VectorType(_I32, self.lanes), a_unit),
                                   ir.VectorType(_BFloat(), 2 * self.lanes))  # fmt: skip
        return _splat(builder, self.f32x, a_unit)

    def update(self, builder, acc, a, b):
        fmuladd = f"llvm.fmuladd.v{self.lanes}f32"
        if self.name == "widen":
            acc = _intrinsic_call(builder, fmuladd, self.f32x, [a[0], b[0], acc])
            return _intrinsic_call(builder, fmuladd, self.f32x, [a[1], b[1], acc])
        if self.name == "dpbf16":
            return _intrinsic_call(builder, f"llvm.x86.avx512bf16.dpbf16ps.{32 * self.lanes}", self.f32x, [acc, a, b])
        if self.name == "bfdot":
            return _intrinsic_call(builder, f"llvm.aarch64.neon.bfdot.v{self.lanes}f32.v{2 * self.lanes}bf16",
                                   self.f32x, [acc, a, b])  # fmt: skip
        return _intrinsic_call(builder, fmuladd, self.f32x, [a, b, acc])


def _build_micro_kernel(mr, nr, kind):
    """IR body of C[m rows, LANES nr cols] (+)= A[m rows, steps] @ B[steps, LANES nr].

    Arguments: a, lda (elements), b, ldb (elements per row of B, a row being
    one reduction step: a bf16 pair or a float), c (float*), ldc (elements),
    m (1..mr), steps (pairs for bf16, elements for f32), accumulate (0 or 1).
    Rows of A and C past m are read from row m - 1 and never stored.
    """
    lanes, f32x = kind.lanes, kind.f32x

    def build(builder, args):
        a, lda, b, ldb, c, ldc, m, steps, accumulate = args
        last_row = builder.sub(m, ir.Constant(_I64, 1))
        rows = [builder.select(builder.icmp_signed("<", ir.Constant(_I64, r), m), ir.Constant(_I64, r), last_row)
                for r in range(mr)]
        a_rows = [builder.bitcast(builder.gep(a, [builder.mul(rows[r], lda)]), kind.a_unit.as_pointer())
                  for r in range(mr)]
        c_rows = [builder.gep(c, [builder.mul(rows[r], ldc)]) for r in range(mr)]
        keep = builder.icmp_signed("!=", accumulate, ir.Constant(_I64, 0))
        zero = ir.Constant(f32x, [0.0] * lanes)

        def c_vector(r, v):
            return builder.bitcast(builder.gep(c_rows[r], [ir.Constant(_I64, v * lanes)]), f32x.as_pointer())

        slots = [[cgutils.alloca_once_value(builder, builder.select(keep, builder.load(c_vector(r, v), align=4), zero))
                  for v in range(nr)] for r in range(mr)]  # fmt: skip
        with cgutils.for_range(builder, steps) as loop:
            p = loop.index
            b_row = builder.gep(b, [builder.mul(p, ldb)])
            b_vectors = [
                kind.prepare_b(builder, builder.load(builder.bitcast(
                    builder.gep(b_row, [ir.Constant(_I64, kind.b_step * v)]), kind.b_vector_type.as_pointer()),
                    align=4))
                for v in range(nr)
            ]  # fmt: skip
            for r in range(mr):
                a_value = kind.prepare_a(builder, builder.load(builder.gep(a_rows[r], [p]), align=4))
                for v in range(nr):
                    slot = slots[r][v]
                    builder.store(kind.update(builder, builder.load(slot), a_value, b_vectors[v]), slot)
        for r in range(mr):
            with builder.if_then(builder.icmp_signed("<", ir.Constant(_I64, r), m)):
                for v in range(nr):
                    builder.store(builder.load(slots[r][v]), c_vector(r, v), align=4)
        return ir.Constant(_I32, 0)

    return build


def _define(module, name, argument_types, build):
    function = cgutils.get_or_insert_function(module, ir.FunctionType(_I32, argument_types), name)
    if function.is_declaration:
        function.linkage = "internal"
        builder = ir.IRBuilder(function.append_basic_block("entry"))
        builder.ret(build(builder, function.args))
    return function


def _micro_kernel_arguments(kind):
    element_p = kind.element.as_pointer()
    return [element_p, _I64, element_p, _I64, _F32.as_pointer(), _I64, _I64, _I64, _I64]


def define_micro_kernel(module, kind_name, lanes, mr, nr):
    """The IR function of one micro-kernel in `module`: (a, lda, b, ldb, c, ldc, m, steps, accumulate).

    Also what tests/test_targets.py cross-compiles for other CPUs.
    """
    kind = _Kind(kind_name, lanes)
    return _define(module, f"attnkit_{kind_name}_micro_{mr}x{nr}_{lanes}", _micro_kernel_arguments(kind),
                   _build_micro_kernel(mr, nr, kind))  # fmt: skip


def _build_dispatch(module, kind_name, lanes, mr, nr_max):
    """A function of the same arguments plus nr (1..nr_max) that calls the mr x nr micro-kernel."""
    kind = _Kind(kind_name, lanes)
    kernels = [define_micro_kernel(module, kind_name, lanes, mr, nr) for nr in range(1, nr_max + 1)]

    def build(builder, args):
        *arguments, nr = args
        done = builder.append_basic_block("done")
        switch = builder.switch(nr, done)
        for count, kernel in enumerate(kernels, start=1):
            block = builder.append_basic_block(f"nr{count}")
            switch.add_case(ir.Constant(_I64, count), block)
            builder.position_at_end(block)
            builder.call(kernel, arguments)
            builder.branch(done)
        builder.position_at_end(done)
        return ir.Constant(_I32, 0)

    return _define(module, f"attnkit_{kind_name}_tiles_{mr}x{nr_max}_{lanes}",
                   _micro_kernel_arguments(kind) + [_I64], build)  # fmt: skip


def define_target_kernels(module, target):
    """Every micro-kernel `target` compiles, at its own register blocks, plus the
    float32 -> bf16 conversion, as IR functions in module (cross-compiled by
    tests/test_targets.py). Returns {kind: function name}."""
    names = {}
    for kind in ("f32", bf16_kind(target)):
        mr, nr = register_block(kind, target)
        names[kind] = define_micro_kernel(module, kind, target.lanes, mr, nr).name

    def convert(builder, args):
        return builder.zext(f32_to_bf16_ir(builder, args[0], target.bf16_convert), _I32)

    names["f32_to_bf16"] = _define(module, "attnkit_f32_to_bf16", [_F32], convert).name
    return names


def micro_kernel_intrinsic(kind_name, lanes, mr, nr_max):
    """A Numba intrinsic (a, lda, b, ldb, c, ldc, m, steps, accumulate, nr), every argument an intp.

    Its instructions come from kind_name ("f32", "dpbf16", "bfdot", "widen") and lanes, both
    fixed by the target when this module is imported.
    """

    @intrinsic
    def micro_kernel(typingctx, a, lda, b, ldb, c, ldc, m, steps, accumulate, nr):
        if not all(x == types.intp for x in (a, lda, b, ldb, c, ldc, m, steps, accumulate, nr)):
            return None

        def codegen(context, builder, signature, args):
            function = _build_dispatch(builder.module, kind_name, lanes, mr, nr_max)
            element_p = _Kind(kind_name, lanes).element.as_pointer()
            a_, lda_, b_, ldb_, c_, ldc_, m_, k_, acc_, nr_ = args
            builder.call(function, [builder.inttoptr(a_, element_p), lda_, builder.inttoptr(b_, element_p), ldb_,
                                    builder.inttoptr(c_, _F32.as_pointer()), ldc_, m_, k_, acc_, nr_])  # fmt: skip
            return context.get_dummy_value()

        return types.void(*(types.intp,) * 10), codegen

    return micro_kernel


_F32_MICRO = micro_kernel_intrinsic("f32", TARGET.lanes, *BLOCKS["f32"])
_BF16_MICRO = micro_kernel_intrinsic(_BF16_KIND, TARGET.lanes, *BLOCKS["bf16"])


# ---------------------------------------------------------------------------
# Products and packing, from Numba
# ---------------------------------------------------------------------------


def tile_loop(micro, mr, nr_max, lanes, a_item):
    """The Python function (compiled by Numba) that covers C with mr x (lanes nr_max) micro-kernel calls.

    micro: an intrinsic of micro_kernel_intrinsic; a_item: bytes per element of A.
    Pointers advance in bytes: a column of B is 4 bytes in both kinds (a bf16
    pair or a float). Used for the kernels' own products and by the block
    benchmark (bench/cpu_blocks.py) for the candidate blocks.
    """

    def tiles(a, b, c, m, n, steps, accumulate):
        if m == 0 or n == 0:
            return
        if steps == 0:
            if not accumulate:
                c[:m, :n] = 0
            return
        lda, ldb, ldc = a.strides[0] // a_item, b.strides[0] // b.itemsize, c.strides[0] // 4
        a_ptr, b_ptr, c_ptr = a.ctypes.data, b.ctypes.data, c.ctypes.data
        flag = 1 if accumulate else 0
        n_vectors = (n + lanes - 1) // lanes
        for v0 in range(0, n_vectors, nr_max):
            nr = min(nr_max, n_vectors - v0)
            col = v0 * lanes
            for r0 in range(0, m, mr):
                micro(a_ptr + a_item * r0 * lda, lda, b_ptr + 4 * col, ldb, c_ptr + 4 * (r0 * ldc + col), ldc,
                      min(mr, m - r0), steps, flag, nr)  # fmt: skip

    return tiles


# AMX's tiles where the path is "amx" (the target has AMX and the OS granted it), else the micro-kernel.
_tiles_bf16 = jit()(_amx_tiles if BF16_PRODUCTS == "amx" else tile_loop(_BF16_MICRO, *BLOCKS["bf16"], TARGET.lanes, 2))
_tiles_f32 = jit()(tile_loop(_F32_MICRO, *BLOCKS["f32"], TARGET.lanes, 4))


@jit()
def gemm(a, bp, c, m, n, kpairs, accumulate):
    """c[:m, :n] (+)= a[:m, :2 kpairs] @ B, B given pair-packed as bp.

    a: 2-D uint16 (bf16 bits), rows contiguous, at least 2 kpairs columns.
    bp: 2-D uint16 (kpairs rows, 2 x columns), rows contiguous: bp[p, 2 n + t] = B[2p + t, n];
        at least padded(n, 16) columns of B.
    c: 2-D float32, rows contiguous, at least padded(n, 16) columns (the padding is written).
    accumulate: add to c (True) or overwrite it (False).
    """
    _tiles_bf16(a, bp, c, m, n, kpairs, accumulate)


@jit()
def gemm_f32(a, b, c, m, n, k, accumulate):
    """c[:m, :n] (+)= a[:m, :k] @ b[:k, :n] in float32 with multiply-adds.

    a, b, c: 2-D float32 with contiguous rows; b and c at least padded(n, 16)
    columns wide (c's padding is written; b's is read and must be finite).
    accumulate: add to c (True) or overwrite it (False).
    """
    _tiles_f32(a, b, c, m, n, k, accumulate)


@jit()
def pack_pairs(src, dst):
    """dst[p, 2 n + t] = src[2p + t, n] as bf16 bits, zero where 2p + t or n is past src.

    src (K, N) bf16 bits (uint16) or float32 (rounded), any strides; dst (ceil(K/2), >= 2 N) with contiguous rows.
    """
    pack_pair_columns(src, src.shape[1], dst)


@jit()
def pack_pair_columns(src, n, dst):
    """pack_pairs of src[:, :n]. Rows indexed, never made arrays: a row view costs a reference
    count up and down (atomic), ~5% of a bf16 forward's samples when it took them per row pair.
    Given a C-contiguous src, its rows stay contiguous for Numba (a slice src[:, :n] would not be,
    and its conversion loop would not vectorise: 4x slower)."""
    k = src.shape[0]
    width = dst.shape[1]
    for p in range(dst.shape[0]):
        i0 = 2 * p
        if i0 + 1 < k:
            for j in range(n):
                dst[p, 2 * j] = bf16_of(src[i0, j])
                dst[p, 2 * j + 1] = bf16_of(src[i0 + 1, j])
        elif i0 < k:
            for j in range(n):
                dst[p, 2 * j] = bf16_of(src[i0, j])
                dst[p, 2 * j + 1] = 0
        else:
            for j in range(n):
                dst[p, 2 * j] = 0
                dst[p, 2 * j + 1] = 0
        for j in range(2 * n, width):
            dst[p, j] = 0
