"""bf16 products on Intel AMX: TDPBF16PS on 16 x 16 float32 tiles (Sapphire Rapids and later).

Why: on a Xeon with AMX (the 2-vCPU VM of 2026-12-03) torch's bf16 attention runs on AMX through
oneDNN, and attnkit's VDPBF16PS micro-kernel reached 63-72 GFLOP/s on the forward's tile products
against 260-510 here (one thread, tests/test_bf16.py shapes; bench/results/amx.md): bf16 calls were
3.9x slower than torch's.

The contract is microkernels.gemm's, unchanged: C (M, N) float32 (+)= A (M, K) bf16 @ B, B
pair-packed (Bp[p, 2 n + t] = B[2 p + t, n]). That packing is AMX's own layout for B (each tile row
holds 16 pairs of the reduction axis), and the padding of B's and C's rows to 16 columns means no
tile reads or writes outside them: a tile covers 16 rows of C (fewer on the last rows, by the tile
configuration) by 16 columns, and the reduction runs in chunks of 16 pairs, the last chunk as
narrow as what is left (tiles 5-7, configured for it).

Tiles (8 registers): 0, 1 two C tiles side by side; 2 A; 3, 4 B for C tiles 0 and 1; 5 A and
6, 7 B of a last, shorter chunk. Configuring the tiles zeroes them, so a call configures once for
full rows and once for the last rows, never inside a C tile's reduction.

The OS must grant AMX to the process first (Linux 5.16+, arch_prctl(ARCH_REQ_XCOMP_PERM)):
without it the first tile instruction kills the process. `os_grants_amx()` asks, once; the
product path is "amx" only when the target Numba compiles for has AMX and the OS said yes.
"""

from __future__ import annotations

import ctypes
import functools
import platform
import sys

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["os_grants_amx", "tiles"]

_I1, _I8, _I16, _I64 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(64)
_BYTES = _I8.as_pointer()
_SYS_ARCH_PRCTL = 158  # x86-64 Linux
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


@functools.lru_cache(maxsize=1)
def os_grants_amx():
    """(granted, why): ask Linux for the AMX tile data state for this process (and its threads)."""
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False, "AMX needs x86-64 Linux here"
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        result = libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA)
    except (OSError, AttributeError) as error:
        return False, f"cannot ask the OS for AMX ({error})"
    if result != 0:
        return False, f"the OS refused AMX (arch_prctl(ARCH_REQ_XCOMP_PERM): errno {ctypes.get_errno()})"
    return True, "granted"


def _call(builder, name, arguments):
    function = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [a.type for a in arguments]), name
    )
    builder.call(function, arguments)


def _tile(value):
    """The tile register of a literal int argument (tile instructions take it as an immediate)."""
    return ir.Constant(_I8, value.literal_value)


def _tile_memory(llvm_name):
    """An intrinsic (tile, address, stride): llvm_name moves a tile's rows from or to address, stride
    bytes apart (as many rows and bytes as the tile is configured for)."""

    @intrinsic(prefer_literal=True)
    def tile_memory(typingctx, tile, address, stride):
        if not isinstance(tile, types.IntegerLiteral):
            return None

        def codegen(context, builder, signature, args):
            _call(builder, llvm_name, [_tile(tile), builder.inttoptr(args[1], _BYTES), args[2]])
            return context.get_dummy_value()

        return types.void(tile, types.intp, types.intp), codegen

    return tile_memory


_tile_load = _tile_memory("llvm.x86.tileloadd64")
_tile_store = _tile_memory("llvm.x86.tilestored64")


@intrinsic(prefer_literal=True)
def _tile_zero(typingctx, tile):
    if not isinstance(tile, types.IntegerLiteral):
        return None

    def codegen(context, builder, signature, args):
        _call(builder, "llvm.x86.tilezero", [_tile(tile)])
        return context.get_dummy_value()

    return types.void(tile), codegen


@intrinsic(prefer_literal=True)
def _tile_dot(typingctx, c, a, b):
    """c += a @ b: TDPBF16PS (bf16 pairs, float32 sums)."""
    if not all(isinstance(x, types.IntegerLiteral) for x in (c, a, b)):
        return None

    def codegen(context, builder, signature, args):
        _call(builder, "llvm.x86.tdpbf16ps", [_tile(c), _tile(a), _tile(b)])
        return context.get_dummy_value()

    return types.void(c, a, b), codegen


