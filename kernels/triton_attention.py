"""Flash attention for NVIDIA GPUs in Triton: fused forward and backward (FlashAttention-2).

What each version changed and what its checks showed: docs/kernel-log.md.
The ahead-of-time compilation report (registers, spills, HGMMA per
configuration, no GPU needed): python -m attnkit.bench.triton_aot.

Semantics follow attnkit.reference.attention exactly: score = scale * q.k,
then softcap * tanh(score / softcap), then + additive mask, then -inf for keys
that causal alignment, the window, a boolean mask or the tail hide. Rows that
see no key give out 0, lse -inf and zero gradients.

Layout: q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv), any strides
(a (B, N, H, D) tensor transposed to (B, H, N, D) runs as it is); the mask is
broadcast with stride 0, never materialised. Outputs follow the input's
memory layout (a transposed q gives a transposed out).

Under TRITON_INTERPRET=1 (set before triton is imported) the kernels run on
CPU tensors, one fixed configuration (INTERPRETER_BLOCKS); bfloat16 is refused
there because the interpreter's bf16 arithmetic is wrong.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = [
    "flash_forward",
    "flash_backward",
    "why_unsupported",
    "interpreting",
    "INTERPRETER_BLOCKS",
    "production_configs",
]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# (BLOCK_M, BLOCK_N) of every kernel under the interpreter; tests may change it.
INTERPRETER_BLOCKS = (32, 32)

_MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting():
    """True when the kernels were built by the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(_fwd_kernel, triton.runtime.jit.JITFunction)


def why_unsupported(dtype, head_dim, head_dim_v, device):
    """None if the kernels can run this call, else a sentence saying why not."""
    device = torch.device(device) if not isinstance(device, torch.device) else device
    if dtype not in _DTYPES:
        return f"the Triton kernel takes float16, bfloat16 or float32; got {dtype}"
    for name, d in (("head_dim", head_dim), ("head_dim_v", head_dim_v)):
        if not 1 <= int(d) <= _MAX_HEAD_DIM:
            return f"the Triton kernel takes {name} from 1 to {_MAX_HEAD_DIM}; got {d}"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
        major, _ = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"the Triton kernel needs compute capability 8.0 or newer; got {major}.x"
        return None
    if device.type == "cpu" and interpreting():
        if dtype == torch.bfloat16:
            return "bfloat16 arithmetic is wrong under the Triton interpreter"
        return None
    return f"the Triton kernel runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1); got {device}"


# --------------------------------------------------------------------------------------
# Device code
# --------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    # tanh from exp2 (libdevice is unavailable under the interpreter): the
    # (1 - e) / (1 + e) form with e = exp(-2|x|) loses digits near 0, where an
    # odd Taylor polynomial through x^9 is exact to ~1e-9 relative (|x| < 1/4).
    a = tl.abs(x)
    e = tl.exp2(a * -2.8853900817779268)  # exp(-2a)
    big = (1.0 - e) / (1.0 + e)
    a2 = a * a
    small = a * (1.0 + a2 * (-0.3333333333333333 + a2 * (0.13333333333333333
                 + a2 * (-0.05396825396825397 + a2 * 0.021869488536155203))))
    t = tl.where(a < 0.25, small, big)
    return tl.where(x < 0, -t, t)


