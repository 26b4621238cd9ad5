"""FlexAttention on the GPU: Triton tile loops whose scores pass through a user's score_mod and mask_mod.

A module and a template, as kernels/cpu/flex.py is on the CPU: attnkit.flex writes score_mod,
score_mod_vjp and mask_mod as Triton functions of a (BLOCK_M, BLOCK_N) tile (the block between the
GENERATED markers); kernels.cpu.flex_build writes the module and imports it. Imported as it is, the
placeholders are the identity.

Blocks follow torch's BlockMask: per (batch, head, query block) the full and the partial key blocks
(the forward and dQ), per key block the full and partial query blocks (dK / dV). Tiles are the
block mask's blocks. A captured tensor reaches the user functions as a pointer and four strides
(four slots each for score_mod and mask_mod); their gradients are atomic adds into float32 buffers
of the same layout, in the dK / dV kernel only.
"""

from __future__ import annotations

import triton
import triton.language as tl

_INF = tl.constexpr(float("inf"))
_NAN = tl.constexpr(float("nan"))


@triton.jit
def _tanh(x):
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _trunc(x):
    return tl.where(x < 0, -tl.floor(-x), tl.floor(x))


@triton.jit
def _mod(a, b):
    """Python's (and torch's) remainder: the sign of b. Triton's % follows C."""
    r = a % b
    return tl.where((r != 0) & ((r < 0) != (b < 0)), r + b, r)


@triton.jit
def _floordiv(a, b):
    return (a - _mod(a, b)) // b


# --- GENERATED BEGIN (flex_build replaces this block; the placeholders are the identity)


@triton.jit
def score_mod(score, b, h, q_idx, kv_idx, valid, zero_index, C0, C0_s0, C0_s1, C0_s2, C0_s3, C1, C1_s0, C1_s1,
              C1_s2, C1_s3, C2, C2_s0, C2_s1, C2_s2, C2_s3, C3, C3_s0, C3_s1, C3_s2, C3_s3):
    return score


@triton.jit
def score_mod_vjp(score, b, h, q_idx, kv_idx, valid, zero_index, C0, C0_s0, C0_s1, C0_s2, C0_s3, C1, C1_s0, C1_s1,
                  C1_s2, C1_s3, C2, C2_s0, C2_s1, C2_s2, C2_s3, C3, C3_s0, C3_s1, C3_s2, C3_s3, grad, G0, G1, G2,
                  G3, ACCUMULATE: tl.constexpr):
    return grad


@triton.jit
def mask_mod(b, h, q_idx, kv_idx, valid, zero_index, M0, M0_s0, M0_s1, M0_s2, M0_s3, M1, M1_s0, M1_s1, M1_s2,
             M1_s3, M2, M2_s0, M2_s1, M2_s2, M2_s3, M3, M3_s0, M3_s1, M3_s2, M3_s3):
    return zero_index == 0


# --- GENERATED END


@triton.jit
def _scores(q, k, rows, cols, b, h, scale, Nq, Nk, C, M, PARTIAL: tl.constexpr, DOT_PREC: tl.constexpr):
    """(raw scaled scores, modded scores with -inf where hidden, visibility) of one tile.
    C and M are the capture slots (tuples of 20 values each)."""
    raw = tl.dot(q, k, input_precision=DOT_PREC) * scale  # (BM, BN) fp32
    valid = (rows[:, None] < Nq) & (cols[None, :] < Nk)
    zero_index = rows[:, None] * 0 + cols[None, :] * 0
    x = score_mod(raw, b, h, rows[:, None], cols[None, :], valid, zero_index, C[0], C[1], C[2], C[3], C[4], C[5],
                  C[6], C[7], C[8], C[9], C[10], C[11], C[12], C[13], C[14], C[15], C[16], C[17], C[18], C[19])
    keep = valid
    if PARTIAL:
        keep = keep & mask_mod(b, h, rows[:, None], cols[None, :], valid, zero_index, M[0], M[1], M[2], M[3], M[4],
                               M[5], M[6], M[7], M[8], M[9], M[10], M[11], M[12], M[13], M[14], M[15], M[16],
                               M[17], M[18], M[19])
    return raw, tl.where(keep, x, -_INF), keep