@intrinsic
def _tile_release(typingctx):
    def codegen(context, builder, signature, args):
        _call(builder, "llvm.x86.tilerelease", [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def _tile_configure(typingctx, rows, tail_pairs):
    """Load a tile configuration: C tiles 0, 1 and A tile 2 `rows` rows of 64 bytes; B tiles 3, 4
    16 rows of 64 bytes; for a last chunk of tail_pairs pairs (0: none), A tile 5 `rows` rows of
    4 tail_pairs bytes and B tiles 6, 7 tail_pairs rows of 64 bytes. Zeroes every tile."""
    if rows != types.intp or tail_pairs != types.intp:
        return None

    def codegen(context, builder, signature, args):
        rows_, tail_ = args
        config = builder.bitcast(cgutils.alloca_once(builder, ir.ArrayType(_I8, 64)), _BYTES)
        _call(builder, "llvm.memset.p0.i64", [config, ir.Constant(_I8, 0), ir.Constant(_I64, 64), ir.Constant(_I1, 0)])
        builder.store(ir.Constant(_I8, 1), config)  # palette 1

        def describe(tile, n_rows, row_bytes):
            width = builder.gep(config, [ir.Constant(_I64, 16 + 2 * tile)])
            builder.store(row_bytes, builder.bitcast(width, _I16.as_pointer()))
            builder.store(n_rows, builder.gep(config, [ir.Constant(_I64, 48 + tile)]))

        full_row, sixteen = ir.Constant(_I16, 64), ir.Constant(_I8, 16)
        rows8, tail8 = builder.trunc(rows_, _I8), builder.trunc(tail_, _I8)
        has_tail = builder.icmp_signed("!=", tail_, ir.Constant(_I64, 0))
        for tile in (0, 1, 2):
            describe(tile, rows8, full_row)
        for tile in (3, 4):
            describe(tile, sixteen, full_row)
        describe(5, builder.select(has_tail, rows8, ir.Constant(_I8, 0)),
                 builder.trunc(builder.mul(tail_, ir.Constant(_I64, 4)), _I16))  # fmt: skip
        for tile in (6, 7):
            describe(tile, tail8, builder.select(has_tail, full_row, ir.Constant(_I16, 0)))
        _call(builder, "llvm.x86.ldtilecfg", [config])
        return context.get_dummy_value()

    return types.void(rows, tail_pairs), codegen


def tiles(a, bp, c, m, n, kpairs, accumulate):
    """c[:m, :n] (+)= a[:m, :2 kpairs] @ B on AMX tiles; microkernels.gemm's arguments and layout.

    A plain function: microkernels compiles it only where the product path is "amx" (an AMX
    instruction compiled for a target without AMX would stop LLVM, and the process).
    """
    if m == 0 or n == 0:
        return
    if kpairs == 0:
        if not accumulate:
            c[:m, :n] = 0
        return
    lda, ldb, ldc = a.strides[0], bp.strides[0], c.strides[0]  # bytes
    a_ptr, b_ptr, c_ptr = a.ctypes.data, bp.ctypes.data, c.ctypes.data
    n_cols = -(-n // 16) * 16  # C's and B's rows are padded to 16 columns
    chunks, tail = kpairs // 16, kpairs % 16
    configured_rows = 0
    for r0 in range(0, m, 16):
        rows = min(16, m - r0)
        if rows != configured_rows:
            _tile_configure(rows, tail)
            configured_rows = rows
        a_rows = a_ptr + r0 * lda
        for c0 in range(0, n_cols, 32):
            two = c0 + 16 < n_cols  # a second C tile to the right
            c_tile = c_ptr + r0 * ldc + 4 * c0
            if accumulate:
                _tile_load(0, c_tile, ldc)
                if two:
                    _tile_load(1, c_tile + 64, ldc)
            else:
                _tile_zero(0)
                _tile_zero(1)
            b_tile = b_ptr + 4 * c0  # column c0 of B: pair c0 of each packed row
            for chunk in range(chunks):
                _tile_load(2, a_rows + 64 * chunk, lda)
                _tile_load(3, b_tile + 16 * chunk * ldb, ldb)
                _tile_dot(0, 2, 3)
                if two:
                    _tile_load(4, b_tile + 16 * chunk * ldb + 64, ldb)
                    _tile_dot(1, 2, 4)
            if tail:
                _tile_load(5, a_rows + 64 * chunks, lda)
                _tile_load(6, b_tile + 16 * chunks * ldb, ldb)
                _tile_dot(0, 5, 6)
                if two:
                    _tile_load(7, b_tile + 16 * chunks * ldb + 64, ldb)
                    _tile_dot(1, 5, 7)
            _tile_store(0, c_tile, ldc)
            if two:
                _tile_store(1, c_tile + 64, ldc)
    _tile_release()
