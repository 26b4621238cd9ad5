"""The Numba CPU kernel by concern (kernels/numba_attention.py holds the entry points).

    constants.py  flags, the per-call constants, tile states
    tile.py       one tile: scores, masks, ALiBi, online softmax
    schedule.py   tasks heaviest first, the shared work queue
    operands.py   packing K / V, the products by dtype (micro-kernels, BLAS)
    forward.py    forward workers
    decode.py     flash-decoding workers
    backward.py   backward workers (five products per tile)
    plan.py       host-side planning: blocks, constants, masks, segments
    memory.py     allocations, the kept workspace, BLAS thread pinning
    threads.py    how many threads a call gets (one on a full machine, or in a forked child)
    flex.py       FlexAttention's tile loop, a template for generated score_mod / mask_mod
    flex_build.py writes, imports and runs flex.py with a user's generated functions
"""