@triton.jit
def _forward_blocks(acc, m_i, l_i, q, rows, b, h, hk, K, V, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, count, LIST,
                    scale, Nq, Nk, D, DV, C, M, PARTIAL: tl.constexpr, BLOCK_N: tl.constexpr, SUB_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PREC: tl.constexpr):
    dcol = tl.arange(0, BLOCK_D)
    vcol = tl.arange(0, BLOCK_DV)
    for n in range(0, count):
        first = tl.load(LIST + n) * SUB_N  # a listed key block is SUB_N tiles of BLOCK_N keys
        for s in range(0, SUB_N):
            cols = (first + s) * BLOCK_N + tl.arange(0, BLOCK_N)
            k = tl.load(K + b * sk_b + hk * sk_h + cols[None, :] * sk_n + dcol[:, None],
                        mask=(cols[None, :] < Nk) & (dcol[:, None] < D), other=0.0)  # (BD, BN)
            _, x, _ = _scores(q, k, rows, cols, b, h, scale, Nq, Nk, C, M, PARTIAL, DOT_PREC)
            m_new = tl.maximum(m_i, tl.max(x, 1))
            m_safe = tl.where(m_new == -_INF, 0.0, m_new)  # a row that sees nothing yet: P = 0, no NaN
            p = tl.exp(x - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + b * sv_b + hk * sv_h + cols[:, None] * sv_n + vcol[None, :],
                        mask=(cols[:, None] < Nk) & (vcol[None, :] < DV), other=0.0)  # (BN, BDV)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            m_i = m_new
    return acc, m_i, l_i


@triton.jit
def flex_forward(Q, K, V, O, LSE, FN, FI, PN, PI, fn_b, fn_h, fi_b, fi_h, fi_q, pn_b, pn_h, pi_b, pi_h, pi_q,
                 sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n, sl_b, sl_h,
                 scale, Nq, Nk, Hq, GROUP, D, DV,
                 C0, C0_s0, C0_s1, C0_s2, C0_s3, C1, C1_s0, C1_s1, C1_s2, C1_s3, C2, C2_s0, C2_s1, C2_s2, C2_s3,
                 C3, C3_s0, C3_s1, C3_s2, C3_s3, M0, M0_s0, M0_s1, M0_s2, M0_s3, M1, M1_s0, M1_s1, M1_s2, M1_s3,
                 M2, M2_s0, M2_s1, M2_s2, M2_s3, M3, M3_s0, M3_s1, M3_s2, M3_s3,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB_M: tl.constexpr, SUB_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PREC: tl.constexpr):
    """One (query tile, batch * head) program: out (B, Hq, Nq, Dv), lse (B, Hq, Nq) natural log.
    Tiles are BLOCK_M x BLOCK_N; the block mask's blocks are SUB_M x SUB_N tiles."""
    tile = tl.program_id(0)
    qb = tile // SUB_M
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // GROUP
    C = (C0, C0_s0, C0_s1, C0_s2, C0_s3, C1, C1_s0, C1_s1, C1_s2, C1_s3, C2, C2_s0, C2_s1, C2_s2, C2_s3,
         C3, C3_s0, C3_s1, C3_s2, C3_s3)
    M = (M0, M0_s0, M0_s1, M0_s2, M0_s3, M1, M1_s0, M1_s1, M1_s2, M1_s3, M2, M2_s0, M2_s1, M2_s2, M2_s3,
         M3, M3_s0, M3_s1, M3_s2, M3_s3)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    dcol = tl.arange(0, BLOCK_D)
    vcol = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_n + dcol[None, :],
                mask=(rows[:, None] < Nq) & (dcol[None, :] < D), other=0.0)  # (BM, BD)
    m_i = tl.full((BLOCK_M,), -_INF, tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    full = tl.load(FN + b * fn_b + h * fn_h + qb)
    partial = tl.load(PN + b * pn_b + h * pn_h + qb)
    acc, m_i, l_i = _forward_blocks(acc, m_i, l_i, q, rows, b, h, hk, K, V, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                                    full, FI + b * fi_b + h * fi_h + qb * fi_q, scale, Nq, Nk, D, DV, C, M, False,
                                    BLOCK_N, SUB_N, BLOCK_D, BLOCK_DV, DOT_PREC)
    acc, m_i, l_i = _forward_blocks(acc, m_i, l_i, q, rows, b, h, hk, K, V, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                                    partial, PI + b * pi_b + h * pi_h + qb * pi_q, scale, Nq, Nk, D, DV, C, M, True,
                                    BLOCK_N, SUB_N, BLOCK_D, BLOCK_DV, DOT_PREC)
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    tl.store(O + b * so_b + h * so_h + rows[:, None] * so_n + vcol[None, :], out.to(O.dtype.element_ty),
             mask=(rows[:, None] < Nq) & (vcol[None, :] < DV))
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), -_INF)
    tl.store(LSE + b * sl_b + h * sl_h + rows, lse, mask=rows < Nq)


