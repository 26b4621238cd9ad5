"""Flags, the per-call constants' layout and the tile states shared by the CPU kernel's parts."""

from __future__ import annotations


# fastmath=True would fold `x == -inf` to False; masked scores are -inf.
_FASTMATH = {"reassoc", "nsz", "arcp", "contract", "afn"}

# "No limit" for the visible key offsets; far from int64 overflow when added to an index.
_UNLIMITED = 1 << 60

# Feature flags passed to the kernels as one int.
_HAS_SOFTCAP = 1
_HAS_ADDITIVE_MASK = 2
_HAS_BOOL_MASK = 4
_HAS_ALIBI = 8
_HAS_DROPOUT = 16
_HAS_SINKS = 32
_READ_AHEAD = 64  # decode: K and V come from memory, so the kernel prefetches them ahead of use

# Layout of the per-call constants array (in the input dtype, so that no
# float64 literal promotes float32 arithmetic).
_C_SCALE = 0  # scale
_C_SCALE_LOG2E = 1  # scale * log2(e)
_C_LOG2E = 2  # log2(e)
_C_SOFTCAP = 3  # softcap
_C_INV_SOFTCAP = 4  # 1 / softcap
_C_NEG_INF = 5  # -inf
_C_ZERO = 6  # 0
_C_ONE = 7  # 1
_C_KEEP_SCALE = 8  # 1 / (1 - dropout_p): a kept weight's factor
_N_CONSTANTS = 9


# Tile states of a mask's summary (see _mask_plan): skip the tile, run it
# without reading the mask, or apply the mask element by element.
_TILE_HIDDEN = 0
_TILE_VISIBLE = 1
_TILE_MIXED = 2