@triton.jit
def _scores(qk, qi, kj, M_base, s_mq, s_mk, Nq, Nk, qk_scale, cap_log2, off, win_l, win_r,
            apply_mask, slope2, MASK_KIND: tl.constexpr, GEOM: tl.constexpr, HAS_LEFT: tl.constexpr,
            HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    """Masked scores in base 2, from raw q.k products.

    qk: q.k tile; qi, kj: query / key indices broadcastable to qk's shape (any
    orientation). apply_mask: 0 when the mask summary says the mask changes
    nothing in this block (its elements are then not read). Returns (s, t):
    s = log2(e) * masked score, t = tanh of the capped score when SOFTCAP (for
    the backward), else qk itself. ALIBI adds -slope * |qi + off - kj| (slope2 =
    slope * log2(e)) after the softcap, as flash-attn does.
    """
    if SOFTCAP:
        t = _tanh(qk * qk_scale)  # qk_scale = scale / softcap
        s = t * cap_log2  # cap_log2 = softcap * log2(e)
    else:
        t = qk
        s = qk * qk_scale  # qk_scale = scale * log2(e)
    if ALIBI:
        s = s - slope2 * tl.abs((qi + off - kj).to(tl.float32))
    if MASK_KIND != 0:
        if apply_mask != 0:
            inb = (qi < Nq) & (kj < Nk)
            mv = tl.load(M_base + qi * s_mq + kj * s_mk, mask=inb, other=0)
            if MASK_KIND == 1:
                s = tl.where(mv != 0, s, float("-inf"))
            else:
                s = s + mv.to(tl.float32) * 1.4426950408889634
    if GEOM:
        vis = (kj < Nk) & (qi < Nq)
        pos = qi + off  # the query's position on the key axis
        if HAS_RIGHT:
            vis = vis & (kj <= pos + win_r)
        if HAS_LEFT:
            vis = vis & (kj >= pos - win_l)
        s = tl.where(vis, s, float("-inf"))
    return s, t


@triton.jit
def _key_range(m0, Nk, off, win_l, win_r, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Key blocks a query block [m0, m0 + BLOCK_M) needs, split for masking.

    Returns (lo, full_lo, full_hi, hi): blocks from lo to full_lo and from
    full_hi to hi need the causal/window/tail test; full_lo..full_hi are
    visible to every query of the block. lo and full_* are block aligned.
    """
    lo = 0
    hi = Nk
    full_lo = 0
    full_hi = (Nk // BLOCK_N) * BLOCK_N  # the key tail is never "full"
    if HAS_LEFT:
        lo = tl.maximum(m0 + off - win_l, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
        # first block with n0 >= (last query's position) - left
        full_lo = tl.maximum(m0 + BLOCK_M - 1 + off - win_l, 0)
        full_lo = tl.cdiv(full_lo, BLOCK_N) * BLOCK_N
    if HAS_RIGHT:
        hi = tl.minimum(tl.maximum(m0 + BLOCK_M + off + win_r, 0), Nk)
        # blocks ending at or before (first query's position) + right + 1
        full_end = tl.maximum(m0 + off + win_r + 1, 0)
        full_hi = tl.minimum(full_hi, (full_end // BLOCK_N) * BLOCK_N)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.maximum(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _part_range(part: tl.constexpr, lo, full_lo, full_hi, hi):
    """[start, stop) of run `part` of a (lo, full_lo, full_hi, hi) split: 0 and 2 need the
    causal/window/tail test, 1 is seen in full."""
    if part == 0:
        return lo, full_lo
    elif part == 1:
        return full_lo, full_hi
    else:
        return full_hi, hi


@triton.jit
def _query_range(n0, Nq, Nk, off, win_l, win_r, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Query blocks that see some key of [n0, n0 + BLOCK_N), split like _key_range."""
    lo = 0
    hi = Nq
    full_lo = 0
    full_hi = (Nq // BLOCK_M) * BLOCK_M
    if HAS_RIGHT:
        # query i sees key j only if j <= i + off + right, so i >= n0 - off - right
        lo = tl.maximum(n0 - off - win_r, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
        full_lo = tl.maximum(n0 + BLOCK_N - 1 - off - win_r, 0)
        full_lo = tl.cdiv(full_lo, BLOCK_M) * BLOCK_M
    if HAS_LEFT:
        # and only if j >= i + off - left, so i <= n0 + BLOCK_N - 1 - off + left
        hi = tl.minimum(tl.maximum(n0 + BLOCK_N - off + win_l, 0), Nq)
        full_end = tl.maximum(n0 - off + win_l + 1, 0)
        full_hi = tl.minimum(full_hi, (full_end // BLOCK_M) * BLOCK_M)
    full_hi = tl.where(n0 + BLOCK_N > Nk, 0, full_hi)  # the key tail needs the test everywhere
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.maximum(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


# Mask summaries: one int8 per 16 x 16 tile of the mask (every BLOCK_M and BLOCK_N
# is a multiple of 16): bit 0 set when some score of the tile survives the mask,
# bit 1 when the mask changes some score (a False, or a nonzero additive value).
# A block without bit 0 is skipped; one without bit 1 runs without reading the mask.
SUMMARY_TILE = 16


@triton.jit
def _block_bits(S_base, m0, n0, s_sq, s_sk, Tq, Tk, MASK_KIND: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(some score of block [m0, +BLOCK_M) x [n0, +BLOCK_N) survives, the mask changes some)."""
    if MASK_KIND == 0:
        some = 1
        changes = 0
    else:
        tm = m0 // 16 + tl.arange(0, BLOCK_M // 16)
        tn = n0 // 16 + tl.arange(0, BLOCK_N // 16)
        bits = tl.load(S_base + tm[:, None] * s_sq + tn[None, :] * s_sk,
                       mask=(tm[:, None] < Tq) & (tn[None, :] < Tk), other=0).to(tl.int32)
        some = tl.max(tl.max(bits & 1, 1), 0)
        changes = tl.max(tl.max(bits & 2, 1), 0)
    return some, changes


@triton.jit
def _fwd_block(acc, m_i, l_i, q, K_base, V_base, M_base, n0, rows, offs_n, offs_d, offs_dv,
               s_kn, s_kd, s_vn, s_vd, s_mq, s_mk, Nq, Nk, qk_scale, cap_log2, off, win_l, win_r,
               apply_mask, slope2, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, MASK_KIND: tl.constexpr,
               GEOM: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
               SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DOT_PREC: tl.constexpr):
    """One key block of the online softmax: acc (BM, BDV), m_i / l_i (BM,)."""
    cols = n0 + offs_n  # (BN,)
    if GEOM:
        col_ok = cols < Nk
    else:
        col_ok = cols >= 0  # every key of a full block exists
    kT = tl.load(K_base + offs_d[:, None] * s_kd + cols[None, :] * s_kn,
                 mask=(offs_d[:, None] < HEAD_DIM) & col_ok[None, :], other=0.0)  # (BD, BN)
    qk = tl.dot(q, kT, input_precision=DOT_PREC)  # (BM, BN) fp32
    s, _t = _scores(qk, rows[:, None], cols[None, :], M_base, s_mq, s_mk, Nq, Nk, qk_scale,
                    cap_log2, off, win_l, win_r, apply_mask, slope2, MASK_KIND, GEOM, HAS_LEFT, HAS_RIGHT,
                    SOFTCAP, ALIBI)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked so far: shift by 0
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])  # (BM, BN)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(V_base + cols[:, None] * s_vn + offs_dv[None, :] * s_vd,
                mask=col_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)  # (BN, BDV)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _sequence(CU_Q, CU_K, b, Nq, Nk, off, align_br, VARLEN: tl.constexpr):
    """(q0, k0, Nq, Nk, off) of sequence b: its first query row and key, its lengths and
    causal offset. Dense calls: (0, 0, Nq, Nk, off) as given. Varlen calls read
    cu_seqlens (the tensors' batch strides are then 0) and align bottom-right
    when align_br is 1."""
    if VARLEN:
        q0 = tl.load(CU_Q + b).to(tl.int64)
        k0 = tl.load(CU_K + b).to(tl.int64)
        Nq = (tl.load(CU_Q + b + 1) - q0).to(tl.int32)
        Nk = (tl.load(CU_K + b + 1) - k0).to(tl.int32)
        off = (Nk - Nq) * align_br
    else:
        q0 = b * 0
        k0 = b * 0
    return q0, k0, Nq, Nk, off


@triton.jit
def _slope(ALIBI_SLOPES, b, h, alibi_sb, alibi_sh, ALIBI: tl.constexpr):
    """ALiBi's slope of (sequence b, head h) times log2(e), or 0."""
    if ALIBI:
        return tl.load(ALIBI_SLOPES + b * alibi_sb + h * alibi_sh).to(tl.float32) * 1.4426950408889634
    return 0.0


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, M, S, CU_Q, CU_K, ALIBI_SLOPES,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_on, s_od,
    s_mb, s_mh, s_mq, s_mk,
    s_sb, s_sh, s_sq, s_sk, Tq, Tk, lse_sb, lse_sh, alibi_sb, alibi_sh, align_br,
    Hq, Nq, Nk, GROUP, qk_scale, cap_log2, off, win_l, win_r, Nq_b, Nk_b,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, INDEX_64: tl.constexpr, DOT_PREC: tl.constexpr,
    VARLEN: tl.constexpr, ALIBI: tl.constexpr,
):
    # grid: (cdiv(Nq, BLOCK_M), B * Hq) (Nq: the longest sequence when VARLEN); the
    # heaviest (last, under causal) blocks start first
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    hk = h // GROUP  # GQA: query head h reads kv head h // (Hq // Hkv)
    m0 = start_m * BLOCK_M
    q0, k0, Nq, Nk, off = _sequence(CU_Q, CU_K, b, Nq, Nk, off, align_br, VARLEN)
    if m0 >= Nq:  # a shorter sequence of a varlen call: nothing here
        return
    slope2 = _slope(ALIBI_SLOPES, b, h, alibi_sb, alibi_sh, ALIBI)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    if INDEX_64:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = m0 + offs_m  # (BM,)

    K_base = K + b * s_kb + hk * s_kh + k0 * s_kn
    V_base = V + b * s_vb + hk * s_vh + k0 * s_vn
    M_base = M + b * s_mb + h * s_mh
    S_base = S + b * s_sb + h * s_sh
    q = tl.load(Q + b * s_qb + h * s_qh + (q0 + rows[:, None]) * s_qn + offs_d[None, :] * s_qd,
                mask=(rows[:, None] < Nq) & (offs_d[None, :] < HEAD_DIM), other=0.0)  # (BM, BD)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    lo, full_lo, full_hi, hi = _key_range(m0, Nk, off, win_l, win_r, BLOCK_M, BLOCK_N,
                                          HAS_LEFT, HAS_RIGHT)
    # Three runs of key blocks: the left window edge, blocks every query sees in full (no
    # causal/window/tail test: GEOM off), the causal diagonal, right edge and key tail.
    for part in tl.static_range(3):
        start, stop = _part_range(part, lo, full_lo, full_hi, hi)
        for n0 in range(start, stop, BLOCK_N):
            some, changes = _block_bits(S_base, m0, n0, s_sq, s_sk, Tq, Tk, MASK_KIND, BLOCK_M, BLOCK_N)
            if some != 0:  # a block the mask hides entirely is skipped
                acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, K_base, V_base, M_base, n0, rows, offs_n,
                                           offs_d, offs_dv, s_kn, s_kd, s_vn, s_vd, s_mq, s_mk, Nq, Nk,
                                           qk_scale, cap_log2, off, win_l, win_r, changes, slope2, HEAD_DIM,
                                           HEAD_DIM_V, MASK_KIND, part != 1, HAS_LEFT, HAS_RIGHT, SOFTCAP,
                                           ALIBI, DOT_PREC)

    empty = l_i == 0.0  # no visible key: out 0, lse -inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    row_ok = rows < Nq
    tl.store(O + b * s_ob + h * s_oh + (q0 + rows[:, None]) * s_on + offs_dv[None, :] * s_od,
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(LSE + b * lse_sb + h * lse_sh + q0 + rows, lse, mask=row_ok)


@triton.jit
def _bwd_preprocess(
    O, DO, DLSE, DELTA,
    s_ob, s_oh, s_on, s_od,
    s_db, s_dh, s_dn, s_dd,
    lse_sb, lse_sh, Hq, Nq,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_DLSE: tl.constexpr, INDEX_64: tl.constexpr,
):
    # delta_i = sum_c dO_ic * O_ic (- dlse_i: the gradient through lse folds in here).
    # Rows are those of the tensors as laid out (all sequences of a varlen call at once).
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    if INDEX_64:
        rows = rows.to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV)
    ok = (rows[:, None] < Nq) & (offs_dv[None, :] < HEAD_DIM_V)
    o = tl.load(O + b * s_ob + h * s_oh + rows[:, None] * s_on + offs_dv[None, :] * s_od,
                mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DO + b * s_db + h * s_dh + rows[:, None] * s_dn + offs_dv[None, :] * s_dd,
                 mask=ok, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    row_base = b * lse_sb + h * lse_sh
    if HAS_DLSE:
        delta -= tl.load(DLSE + row_base + rows, mask=rows < Nq, other=0.0)
    tl.store(DELTA + row_base + rows, delta, mask=rows < Nq)


@triton.jit
def _dkdv_block(dk, dv, k, v, Q_base, DO_base, M_base, LSE_row, DELTA_row, m0, cols, offs_m,
                offs_d, offs_dv, s_qn, s_qd, s_dn, s_dd, s_mq, s_mk, Nq, Nk, qk_scale, cap_log2,
                off, win_l, win_r, apply_mask, slope2, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                MASK_KIND: tl.constexpr, GEOM: tl.constexpr, HAS_LEFT: tl.constexpr,
                HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DOT_PREC: tl.constexpr):
    """One query block's contribution to dk (BN, BD) and dv (BN, BDV), transposed scores."""
    rows = m0 + offs_m  # (BM,)
    if GEOM:
        row_ok = rows < Nq
    else:
        row_ok = rows >= 0
    qT = tl.load(Q_base + offs_d[:, None] * s_qd + rows[None, :] * s_qn,
                 mask=(offs_d[:, None] < HEAD_DIM) & row_ok[None, :], other=0.0)  # (BD, BM)
    do = tl.load(DO_base + rows[:, None] * s_dn + offs_dv[None, :] * s_dd,
                 mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)  # (BM, BDV)
    lse = tl.load(LSE_row + rows, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)  # (BM,)
    delta = tl.load(DELTA_row + rows, mask=row_ok, other=0.0)  # (BM,)
    qkT = tl.dot(k, qT, input_precision=DOT_PREC)  # (BN, BM)
    sT, tT = _scores(qkT, rows[None, :], cols[:, None], M_base, s_mq, s_mk, Nq, Nk, qk_scale,
                     cap_log2, off, win_l, win_r, apply_mask, slope2, MASK_KIND, GEOM, HAS_LEFT, HAS_RIGHT,
                     SOFTCAP, ALIBI)
    pT = tl.exp2(sT - lse2[None, :])  # (BN, BM) probabilities, 0 where invisible
    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # (BN, BM)
    dsT = pT * (dpT - delta[None, :])
    if SOFTCAP:
        dsT = dsT * (1.0 - tT * tT)
    dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, M, S, CU_Q, CU_K, ALIBI_SLOPES,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_db, s_dh, s_dn, s_dd,
    s_dkb, s_dkh, s_dkn, s_dkd,
    s_dvb, s_dvh, s_dvn, s_dvd,
    s_mb, s_mh, s_mq, s_mk,
    s_sb, s_sh, s_sq, s_sk, Tq, Tk, lse_sb, lse_sh, alibi_sb, alibi_sh, align_br,
    Hq, Hkv, Nq, Nk, GROUP, qk_scale, cap_log2, scale, off, win_l, win_r, Nq_b, Nk_b,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, INDEX_64: tl.constexpr, DOT_PREC: tl.constexpr,
    VARLEN: tl.constexpr, ALIBI: tl.constexpr,
):
    # grid: (cdiv(Nk, BLOCK_N), B * Hkv); each program owns one key block of one kv head
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    hk = (bh % Hkv).to(tl.int64)
    n0 = tl.program_id(0) * BLOCK_N
    q0, k0, Nq, Nk, off = _sequence(CU_Q, CU_K, b, Nq, Nk, off, align_br, VARLEN)
    if n0 >= Nk:  # a shorter sequence of a varlen call: its keys end before this block
        return
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    if INDEX_64:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    cols = n0 + offs_n  # (BN,)
    col_ok = cols < Nk
    k = tl.load(K + b * s_kb + hk * s_kh + (k0 + cols[:, None]) * s_kn + offs_d[None, :] * s_kd,
                mask=col_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)  # (BN, BD)
    v = tl.load(V + b * s_vb + hk * s_vh + (k0 + cols[:, None]) * s_vn + offs_dv[None, :] * s_vd,
                mask=col_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)  # (BN, BDV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)

    lo, full_lo, full_hi, hi = _query_range(n0, Nq, Nk, off, win_l, win_r, BLOCK_M, BLOCK_N,
                                            HAS_LEFT, HAS_RIGHT)
    for g in range(0, GROUP):  # the query heads sharing this kv head, in a fixed order
        h = hk * GROUP + g
        slope2 = _slope(ALIBI_SLOPES, b, h, alibi_sb, alibi_sh, ALIBI)
        Q_base = Q + b * s_qb + h * s_qh + q0 * s_qn
        DO_base = DO + b * s_db + h * s_dh + q0 * s_dn
        M_base = M + b * s_mb + h * s_mh
        S_base = S + b * s_sb + h * s_sh
        LSE_row = LSE + b * lse_sb + h * lse_sh + q0
        DELTA_row = DELTA + b * lse_sb + h * lse_sh + q0
        for part in tl.static_range(3):  # the runs of _query_range, as in the forward
            start, stop = _part_range(part, lo, full_lo, full_hi, hi)
            for m0 in range(start, stop, BLOCK_M):
                some, changes = _block_bits(S_base, m0, n0, s_sq, s_sk, Tq, Tk, MASK_KIND, BLOCK_M, BLOCK_N)
                if some != 0:
                    dk, dv = _dkdv_block(dk, dv, k, v, Q_base, DO_base, M_base, LSE_row, DELTA_row, m0,
                                         cols, offs_m, offs_d, offs_dv, s_qn, s_qd, s_dn, s_dd, s_mq,
                                         s_mk, Nq, Nk, qk_scale, cap_log2, off, win_l, win_r, changes, slope2,
                                         HEAD_DIM, HEAD_DIM_V, MASK_KIND, part != 1, HAS_LEFT, HAS_RIGHT,
                                         SOFTCAP, ALIBI, DOT_PREC)
    dk = dk * scale  # d(score)/d(q.k) = scale (times 1 - tanh^2 under softcap, applied above)
    tl.store(DK + b * s_dkb + hk * s_dkh + (k0 + cols[:, None]) * s_dkn + offs_d[None, :] * s_dkd,
             dk.to(DK.dtype.element_ty), mask=col_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(DV + b * s_dvb + hk * s_dvh + (k0 + cols[:, None]) * s_dvn + offs_dv[None, :] * s_dvd,
             dv.to(DV.dtype.element_ty), mask=col_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def _dq_block(dq, q, do, lse2, delta, K_base, V_base, M_base, n0, rows, offs_n, offs_d, offs_dv,
              s_kn, s_kd, s_vn, s_vd, s_mq, s_mk, Nq, Nk, qk_scale, cap_log2, off, win_l, win_r,
              apply_mask, slope2, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, MASK_KIND: tl.constexpr,
              GEOM: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
              SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DOT_PREC: tl.constexpr):
    """One key block's contribution to dq (BM, BD)."""
    cols = n0 + offs_n
    if GEOM:
        col_ok = cols < Nk
    else:
        col_ok = cols >= 0
    kT = tl.load(K_base + offs_d[:, None] * s_kd + cols[None, :] * s_kn,
                 mask=(offs_d[:, None] < HEAD_DIM) & col_ok[None, :], other=0.0)  # (BD, BN)
    vT = tl.load(V_base + offs_dv[:, None] * s_vd + cols[None, :] * s_vn,
                 mask=(offs_dv[:, None] < HEAD_DIM_V) & col_ok[None, :], other=0.0)  # (BDV, BN)
    qk = tl.dot(q, kT, input_precision=DOT_PREC)  # (BM, BN)
    s, t = _scores(qk, rows[:, None], cols[None, :], M_base, s_mq, s_mk, Nq, Nk, qk_scale,
                   cap_log2, off, win_l, win_r, apply_mask, slope2, MASK_KIND, GEOM, HAS_LEFT, HAS_RIGHT,
                   SOFTCAP, ALIBI)
    p = tl.exp2(s - lse2[:, None])
    dp = tl.dot(do, vT, input_precision=DOT_PREC)  # (BM, BN)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PREC)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, M, S, CU_Q, CU_K, ALIBI_SLOPES,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_db, s_dh, s_dn, s_dd,
    s_dqb, s_dqh, s_dqn, s_dqd,
    s_mb, s_mh, s_mq, s_mk,
    s_sb, s_sh, s_sq, s_sk, Tq, Tk, lse_sb, lse_sh, alibi_sb, alibi_sh, align_br,
    Hq, Nq, Nk, GROUP, qk_scale, cap_log2, scale, off, win_l, win_r, Nq_b, Nk_b,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, INDEX_64: tl.constexpr, DOT_PREC: tl.constexpr,
    VARLEN: tl.constexpr, ALIBI: tl.constexpr,
):
    # grid: (cdiv(Nq, BLOCK_M), B * Hq); same key walk as the forward
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    hk = h // GROUP
    m0 = start_m * BLOCK_M
    q0, k0, Nq, Nk, off = _sequence(CU_Q, CU_K, b, Nq, Nk, off, align_br, VARLEN)
    if m0 >= Nq:  # a shorter sequence of a varlen call: nothing here
        return
    slope2 = _slope(ALIBI_SLOPES, b, h, alibi_sb, alibi_sh, ALIBI)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    if INDEX_64:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = m0 + offs_m
    row_ok = rows < Nq
    q = tl.load(Q + b * s_qb + h * s_qh + (q0 + rows[:, None]) * s_qn + offs_d[None, :] * s_qd,
                mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)  # (BM, BD)
    do = tl.load(DO + b * s_db + h * s_dh + (q0 + rows[:, None]) * s_dn + offs_dv[None, :] * s_dd,
                 mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)  # (BM, BDV)
    row_base = b * lse_sb + h * lse_sh + q0
    lse = tl.load(LSE + row_base + rows, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    delta = tl.load(DELTA + row_base + rows, mask=row_ok, other=0.0)
    K_base = K + b * s_kb + hk * s_kh + k0 * s_kn
    V_base = V + b * s_vb + hk * s_vh + k0 * s_vn
    M_base = M + b * s_mb + h * s_mh
    S_base = S + b * s_sb + h * s_sh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    lo, full_lo, full_hi, hi = _key_range(m0, Nk, off, win_l, win_r, BLOCK_M, BLOCK_N,
                                          HAS_LEFT, HAS_RIGHT)
    for part in tl.static_range(3):  # the runs of _key_range, as in the forward
        start, stop = _part_range(part, lo, full_lo, full_hi, hi)
        for n0 in range(start, stop, BLOCK_N):
            some, changes = _block_bits(S_base, m0, n0, s_sq, s_sk, Tq, Tk, MASK_KIND, BLOCK_M, BLOCK_N)
            if some != 0:
                dq = _dq_block(dq, q, do, lse2, delta, K_base, V_base, M_base, n0, rows, offs_n, offs_d,
                               offs_dv, s_kn, s_kd, s_vn, s_vd, s_mq, s_mk, Nq, Nk, qk_scale, cap_log2,
                               off, win_l, win_r, changes, slope2, HEAD_DIM, HEAD_DIM_V, MASK_KIND, part != 1,
                               HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, DOT_PREC)
    dq = dq * scale
    tl.store(DQ + b * s_dqb + h * s_dqh + (q0 + rows[:, None]) * s_dqn + offs_d[None, :] * s_dqd,
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


# --------------------------------------------------------------------------------------
# Tile configurations
# --------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, architecture (8 = sm_80
# family, 9 = sm_90) and padded head dim class. Few configurations per entry so
# autotuning (once per head dim, dtype, mask kind and length bucket) stays
# short; the first one of each list is the one the AOT test holds to "no spill".
_CONFIGS = {
    "fwd": {
        8: {64: [(128, 64, 4, 3), (64, 64, 4, 4), (128, 32, 8, 4)],
            128: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3)],
            256: [(64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 8, 2)]},
        9: {64: [(128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 4)],
            128: [(128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3)],
            256: [(128, 32, 8, 2), (64, 32, 8, 2)]},
    },
    "dkdv": {
        8: {64: [(32, 64, 4, 3), (32, 64, 8, 3)],
            128: [(32, 64, 8, 3), (16, 64, 4, 3)],
            256: [(16, 32, 4, 1), (32, 64, 8, 1)]},
        9: {64: [(64, 128, 8, 3), (32, 128, 8, 3)],
            128: [(32, 128, 8, 2), (32, 64, 8, 3)],
            256: [(32, 32, 8, 1), (64, 32, 8, 1)]},
    },
    "dq": {
        8: {64: [(128, 32, 8, 3), (64, 32, 4, 3)],
            128: [(64, 32, 4, 3), (64, 64, 4, 3)],
            256: [(32, 32, 4, 1)]},
        9: {64: [(128, 64, 8, 3), (128, 32, 4, 3)],
            128: [(128, 64, 8, 2), (64, 32, 4, 3)],
            256: [(64, 32, 8, 2), (128, 32, 8, 1)]},
    },
}


def _dim_class(block_d):
    return 64 if block_d <= 64 else (128 if block_d <= 128 else 256)


def production_configs(kernel, arch, block_d, dtype=torch.float16):
    """[(BLOCK_M, BLOCK_N, num_warps, num_stages)] tried by the autotuner."""
    configs = _CONFIGS[kernel][min(max(arch, 8), 9)][_dim_class(block_d)]
    if dtype == torch.float32:  # twice the bytes per tile: halve the long side
        configs = [(max(16, bm // 2) if bm >= bn else bm, max(16, bn // 2) if bn > bm else bn,
                    w, max(1, s - 1)) for bm, bn, w, s in configs]
    return configs


def _smem_estimate(kernel, bm, bn, stages, block_d, block_dv, itemsize):
    if kernel == "fwd":
        return (bm * block_d + stages * bn * (block_d + block_dv)) * itemsize
    if kernel == "dkdv":
        return (bn * (block_d + block_dv) + stages * bm * (block_d + block_dv)) * itemsize
    return (bm * (block_d + block_dv) + stages * bn * (block_d + block_dv)) * itemsize


_TUNED = {}


def _tuned(kernel, fn, device, block_d, block_dv, dtype):
    """The autotuned launcher of `fn` for this device and head dims (built once)."""
    major, minor = torch.cuda.get_device_capability(device)
    key = (kernel, major, minor, block_d, block_dv, dtype)
    if key in _TUNED:
        return _TUNED[key]
    try:
        smem = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    except AttributeError:  # older torch
        smem = 99 * 1024 if major == 8 and minor != 0 else 163 * 1024
    itemsize = torch.empty((), dtype=dtype).element_size()
    configs = []
    for bm, bn, warps, stages in production_configs(kernel, major, max(block_d, block_dv), dtype):
        while stages > 1 and _smem_estimate(kernel, bm, bn, stages, block_d, block_dv, itemsize) > smem:
            stages -= 1
        configs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps,
                                     num_stages=stages))
    tuned = triton.autotune(configs=configs, key=_TUNE_KEYS[kernel])(fn)
    _TUNED[key] = tuned
    return tuned


# Autotuning keys: everything that changes the best tile except exact lengths,
# which enter through their power-of-two bucket (Nq_b, Nk_b) so varying
# sequence lengths do not re-tune on every call.
_TUNE_KEYS = {
    "fwd": ["Nq_b", "Nk_b", "HEAD_DIM", "HEAD_DIM_V", "MASK_KIND", "HAS_LEFT", "HAS_RIGHT", "SOFTCAP",
             "VARLEN", "ALIBI"],
    "dkdv": ["Nq_b", "Nk_b", "HEAD_DIM", "HEAD_DIM_V", "MASK_KIND", "HAS_LEFT", "HAS_RIGHT", "SOFTCAP",
             "VARLEN", "ALIBI"],
    "dq": ["Nq_b", "Nk_b", "HEAD_DIM", "HEAD_DIM_V", "MASK_KIND", "HAS_LEFT", "HAS_RIGHT", "SOFTCAP",
             "VARLEN", "ALIBI"],
}


# --------------------------------------------------------------------------------------
# Host code
# --------------------------------------------------------------------------------------


def _next_pow2(n):
    return 1 << max(0, int(n) - 1).bit_length()


def _strides(x):
    return tuple(x.stride())


def _span(x):
    """Largest element offset a kernel computes into x (for the 64-bit switch)."""
    return sum((n - 1) * abs(s) for n, s in zip(x.shape, x.stride()) if n > 0)


def _geometry(causal, window, nq, nk):
    """(off, win_l, win_r, HAS_LEFT, HAS_RIGHT) with causal folded into the right edge."""
    if causal is True:
        causal = "top_left"
    elif causal is False:
        causal = None
    if causal not in (None, "top_left", "bottom_right"):
        raise ValueError(f"causal must be None, 'top_left' or 'bottom_right'; got {causal!r}")
    off = nk - nq if causal == "bottom_right" else 0
    left, right = (None, None) if window is None else window
    if causal is not None:
        right = 0 if right is None else min(int(right), 0)
    limit = nq + nk + 1  # beyond this a window edge changes nothing; keeps int32 safe
    win_l = 0 if left is None else max(-limit, min(int(left), limit))
    win_r = 0 if right is None else max(-limit, min(int(right), limit))
    return off, win_l, win_r, left is not None, right is not None


def _mask_operand(mask, shape, dummy):
    """(tensor, strides, MASK_KIND): the mask broadcast by strides to (B, Hq, Nq, Nk)."""
    if mask is None:
        return dummy, (0, 0, 0, 0), 0
    m = mask
    while m.dim() > 4:
        if m.shape[0] != 1:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to {shape}")
        m = m[0]
    m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape)).expand(shape)  # stride 0, no copy
    if m.dtype == torch.bool:
        return m.view(torch.uint8), _strides(m), 1
    return m, _strides(m), 2


def _mask_summary(mask, shape, dummy):
    """(summary, (s_sb, s_sh, s_sq, s_sk, Tq, Tk)): the mask's 16 x 16 tile bits (see SUMMARY_TILE).

    Computed once per call on the mask's own device from its broadcast form
    (an axis of size 1 stays 1: a key-padding mask gives one row of tiles). Tq /
    Tk bound the tile indices; a broadcast axis reads tile 0 (stride 0, no bound).
    """
    if mask is None:
        return dummy, (0, 0, 0, 0, 1, 1)
    m = mask.reshape((1,) * max(0, 4 - mask.dim()) + tuple(mask.shape[-4:]))
    survives = m if m.dtype == torch.bool else m != float("-inf")
    changes = ~m if m.dtype == torch.bool else m != 0
    tile = SUMMARY_TILE
    pad_q = (-m.shape[2]) % tile if m.shape[2] > 1 else 0
    pad_k = (-m.shape[3]) % tile if m.shape[3] > 1 else 0

    def any_in_tiles(x):
        x = torch.nn.functional.pad(x.to(torch.uint8), (0, pad_k, 0, pad_q))  # padding: neither bit
        bm, hm, mq, mk = x.shape
        tq, tk = (mq // tile if mq > 1 else 1), (mk // tile if mk > 1 else 1)
        return x.reshape(bm, hm, tq, mq // tq, tk, mk // tk).amax(dim=(3, 5))

    summary = (any_in_tiles(survives) | (any_in_tiles(changes) << 1)).to(torch.int8).contiguous()
    tq, tk = summary.shape[2], summary.shape[3]
    strides = [0 if n == 1 else st for n, st in zip(summary.shape, summary.stride())]
    unbounded = 2**31 - 1
    return summary, (*strides, tq if tq > 1 else unbounded, tk if tk > 1 else unbounded)


def _empty_like_layout(x, shape, dtype=None):
    """A new tensor of `shape` (B, H, N, X) laid out like x (so (B, N, H, D) memory stays so)."""
    dtype = x.dtype if dtype is None else dtype
    if x.dim() == 4 and x.stride(1) < x.stride(2) and x.shape[1] > 1 and x.shape[2] > 1:
        b, h, n, d = shape
        return torch.empty((b, n, h, d), dtype=dtype, device=x.device).transpose(1, 2)
    return torch.empty(shape, dtype=dtype, device=x.device)


def _common(q, k, v, mask, scale, causal, window, softcap, extra=()):
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    off, win_l, win_r, has_left, has_right = _geometry(causal, window, Nq, Nk)
    m, m_strides, mask_kind = _mask_operand(mask, (B, Hq, Nq, Nk), q)
    summary, s_strides = _mask_summary(mask, (B, Hq, Nq, Nk), q)
    if softcap is not None and softcap > 0:
        qk_scale, cap_log2, use_cap = float(scale) / float(softcap), float(softcap) * LOG2E, True
    else:
        qk_scale, cap_log2, use_cap = float(scale) * LOG2E, 1.0, False
    spans = [_span(x) for x in (q, k, v, *extra)] + ([_span(m)] if mask is not None else [])
    spans.append(B * Hq * Nq)
    index_64 = max(spans) >= 2**31 - 1
    return dict(
        B=B, Hq=Hq, Hkv=Hkv, Nq=Nq, Nk=Nk, D=D, Dv=Dv, group=Hq // Hkv, mask=m,
        m_strides=m_strides, mask_kind=mask_kind, summary=summary, s_strides=s_strides, off=off, win_l=win_l, win_r=win_r,
        has_left=has_left, has_right=has_right, qk_scale=qk_scale, cap_log2=cap_log2,
        use_cap=use_cap, index_64=index_64, block_d=max(16, _next_pow2(D)),
        block_dv=max(16, _next_pow2(Dv)),
        dot_prec="ieee" if q.dtype == torch.float32 else "tf32",
    )


def _identity(fn):
    return fn


def _launcher(kernel, fn, c, dtype, device, wrap):
    """(callable[grid](...), extra kwargs): autotuned on CUDA, one config when interpreting."""
    if interpreting() or device.type != "cuda":
        bm, bn = INTERPRETER_BLOCKS
        return wrap(fn), dict(BLOCK_M=bm, BLOCK_N=bn)
    tuned = _tuned(kernel, fn, device, c["block_d"], c["block_dv"], dtype)
    return wrap(tuned), {}


def _constexprs(c):
    return dict(
        HEAD_DIM=c["D"], HEAD_DIM_V=c["Dv"], BLOCK_D=c["block_d"], BLOCK_DV=c["block_dv"],
        MASK_KIND=c["mask_kind"], HAS_LEFT=c["has_left"], HAS_RIGHT=c["has_right"],
        SOFTCAP=c["use_cap"], INDEX_64=c["index_64"], DOT_PREC=c["dot_prec"],
        VARLEN=c["varlen"] is not None, ALIBI=c["alibi"] is not None,
    )


def _sequences(c, q, lse):
    """The kernels' arguments on sequences and ALiBi:
    (CU_Q, CU_K, ALIBI_SLOPES), (lse_sb, lse_sh, alibi_sb, alibi_sh, align_br)."""
    alibi = c["alibi"]
    alibi_strides = (0, 0) if alibi is None else (alibi.stride(0) if alibi.shape[0] > 1 else 0, alibi.stride(1))
    alibi = q if alibi is None else alibi
    if c["varlen"] is None:
        return (q, q, alibi), (lse.stride(0), lse.stride(1), *alibi_strides, 0)
    cu_q, cu_k, align_br = c["varlen"]
    return (cu_q, cu_k, alibi), (0, lse.stride(0), *alibi_strides, align_br)


def flash_forward(q, k, v, mask=None, *, scale, causal=None, window=None, softcap=None,
                  _wrap=None, _force_int64=False, _alibi=None):
    """Attention forward: returns (out (B, Hq, Nq, Dv) in q's dtype, lse (B, Hq, Nq) float32).

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv), any strides, one
    dtype; mask None, bool (True = attend) or additive float, broadcastable to
    (B, Hq, Nq, Nk); causal None / "top_left" / "bottom_right"; window None or
    (left, right) with None sides unlimited; softcap None or > 0.
    `_wrap` wraps each kernel before launch (torch.library.wrap_triton); `_alibi`
    (B or 1, Hq) float32 slopes add -slope * |i + off - j| to the scores.
    """
    wrap = _wrap or _identity
    B, Hq, Nq, _ = q.shape
    Dv = v.shape[3]
    out = _empty_like_layout(q, (B, Hq, Nq, Dv))
    lse = torch.empty((B, Hq, Nq), dtype=torch.float32, device=q.device)
    if B * Hq * Nq == 0:
        return out, lse
    if k.shape[2] == 0:  # no keys: every row fully masked
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    c = _common(q, k, v, mask, scale, causal, window, softcap, extra=(out,))
    c.update(index_64=c["index_64"] or _force_int64, varlen=None, alibi=_alibi)
    _launch_forward(q, k, v, out, lse, c, B, Nq, wrap)
    return out, lse


def _launch_forward(q, k, v, out, lse, c, n_sequences, longest_q, wrap):
    launch, blocks = _launcher("fwd", _fwd_kernel, c, q.dtype, q.device, wrap)
    pointers, scalars = _sequences(c, q, lse)

    def grid(meta):
        return (triton.cdiv(longest_q, meta["BLOCK_M"]), n_sequences * c["Hq"])

    launch[grid](
        q, k, v, out, lse, c["mask"], c["summary"], *pointers,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), *c["m_strides"], *c["s_strides"], *scalars,
        c["Hq"], c["Nq"], c["Nk"], c["group"], c["qk_scale"], c["cap_log2"], c["off"], c["win_l"],
        c["win_r"], _next_pow2(c["Nq"]), _next_pow2(c["Nk"]), **_constexprs(c), **blocks,
    )


def flash_backward(q, k, v, mask, out, d_out, lse, *, scale, causal=None, window=None,
                   softcap=None, d_lse=None, _wrap=None, _force_int64=False, _alibi=None):
    """Attention backward: returns (dq, dk, dv) with the shapes and dtypes of q, k, v.

    out, d_out (B, Hq, Nq, Dv) and lse (B, Hq, Nq) come from flash_forward;
    d_lse (B, Hq, Nq), optional, is the gradient reaching lse itself.
    Deterministic: no atomics, a fixed summation order over GQA groups.
    """
    wrap = _wrap or _identity
    B, Hq, Nq, D = q.shape
    dq = _empty_like_layout(q, tuple(q.shape))
    dk = _empty_like_layout(k, tuple(k.shape))
    dv = _empty_like_layout(v, tuple(v.shape))
    Nk = k.shape[2]
    if B * Hq * Nq == 0 or Nk == 0 or k.shape[1] == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    c = _common(q, k, v, mask, scale, causal, window, softcap, extra=(out, d_out, dq, dk, dv))
    c.update(index_64=c["index_64"] or _force_int64, varlen=None, alibi=_alibi)
    _launch_backward(q, k, v, out, d_out, lse, d_lse, dq, dk, dv, c, scale, B, wrap)
    return dq, dk, dv


def _launch_backward(q, k, v, out, d_out, lse, d_lse, dq, dk, dv, c, scale, n_sequences, wrap):
    """The three backward kernels. lse / delta rows: (B, Hq, Nq) dense, (Hq, total_q) varlen."""
    lse = lse.to(torch.float32)
    if not lse.is_contiguous():
        lse = lse.contiguous()
    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    has_dlse = d_lse is not None
    dlse = d_lse.to(torch.float32).contiguous() if has_dlse else delta
    pointers, sequence_scalars = _sequences(c, q, lse)
    rows = q.shape[2]  # every row as laid out: all sequences of a varlen call at once
    batch = 1 if c["varlen"] is not None else q.shape[0]
    pre_block = 32 if c["block_dv"] >= 256 else 64
    wrap(_bwd_preprocess)[(triton.cdiv(rows, pre_block), batch * c["Hq"])](
        out, d_out, dlse, delta, *_strides(out), *_strides(d_out), *sequence_scalars[:2], c["Hq"], rows,
        HEAD_DIM_V=c["Dv"], BLOCK_DV=c["block_dv"], BLOCK_M=pre_block, HAS_DLSE=has_dlse,
        INDEX_64=c["index_64"],
    )
    Nq, Nk = c["Nq"], c["Nk"]  # the longest sequences when varlen
    scalars = (c["qk_scale"], c["cap_log2"], float(scale), c["off"], c["win_l"], c["win_r"])
    buckets = (_next_pow2(Nq), _next_pow2(Nk))  # Nq_b, Nk_b: autotuning keys only

    launch, blocks = _launcher("dkdv", _bwd_dkdv_kernel, c, q.dtype, q.device, wrap)
    launch[lambda meta: (triton.cdiv(Nk, meta["BLOCK_N"]), n_sequences * c["Hkv"])](
        q, k, v, d_out, lse, delta, dk, dv, c["mask"], c["summary"], *pointers,
        *_strides(q), *_strides(k), *_strides(v), *_strides(d_out), *_strides(dk),
        *_strides(dv), *c["m_strides"], *c["s_strides"], *sequence_scalars,
        c["Hq"], c["Hkv"], Nq, Nk, c["group"], *scalars, *buckets,
        **_constexprs(c), **blocks,
    )
    launch, blocks = _launcher("dq", _bwd_dq_kernel, c, q.dtype, q.device, wrap)
    launch[lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]), n_sequences * c["Hq"])](
        q, k, v, d_out, lse, delta, dq, c["mask"], c["summary"], *pointers,
        *_strides(q), *_strides(k), *_strides(v), *_strides(d_out), *_strides(dq),
        *c["m_strides"], *c["s_strides"], *sequence_scalars,
        c["Hq"], Nq, Nk, c["group"], *scalars, *buckets,
        **_constexprs(c), **blocks,
    )


# --------------------------------------------------------------------------------------
# Packed sequences of different lengths (attnkit.varlen_attention on CUDA)
# --------------------------------------------------------------------------------------


def _batched(x, n_sequences):
    """(H, total, X) as a (S, H, total, X) view with batch stride 0: program b of a varlen
    launch adds b * (batch stride) = 0 and finds its rows through cu_seqlens instead."""
    return x.unsqueeze(0).expand(n_sequences, *x.shape)


def _varlen_setup(q, k, v, alibi_slopes, spec, extra):
    """(q, k, v as (S, H, total, D) views with batch stride 0, the launch dict c)."""
    q4, k4, v4 = (_batched(x, len(spec.cu_q) - 1) for x in (q, k, v))
    longest_q = max(1, int(spec.lengths_q.max(initial=0)))
    longest_k = max(1, int(spec.lengths_k.max(initial=0)))
    causal = "bottom_right" if spec.causal and spec.align == "bottom_right" else ("top_left" if spec.causal else None)
    # _geometry's offset is per call; the kernels recompute it per sequence from cu_seqlens.
    c = _common(q4[..., :longest_q, :], k4[..., :longest_k, :], v4[..., :longest_k, :], None, spec.scale,
                causal, spec.window, spec.softcap, extra=(q4, k4, v4) + extra)
    alibi = None
    if alibi_slopes is not None:
        alibi = alibi_slopes.to(device=q.device, dtype=torch.float32).reshape(-1, spec.hq)
    cu = [torch.as_tensor(x, dtype=torch.int32).to(q.device) for x in (spec.cu_q, spec.cu_k)]
    c.update(varlen=(cu[0], cu[1], int(spec.align == "bottom_right")), alibi=alibi, off=0)
    return q4, k4, v4, c


def varlen_forward(q, k, v, alibi_slopes, spec, _wrap=None):
    """(out (Hq, total_q, Dv), lse (Hq, total_q) float32) for attnkit.varlen_attention.

    q (Hq, total_q, D), k (Hkv, total_k, D), v (Hkv, total_k, Dv) CUDA tensors
    (any strides); spec an attnkit.varlen.VarlenSpec. One launch for all
    sequences: program (query block, sequence x head) reads its sequence's
    offsets from cu_seqlens and stops when the sequence is shorter.
    """
    out = torch.zeros((spec.hq, q.shape[1], spec.dv), dtype=q.dtype, device=q.device)  # rows of no sequence: 0
    lse = torch.full((spec.hq, q.shape[1]), float("-inf"), dtype=torch.float32, device=q.device)
    n_sequences = len(spec.cu_q) - 1
    if n_sequences == 0 or q.shape[1] == 0 or spec.hq == 0:
        return out, lse
    out4 = _batched(out, n_sequences)
    q4, k4, v4, c = _varlen_setup(q, k, v, alibi_slopes, spec, (out4,))
    _launch_forward(q4, k4, v4, out4, lse, c, n_sequences, c["Nq"], _wrap or _identity)
    return out, lse


def varlen_backward(q, k, v, out, d_out, lse, alibi_slopes, spec, _wrap=None):
    """(dq, dk, dv) of varlen_forward, shaped like q, k and v (zero outside every sequence)."""
    dq, dk, dv = (torch.zeros_like(x) for x in (q, k, v))
    n_sequences = len(spec.cu_q) - 1
    if n_sequences == 0 or q.shape[1] == 0 or k.shape[1] == 0:
        return dq, dk, dv
    extra = tuple(_batched(x, n_sequences) for x in (out, d_out, dq, dk, dv))
    q4, k4, v4, c = _varlen_setup(q, k, v, alibi_slopes, spec, extra)
    _launch_backward(q4, k4, v4, extra[0], extra[1], lse, None, *extra[2:], c, spec.scale, n_sequences,
                     _wrap or _identity)
    return dq, dk, dv