@triton.jit
def _query_rows(Q, DO, LSE, DELTA, rows, b, h, sq_b, sq_h, sq_n, sd_b, sd_h, sd_n, sl_b, sl_h, Nq, D, DV,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """What the backward reads per query row: q (BM, BD), dO (BM, BDV), lse and delta (BM,); rows
    past Nq give zeros and lse -inf (so P = 0 there)."""
    dcol = tl.arange(0, BLOCK_D)
    vcol = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_n + dcol[None, :],
                mask=(rows[:, None] < Nq) & (dcol[None, :] < D), other=0.0)
    do = tl.load(DO + b * sd_b + h * sd_h + rows[:, None] * sd_n + vcol[None, :],
                 mask=(rows[:, None] < Nq) & (vcol[None, :] < DV), other=0.0)
    lse = tl.load(LSE + b * sl_b + h * sl_h + rows, mask=rows < Nq, other=-_INF)
    delta = tl.load(DELTA + b * sl_b + h * sl_h + rows, mask=rows < Nq, other=0.0)
    return q, do, lse, delta


@triton.jit
def _backward_tile(q, do, lse, delta, k, v, rows, cols, b, h, scale, Nq, Nk, C, M, G0, G1, G2, G3,
                   PARTIAL: tl.constexpr, ACCUMULATE: tl.constexpr, DOT_PREC: tl.constexpr):
    """(P, dS) of one tile: dS = d(loss)/d(raw scaled score) * scale, zero where hidden."""
    raw, x, keep = _scores(q, k, rows, cols, b, h, scale, Nq, Nk, C, M, PARTIAL, DOT_PREC)
    keep = keep & (lse[:, None] != -_INF)
    p = tl.where(keep, tl.exp(x - tl.where(keep, lse[:, None], 0.0)), 0.0)  # (BM, BN)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)  # (BM, BN)
    grad = p * (dp - delta[:, None])
    zero_index = rows[:, None] * 0 + cols[None, :] * 0
    # The captures are read under the tile's bounds, as in the forward: a load masked by the gradient
    # itself (grad != 0) is the suspect of the dQ fault seen on an H200 (bench/results/gpu.md). Scores
    # whose gradient is 0 (hidden ones among them) contribute nothing: the atomic adds skip them, and
    # ds is 0 there.
    in_bounds = (rows[:, None] < Nq) & (cols[None, :] < Nk)
    ds = score_mod_vjp(raw, b, h, rows[:, None], cols[None, :], in_bounds, zero_index, C[0], C[1], C[2], C[3], C[4],
                       C[5], C[6], C[7], C[8], C[9], C[10], C[11], C[12], C[13], C[14], C[15], C[16], C[17], C[18],
                       C[19], grad, G0, G1, G2, G3, ACCUMULATE)
    return p, tl.where(keep & (grad != 0), ds, 0.0) * scale


