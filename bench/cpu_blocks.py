"""Register blocks of the micro-kernels, timed on the target Numba compiles for.

    python -m attnkit.bench.cpu_blocks [--repeats 7]
    NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=+avx,+avx2,+fma,... NUMBA_CACHE_DIR=... python -m attnkit.bench.cpu_blocks

For the float32 kernel and the target's bf16 kernel (VDPBF16PS or widened), each
candidate block MR x NR (rows of C x vectors of the target's width) is compiled
from kernels/microkernels.py's one generator and timed on the forward's two
tile products (S = Q Kᵀ, 128 x 512 x D, and acc += P V, 128 x D x 512) over
2048 keys, one thread, candidates taking turns, best of --repeats. The block
the kernels use (microkernels.register_block) is marked; whether a block spills
is for tests/test_targets.py to say (cross-compiled assembly).
"""

from __future__ import annotations

import argparse

import numpy as np
from numba import njit

from ..kernels import microkernels
from ..kernels.target import TARGET, describe
from .cpu_parts import BLOCK_K, BLOCK_Q, N_KEYS, _best

# Candidates per register file and kind: within the registers by the count in
# microkernels.register_block (accumulators + B vectors + broadcasts).
CANDIDATES = {
    32: {"f32": [(6, 4), (8, 3), (4, 4)], "dpbf16": [(6, 4), (8, 3), (4, 4)], "bfdot": [(6, 4), (8, 3)], "widen": [(4, 4), (6, 3), (5, 3)]},
    16: {"f32": [(6, 2), (4, 3), (4, 2)], "dpbf16": [(6, 2), (4, 3)], "widen": [(4, 2), (5, 2), (3, 2)]},
}


def products(kind, mr, nr):
    """A compiled function running the two products `repeats` times on an mr x nr block."""
    lanes = TARGET.lanes
    tiles = njit(microkernels.tile_loop(microkernels.micro_kernel_intrinsic(kind, lanes, mr, nr), mr, nr, lanes,
                                        4 if kind == "f32" else 2))  # fmt: skip

    if kind == "f32":

        @njit
        def run(q, k_operand, v_operand, s, p, acc, repeats):
            d = q.shape[1]
            for _ in range(repeats):
                for j0 in range(0, v_operand.shape[0], s.shape[1]):
                    tiles(q, k_operand[:, j0:], s, q.shape[0], s.shape[1], d, False)
                    tiles(s, v_operand[j0:], acc, q.shape[0], acc.shape[1], s.shape[1], True)

        return run

    @njit
    def run_pairs(q, k_operand, v_operand, s, p, acc, repeats):
        d_pairs, block_k = k_operand.shape[0], s.shape[1]
        for _ in range(repeats):
            for j0 in range(0, k_operand.shape[1] // 2 - 16, block_k):
                tiles(q, k_operand[:, 2 * j0 :], s, q.shape[0], block_k, d_pairs, False)
                tiles(p, v_operand[j0 // 2 :], acc, q.shape[0], acc.shape[1], block_k // 2, True)

    return run_pairs


def operands(kind, d, rng):
    q = rng.standard_normal((BLOCK_Q, d), dtype=np.float32)
    k, v = (rng.standard_normal((N_KEYS, d), dtype=np.float32) for _ in range(2))
    s = np.empty((BLOCK_Q, BLOCK_K), np.float32)
    acc = np.zeros((BLOCK_Q, d), np.float32)
    if kind == "f32":
        k_t = np.zeros((d, N_KEYS + 16), np.float32)
        k_t[:, :N_KEYS] = k.T
        return q, k_t, v, s, s, acc
    k_packed = np.zeros((d // 2, 2 * (N_KEYS + 16)), np.uint16)
    v_packed = np.zeros((N_KEYS // 2, 2 * d), np.uint16)
    microkernels.pack_pairs(microkernels.bf16_bits(k).T, k_packed)
    microkernels.pack_pairs(microkernels.bf16_bits(v), v_packed)
    p = microkernels.bf16_bits(rng.random((BLOCK_Q, BLOCK_K)))
    return microkernels.bf16_bits(q), k_packed, v_packed, s, p, acc


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m attnkit.bench.cpu_blocks", description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per block; the best is kept (default 7)")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128], help="D values (default 64 128)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1; got {args.repeats}")
    print(f"target: {describe()}")
    print(f"tile products, one thread, Q block {BLOCK_Q} x K block {BLOCK_K}, {N_KEYS} keys; GFLOP/s, best of "
          f"{args.repeats}; * = the block the kernels use")  # fmt: skip
    rng = np.random.default_rng(0)
    for kind in ("f32", microkernels.bf16_kind(TARGET)):
        candidates = CANDIDATES[32 if TARGET.registers >= 32 else 16][kind]
        chosen = microkernels.register_block(kind, TARGET)
        runs = {block: products(kind, *block) for block in candidates}
        for d in args.head_dims:
            data = operands(kind, d, rng)
            calls = 10
            flops = calls * 4 * BLOCK_Q * N_KEYS * d
            times = _best([lambda run=run: run(*data, calls) for run in runs.values()], args.repeats)
            cells = [f"{mr}x{nr}{'*' if (mr, nr) == chosen else ' '} {flops / t / 1e9:6.1f}"
                     for (mr, nr), t in zip(runs, times)]  # fmt: skip
            print(f"  {kind:<6} D={d:<4} " + "   ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
