"""Attention dropout's keep mask: which weights a seeded call keeps, as a pure function.

Every backend draws the same mask for the same seed, so none stores it: the
backward regenerates it, and a test can compare any kernel with the reference
run on this mask.

Weight (s, h, i, j) (sequence or batch entry s, query head h, query row i and
key j within that sequence) is kept when the 16-bit draw

    half j % 2 (low half first) of word (j % 8) // 2 of
    philox4x32_10(counter = (j // 8, i, h, s), key = (seed mod 2**32, seed // 2**32))

is at least threshold(p) = round(p * 2**16): one Philox call decides eight
neighbouring keys (its 128 bits as eight 16-bit draws: p is resolved to
1/65536, where flash-attn's kernels use 8 bits). Philox4x32-10 (Salmon et al., "Parallel random numbers: as
easy as 1, 2, 3", SC'11) is the counter-based generator torch and flash-attn
use for dropout on GPUs; Triton ships it as tl.philox with this round layout,
so the Triton kernel calls it directly.
"""

from __future__ import annotations

import numpy as np

# Philox4x32's multipliers and Weyl key increments (Random123's constants).
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
KEYS_PER_CALL = 8  # one Philox call's four 32-bit words, as eight 16-bit draws, decide eight keys
DRAW_BITS = 16

_LOW32 = np.uint64(0xFFFFFFFF)


def philox4x32(c0, c1, c2, c3, k0, k1, rounds=PHILOX_ROUNDS):
    """Philox4x32 on arrays of 32-bit counters (any shape, broadcast) and a 32-bit key pair.

    Returns the four output words as uint32 arrays. Arithmetic runs in uint64
    so each 32 x 32 product keeps its high half.
    """
    c0, c1, c2, c3 = (np.asarray(c, np.uint64) & _LOW32 for c in np.broadcast_arrays(c0, c1, c2, c3))
    k0, k1 = np.uint64(int(k0) & 0xFFFFFFFF), np.uint64(int(k1) & 0xFFFFFFFF)
    m0, m1 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1)
    for _ in range(rounds):
        product0 = m0 * c0  # < 2**64: both factors are below 2**32
        product1 = m1 * c2
        c0, c1, c2, c3 = (
            (product1 >> np.uint64(32)) ^ c1 ^ k0,
            product1 & _LOW32,
            (product0 >> np.uint64(32)) ^ c3 ^ k1,
            product0 & _LOW32,
        )
        k0 = (k0 + np.uint64(PHILOX_W0)) & _LOW32
        k1 = (k1 + np.uint64(PHILOX_W1)) & _LOW32
    return tuple(c.astype(np.uint32) for c in (c0, c1, c2, c3))


def split_seed(seed):
    """(low word, high word) of a seed in [0, 2**64): Philox's key."""
    seed = int(seed)
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"dropout seed must be in [0, 2**64); got {seed}")
    return seed & 0xFFFFFFFF, seed >> 32


def threshold(p):
    """The 16-bit draw below which a weight is dropped: round(p * 2**16) (2**16 drops all)."""
    return int(round(float(p) * 2.0**DRAW_BITS))


def keep_scale(p):
    """What a kept weight is multiplied by: 1 / (1 - p), and 0 when p = 1 (nothing is kept)."""
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def keep_mask(seed, p, sequences, heads, nq, nk, *, first_sequence=0):
    """The keep mask (S, H, Nq, Nk) bool of sequences first_sequence .. first_sequence + S - 1."""
    k0, k1 = split_seed(seed)
    s = np.arange(first_sequence, first_sequence + sequences, dtype=np.uint64)[:, None, None, None]
    h = np.arange(heads, dtype=np.uint64)[None, :, None, None]
    i = np.arange(nq, dtype=np.uint64)[None, None, :, None]
    groups = -(-nk // KEYS_PER_CALL)
    g = np.arange(groups, dtype=np.uint64)[None, None, None, :]
    words = np.stack(philox4x32(g, i, h, s, k0, k1), axis=-1)  # (S, H, Nq, groups, 4)
    halves = np.stack([words & 0xFFFF, words >> 16], axis=-1)  # (..., 4, 2): low half first
    draws = halves.reshape(sequences, heads, nq, groups * KEYS_PER_CALL)[..., :nk]
    return draws.astype(np.int64) >= threshold(p)  # a threshold of 2**16 keeps nothing