@triton.jit
def _dkdv_blocks(dk, dv, k, v, cols, b, h, Q, DO, LSE, DELTA, sq_b, sq_h, sq_n, sd_b, sd_h, sd_n, sl_b, sl_h,
                 count, LIST, scale, Nq, Nk, D, DV, C, M, G0, G1, G2, G3, PARTIAL: tl.constexpr,
                 BLOCK_M: tl.constexpr, SUB_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                 DOT_PREC: tl.constexpr):
    for n in range(0, count):
        first = tl.load(LIST + n) * SUB_M  # a listed query block is SUB_M tiles of BLOCK_M rows
        for s in range(0, SUB_M):
            rows = (first + s) * BLOCK_M + tl.arange(0, BLOCK_M)
            q, do, lse, delta = _query_rows(Q, DO, LSE, DELTA, rows, b, h, sq_b, sq_h, sq_n, sd_b, sd_h, sd_n, sl_b,
                                            sl_h, Nq, D, DV, BLOCK_D, BLOCK_DV)
            p, ds = _backward_tile(q, do, lse, delta, k, v, rows, cols, b, h, scale, Nq, Nk, C, M, G0, G1, G2, G3,
                                   PARTIAL, True, DOT_PREC)
            dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=DOT_PREC)
            dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def flex_backward_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV_OUT, FN, FI, PN, PI, fn_b, fn_h, fi_b, fi_h, fi_q,
                       pn_b, pn_h, pi_b, pi_h, pi_q, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                       sd_b, sd_h, sd_n, sl_b, sl_h, scale, Nq, Nk, Hkv, GROUP, D, DV,
                       C0, C0_s0, C0_s1, C0_s2, C0_s3, C1, C1_s0, C1_s1, C1_s2, C1_s3, C2, C2_s0, C2_s1, C2_s2,
                       C2_s3, C3, C3_s0, C3_s1, C3_s2, C3_s3, M0, M0_s0, M0_s1, M0_s2, M0_s3, M1, M1_s0, M1_s1,
                       M1_s2, M1_s3, M2, M2_s0, M2_s1, M2_s2, M2_s3, M3, M3_s0, M3_s1, M3_s2, M3_s3, G0, G1, G2, G3,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB_M: tl.constexpr, SUB_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PREC: tl.constexpr):
    """One (key tile, batch * kv head) program: dK, dV of the tile, summed over the GQA group's
    heads and their query blocks (the block mask's transposed lists); the captures' gradients."""
    tile = tl.program_id(0)
    kb = tile // SUB_N
    bh = tl.program_id(1)
    b = bh // Hkv
    hk = bh % Hkv
    C = (C0, C0_s0, C0_s1, C0_s2, C0_s3, C1, C1_s0, C1_s1, C1_s2, C1_s3, C2, C2_s0, C2_s1, C2_s2, C2_s3,
         C3, C3_s0, C3_s1, C3_s2, C3_s3)
    M = (M0, M0_s0, M0_s1, M0_s2, M0_s3, M1, M1_s0, M1_s1, M1_s2, M1_s3, M2, M2_s0, M2_s1, M2_s2, M2_s3,
         M3, M3_s0, M3_s1, M3_s2, M3_s3)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    dcol = tl.arange(0, BLOCK_D)
    vcol = tl.arange(0, BLOCK_DV)
    k = tl.load(K + b * sk_b + hk * sk_h + cols[None, :] * sk_n + dcol[:, None],
                mask=(cols[None, :] < Nk) & (dcol[:, None] < D), other=0.0)  # (BD, BN): K^T
    v = tl.load(V + b * sv_b + hk * sv_h + cols[:, None] * sv_n + vcol[None, :],
                mask=(cols[:, None] < Nk) & (vcol[None, :] < DV), other=0.0)  # (BN, BDV)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        full = tl.load(FN + b * fn_b + h * fn_h + kb)
        partial = tl.load(PN + b * pn_b + h * pn_h + kb)
        dk, dv = _dkdv_blocks(dk, dv, k, v, cols, b, h, Q, DO, LSE, DELTA, sq_b, sq_h, sq_n, sd_b, sd_h, sd_n,
                              sl_b, sl_h, full, FI + b * fi_b + h * fi_h + kb * fi_q, scale, Nq, Nk, D, DV, C, M,
                              G0, G1, G2, G3, False, BLOCK_M, SUB_M, BLOCK_D, BLOCK_DV, DOT_PREC)
        dk, dv = _dkdv_blocks(dk, dv, k, v, cols, b, h, Q, DO, LSE, DELTA, sq_b, sq_h, sq_n, sd_b, sd_h, sd_n,
                              sl_b, sl_h, partial, PI + b * pi_b + h * pi_h + kb * pi_q, scale, Nq, Nk, D, DV, C, M,
                              G0, G1, G2, G3, True, BLOCK_M, SUB_M, BLOCK_D, BLOCK_DV, DOT_PREC)
    # DK / DV_OUT share K / V's (contiguous) layout
    tl.store(DK + b * sk_b + hk * sk_h + cols[:, None] * sk_n + dcol[None, :], dk.to(DK.dtype.element_ty),
             mask=(cols[:, None] < Nk) & (dcol[None, :] < D))
    tl.store(DV_OUT + b * sv_b + hk * sv_h + cols[:, None] * sv_n + vcol[None, :], dv.to(DV_OUT.dtype.element_ty),
             mask=(cols[:, None] < Nk) & (vcol[None, :] < DV))


