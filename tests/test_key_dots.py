"""Decode's block dot products (kernels/key_dots.py) against NumPy: four rows against a block of keys,
the lanes summed by one transposed tree; float32 K and bf16 bits (widened, or multiplied as pairs
with q's bits where the target has a pair product), C-contiguous caches and flash-attn's (B, N, Hkv, D)
layout read in place."""

from __future__ import annotations

import numpy as np
import pytest
from llvmlite import ir
from numba import njit

from attnkit.kernels.bf16 import bf16_bits, bf16_to_float32
from attnkit.kernels.key_dots import DOTS_ROWS, KEYS_PER_BLOCK, LANES, PAIRS, dots_block, transposed_sum
from attnkit.testing import assert_close


@njit(cache=False)
def _four_rows(k, b, h, j, q_rows, q_bits, r, s, col):
    dots_block(k, b, h, j, q_rows, q_bits, r, s, col, 4)


@njit(cache=False)
def _one_row(k, b, h, j, q_rows, q_bits, r, s, col):
    dots_block(k, b, h, j, q_rows, q_bits, r, s, col, 1)


# (function, rows, keys a block)
_SHAPES = {"4-rows": (_four_rows, DOTS_ROWS, KEYS_PER_BLOCK), "1-row": (_one_row, 1, LANES)}


def _cache(rng, batch, heads, keys, d, bf16, flash_layout):
    """(kernel array, its float64 values): (B, Hkv, N, D), or flash-attn's (B, N, Hkv, D) seen as such."""
    shape = (batch, keys, heads, d) if flash_layout else (batch, heads, keys, d)
    values = rng.standard_normal(shape)
    array = bf16_bits(values) if bf16 else values.astype(np.float32)
    exact = bf16_to_float32(array).astype(np.float64) if bf16 else array.astype(np.float64)
    if flash_layout:
        array, exact = array.transpose(0, 2, 1, 3), exact.transpose(0, 2, 1, 3)
    return array, exact


@pytest.mark.parametrize("shape", list(_SHAPES))
@pytest.mark.parametrize("flash_layout", [False, True], ids=["bhnd", "flash-layout"])
@pytest.mark.parametrize("kind", ["float32", "bf16-widened", "bf16-pairs"])
@pytest.mark.parametrize("d_vectors", [1, 2, 8, 16], ids=lambda n: f"D{n}x{LANES}")
def test_dots_block_matches_numpy(d_vectors, kind, flash_layout, shape):
    """Every (row, key) product of the block (four rows, or MHA's one row) lands at s[r + i, col + t];
    nothing else in s changes.
    bf16-pairs: q's rows also given as bf16 bits, which the pair product reads where the target has
    one and D is a multiple of 2 LANES (here: an even d_vectors), else the widened path runs."""
    if kind == "bf16-pairs" and PAIRS is None:
        pytest.skip("this CPU target has no bf16 pair product (VDPBF16PS, BFDOT): tests/test_targets.py builds it")
    bf16 = kind != "float32"
    blocks, rows, keys = _SHAPES[shape]
    rng = np.random.default_rng(d_vectors + 10 * len(kind) + 100 * flash_layout + 1000 * rows)
    d = d_vectors * LANES
    k, k_exact = _cache(rng, 2, 3, 40, d, bf16, flash_layout)
    q_values = rng.standard_normal((9, d))
    q_bits = bf16_bits(q_values) if kind == "bf16-pairs" else np.zeros((1, d), np.float32)
    q_rows = bf16_to_float32(q_bits) if kind == "bf16-pairs" else q_values.astype(np.float32)
    for b, h, j, r, col in [(0, 0, 0, 0, 0), (1, 2, 40 - keys, 5, 3), (1, 1, 17, 2, 11)]:
        s = rng.standard_normal((rows + r + 1, 40)).astype(np.float32)
        before = s.copy()
        blocks(k, b, h, j, q_rows, q_bits, r, s, col)
        expected = before.astype(np.float64)
        expected[r : r + rows, col : col + keys] = (
            q_rows[r : r + rows].astype(np.float64) @ k_exact[b, h, j : j + keys].T)
        # float32 sums of d products of |x| ~ 1: a few ulps of sqrt(d)-sized sums
        assert_close(s, expected, atol=1e-5 * d, rtol=1e-5, name=f"s (b={b}, h={h}, j={j}, r={r}, col={col})")


@pytest.mark.parametrize("lanes", [4, 8, 16])
def test_transposed_sum_gives_each_source_its_own_lane(lanes):
    """The tree alone, run by llvmlite's JIT on sources whose lanes are distinct powers of ten: lane i is
    the sum of source i, for every vector width a target may have."""
    import ctypes

    import llvmlite.binding as llvm

    module = ir.Module(name="transposed_sum_check")
    f32, vector = ir.FloatType(), ir.VectorType(ir.FloatType(), lanes)
    function = ir.Function(module, ir.FunctionType(ir.VoidType(), [f32.as_pointer(), f32.as_pointer()]), "check")
    builder = ir.IRBuilder(function.append_basic_block())
    source, result = function.args
    sources = [builder.load(builder.bitcast(builder.gep(source, [ir.Constant(ir.IntType(64), i * lanes)]),
                                            vector.as_pointer()), align=4) for i in range(lanes)]  # fmt: skip
    builder.store(transposed_sum(builder, sources, lanes), builder.bitcast(result, vector.as_pointer()), align=4)
    builder.ret_void()
    engine = llvm.create_mcjit_compiler(llvm.parse_assembly(str(module)),
                                        llvm.Target.from_default_triple().create_target_machine())  # fmt: skip
    engine.finalize_object()
    run = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)(engine.get_function_address("check"))
    rng = np.random.default_rng(lanes)
    values = rng.integers(-8, 9, (lanes, lanes)).astype(np.float32)  # small integers: sums exact in any order
    out = np.full(lanes, np.nan, np.float32)
    run(values.ctypes.data, out.ctypes.data)
    np.testing.assert_array_equal(out, values.sum(axis=1))