@triton.jit
def _dq_blocks(dq, q, do, lse, delta, rows, b, h, hk, K, V, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, count, LIST,
               scale, Nq, Nk, D, DV, C, M, G0, PARTIAL: tl.constexpr, BLOCK_N: tl.constexpr, SUB_N: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PREC: tl.constexpr):
    dcol = tl.arange(0, BLOCK_D)
    vcol = tl.arange(0, BLOCK_DV)
    for n in range(0, count):
        first = tl.load(LIST + n) * SUB_N
        for s in range(0, SUB_N):
            cols = (first + s) * BLOCK_N + tl.arange(0, BLOCK_N)
            k = tl.load(K + b * sk_b + hk * sk_h + cols[None, :] * sk_n + dcol[:, None],
                        mask=(cols[None, :] < Nk) & (dcol[:, None] < D), other=0.0)  # (BD, BN)
            v = tl.load(V + b * sv_b + hk * sv_h + cols[:, None] * sv_n + vcol[None, :],
                        mask=(cols[:, None] < Nk) & (vcol[None, :] < DV), other=0.0)  # (BN, BDV)
            _, ds = _backward_tile(q, do, lse, delta, k, v, rows, cols, b, h, scale, Nq, Nk, C, M, G0, G0, G0, G0,
                                   PARTIAL, False, DOT_PREC)
            dq += tl.dot(ds.to(k.dtype), tl.trans(k), input_precision=DOT_PREC)
    return dq


@triton.jit
def flex_backward_dq(Q, K, V, DO, LSE, DELTA, DQ, FN, FI, PN, PI, fn_b, fn_h, fi_b, fi_h, fi_q,
                     pn_b, pn_h, pi_b, pi_h, pi_q, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                     sd_b, sd_h, sd_n, sl_b, sl_h, scale, Nq, Nk, Hq, GROUP, D, DV,
                     C0, C0_s0, C0_s1, C0_s2, C0_s3, C1, C1_s0, C1_s1, C1_s2, C1_s3, C2, C2_s0, C2_s1, C2_s2,
                     C2_s3, C3, C3_s0, C3_s1, C3_s2, C3_s3, M0, M0_s0, M0_s1, M0_s2, M0_s3, M1, M1_s0, M1_s1,
                     M1_s2, M1_s3, M2, M2_s0, M2_s1, M2_s2, M2_s3, M3, M3_s0, M3_s1, M3_s2, M3_s3,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB_M: tl.constexpr, SUB_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PREC: tl.constexpr):
    """One (query tile, batch * head) program: dQ of the tile (DQ shares Q's contiguous layout)."""
    tile = tl.program_id(0)
    qb = tile // SUB_M
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // GROUP
    C = (C0, C0_s0, C0_s1, C0_s2, C0_s3, C1, C1_s0, C1_s1, C1_s2, C1_s3, C2, C2_s0, C2_s1, C2_s2, C2_s3,
         C3, C3_s0, C3_s1, C3_s2, C3_s3)
    M = (M0, M0_s0, M0_s1, M0_s2, M0_s3, M1, M1_s0, M1_s1, M1_s2, M1_s3, M2, M2_s0, M2_s1, M2_s2, M2_s3,
         M3, M3_s0, M3_s1, M3_s2, M3_s3)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    dcol = tl.arange(0, BLOCK_D)
    q, do, lse, delta = _query_rows(Q, DO, LSE, DELTA, rows, b, h, sq_b, sq_h, sq_n, sd_b, sd_h, sd_n, sl_b, sl_h, Nq,
                                    D, DV, BLOCK_D, BLOCK_DV)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    full = tl.load(FN + b * fn_b + h * fn_h + qb)
    partial = tl.load(PN + b * pn_b + h * pn_h + qb)
    dq = _dq_blocks(dq, q, do, lse, delta, rows, b, h, hk, K, V, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, full,
                    FI + b * fi_b + h * fi_h + qb * fi_q, scale, Nq, Nk, D, DV, C, M, Q, False, BLOCK_N, SUB_N,
                    BLOCK_D, BLOCK_DV, DOT_PREC)
    dq = _dq_blocks(dq, q, do, lse, delta, rows, b, h, hk, K, V, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, partial,
                    PI + b * pi_b + h * pi_h + qb * pi_q, scale, Nq, Nk, D, DV, C, M, Q, True, BLOCK_N, SUB_N,
                    BLOCK_D, BLOCK_DV, DOT_PREC)
    tl.store(DQ + b * sq_b + h * sq_h + rows[:, None] * sq_n + dcol[None, :], dq.to(DQ.dtype.element_ty),
             mask=(rows[:, None] < Nq) & (dcol[None, :] < D))


# ---------------------------------------------------------------------------
# Launchers (plain Python, copied into each generated module with the kernels)
# ---------------------------------------------------------------------------

_SLOTS = 4
# 8 warps: compiled ahead of time for sm_90 (bench/results/flex-aot.md), 64 x 64 tiles at D 128 spill
# nothing in the forward and dQ with 8 warps (dK/dV: 840 stack bytes); with 4 warps all three spill.
_WARPS = 8
# Tiles of at most 64 x 64: a block mask's larger blocks (torch's default is 128) run as several
# tiles. At 128 x 128 every kernel spilled, and the generated code's gathers from captured tensors,
# software-pipelined three deep, asked for 624 KiB of shared memory on an H200 (it has 227 KiB).
TILE = 64
# Pipelining depths tried, deepest first: the first that fits the device's shared memory is kept
# per kernel and tile shape (a generated mask_mod's gathers can need more than the K / V tiles).
_STAGES = (3, 2, 1)
_STAGES_THAT_FIT = {}


def _out_of_resources():
    try:
        from triton.runtime.errors import OutOfResources
    except ImportError:  # pragma: no cover: older triton
        from triton.compiler.errors import OutOfResources
    return OutOfResources


def _launch(kernel, grid, args, options):
    """kernel[grid](*args, **options) at the deepest pipelining in _STAGES that the device's shared
    memory holds; the depth that worked is remembered."""
    key = (kernel, args[0].dtype, args[0].device, tuple(sorted(options.items())))
    depths = (_STAGES_THAT_FIT[key],) if key in _STAGES_THAT_FIT else _STAGES
    for depth in depths:
        try:
            kernel[grid](*args, **options, num_stages=depth)
        except _out_of_resources():
            if depth == depths[-1]:
                raise
            continue
        _STAGES_THAT_FIT[key] = depth
        return


def _slot_args(tensors, filler):
    """Pointer and four strides per capture slot; unused slots point at filler with stride 0."""
    args = []
    for n in range(_SLOTS):
        if n < len(tensors):
            strides = list(tensors[n].stride()) + [0] * _SLOTS
            args += [tensors[n], *strides[:_SLOTS]]
        else:
            args += [filler, 0, 0, 0, 0]
    return args


def _list_args(lists):
    """(full count, full list, partial count, partial list) int32 tensors; size-1 batch / head axes
    broadcast (stride 0)."""
    def stride(t, axis):
        return t.stride(axis) if t.shape[axis] > 1 else 0

    full_num, full_idx, partial_num, partial_idx = lists
    return [full_num, full_idx, partial_num, partial_idx,
            stride(full_num, 0), stride(full_num, 1), stride(full_idx, 0), stride(full_idx, 1), full_idx.stride(2),
            stride(partial_num, 0), stride(partial_num, 1), stride(partial_idx, 0), stride(partial_idx, 1),
            partial_idx.stride(2)]


def _head_dim(n):
    return max(16, triton.next_power_of_2(n))


def _precision(dtype):
    import torch

    return "ieee" if dtype == torch.float32 else "tf32"  # exact float32 products; tf32 is ignored for halves


def _tiles(block_m, block_n, tile):
    """Tile sizes and how many tiles make a block-mask block, per axis."""
    tile_m, tile_n = min(block_m, tile), min(block_n, tile)
    return dict(BLOCK_M=tile_m, BLOCK_N=tile_n, SUB_M=block_m // tile_m, SUB_N=block_n // tile_n)


def forward(q, k, v, scale, score_caps, mask_caps, kv_lists, block_m, block_n, tile=TILE):
    """(out (B, Hq, Nq, Dv) in q's dtype, lse (B, Hq, Nq) float32); contiguous inputs on one device.
    block_m x block_n: the block mask's blocks (powers of two); tiles are at most tile x tile."""
    import torch

    batch, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty((batch, hq, nq, dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, hq, nq), dtype=torch.float32, device=q.device)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    tiles = _tiles(block_m, block_n, tile)
    _launch(flex_forward, (triton.cdiv(nq, tiles["BLOCK_M"]), batch * hq), (
        q, k, v, out, lse, *_list_args(kv_lists), q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
        k.stride(2), v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), scale, nq, nk, hq, hq // hkv, d, dv,
        *_slot_args(score_caps, q), *_slot_args(mask_caps, q),
    ), dict(**tiles, BLOCK_D=_head_dim(d), BLOCK_DV=_head_dim(dv), DOT_PREC=_precision(q.dtype), num_warps=_WARPS))
    return out, lse


def backward(q, k, v, out, dout, lse, dlse, scale, score_caps, mask_caps, kv_lists, q_lists, block_m, block_n,
             grad_slots, tile=TILE):
    """(dq, dk, dv, float32 gradients of score_caps[n] for n in grad_slots)."""
    import torch

    batch, hq, nq, d = q.shape
    hkv, nk, dv_dim = k.shape[1], k.shape[2], v.shape[3]
    delta = ((dout.float() * out.float()).sum(-1) - dlse).contiguous()  # (B, Hq, Nq): rowsum(dO O) - dlse
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    grads = [torch.zeros(score_caps[n].shape, dtype=torch.float32, device=q.device) for n in grad_slots]
    if nq == 0 or nk == 0:
        return dq, dk, dv, grads
    common = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
              v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2), lse.stride(0), lse.stride(1), scale, nq, nk)
    slots = (*_slot_args(score_caps, q), *_slot_args(mask_caps, q))
    tiles = _tiles(block_m, block_n, tile)
    sizes = dict(**tiles, BLOCK_D=_head_dim(d), BLOCK_DV=_head_dim(dv_dim), DOT_PREC=_precision(q.dtype),
                 num_warps=_WARPS)
    grad_args = (grads + [q] * _SLOTS)[:_SLOTS]  # each gradient shares its capture's contiguous layout
    _launch(flex_backward_dkdv, (triton.cdiv(nk, tiles["BLOCK_N"]), batch * hkv), (
        q, k, v, dout, lse, delta, dk, dv, *_list_args(q_lists), *common, hkv, hq // hkv, d, dv_dim, *slots,
        *grad_args,
    ), sizes)  # fmt: skip
    _launch(flex_backward_dq, (triton.cdiv(nq, tiles["BLOCK_M"]), batch * hq), (
        q, k, v, dout, lse, delta, dq, *_list_args(kv_lists), *common, hq, hq // hkv, d, dv_dim, *slots,
    ), sizes)  # fmt: skip
    return dq, dk, dv, grads
