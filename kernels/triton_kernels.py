"""The Triton device code of the flash attention kernels: forward, the backward's dK/dV and dQ passes.

kernels/triton_attention.py holds the tile configurations, the launchers and
the entry points (flash_forward, flash_backward, varlen_forward,
varlen_backward); what each version changed: docs/kernel-log.md.
"""

from __future__ import annotations

import triton
import triton.language as tl

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
                # finfo(float32).min times log2(e) is -inf: finite entries below -2^100 are raised to
                # it (still hidden beside any visible key), so a row of only such entries averages
                # its keys, as the reference does, instead of counting as a row with no key
                mvf = mv.to(tl.float32)
                mvf = tl.where((mvf < -1.2676506002282294e30) & (mvf > float("-inf")), -1.2676506002282294e30, mvf)
                s = s + mvf * 1.4426950408889634
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
def _dropout_factor(qi, kj, b, h, seed, threshold, keep_scale):
    """keep_scale where attnkit.reference.dropout's mask keeps weight (b, h, qi, kj), else 0.

    qi, kj: query / key indices broadcastable to each other (any orientation), relative
    to the sequence; b the batch entry or packed sequence, h the query head. One
    tl.philox call per key here picks its 16-bit draw of the call that covers eight keys.
    """
    zero = (qi + kj) * 0
    group = (kj // 8 + zero).to(tl.uint32)
    row = (qi + zero).to(tl.uint32)
    head = (h + zero).to(tl.uint32)
    sequence = (b + zero).to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, group, row, head, sequence)
    word = (kj % 8) // 2 + zero
    draw = tl.where(word == 0, w0, tl.where(word == 1, w1, tl.where(word == 2, w2, w3)))
    half = ((kj % 2) * 16 + zero).to(tl.uint32)
    draw = (draw >> half) & 0xFFFF  # low half first
    return tl.where(draw.to(tl.int32) >= threshold, keep_scale, 0.0)


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
def _in_range(idx, n, GEOM: tl.constexpr):
    """Which of idx exist (idx < n); all of them in a full block (no GEOM test)."""
    if GEOM:
        return idx < n
    return idx >= 0


@triton.jit
def _rows_at(BASE, idx, s_row, offs, s_col):
    """Pointers to the (len(idx), len(offs)) tile of rows idx and features offs."""
    return BASE + idx[:, None] * s_row + offs[None, :] * s_col


@triton.jit
def _rows_mask(ok, offs, WIDTH: tl.constexpr):
    """Which elements of such a tile exist: its row exists (ok) and its feature is < WIDTH."""
    return ok[:, None] & (offs[None, :] < WIDTH)


@triton.jit
def _load_rows(BASE, idx, s_row, offs, s_col, ok, WIDTH: tl.constexpr):
    """(len(idx), len(offs)) tile: rows idx, features offs < WIDTH; 0 elsewhere."""
    return tl.load(_rows_at(BASE, idx, s_row, offs, s_col), mask=_rows_mask(ok, offs, WIDTH), other=0.0)


@triton.jit
def _load_columns(BASE, idx, s_row, offs, s_col, ok, WIDTH: tl.constexpr):
    """The transposed tile (len(offs), len(idx)): features offs < WIDTH down, rows idx across."""
    return tl.load(BASE + offs[:, None] * s_col + idx[None, :] * s_row,
                   mask=(offs[:, None] < WIDTH) & ok[None, :], other=0.0)


@triton.jit
def _fwd_block(acc, m_i, l_i, q, K_base, V_base, M_base, n0, rows, offs_n, offs_d, offs_dv,
               s_kn, s_kd, s_vn, s_vd, s_mq, s_mk, Nq, Nk, qk_scale, cap_log2, off, win_l, win_r,
               apply_mask, slope2, b, h, seed, threshold, keep_scale, HEAD_DIM: tl.constexpr,
               HEAD_DIM_V: tl.constexpr, MASK_KIND: tl.constexpr, GEOM: tl.constexpr, HAS_LEFT: tl.constexpr,
               HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DOT_PREC: tl.constexpr,
               DROPOUT: tl.constexpr):
    """One key block of the online softmax: acc (BM, BDV), m_i / l_i (BM,). Dropout scales the
    weights after they joined the running sum (lse stays the undropped one)."""
    cols = n0 + offs_n  # (BN,)
    col_ok = _in_range(cols, Nk, GEOM)
    kT = _load_columns(K_base, cols, s_kn, offs_d, s_kd, col_ok, HEAD_DIM)  # (BD, BN)
    qk = tl.dot(q, kT, input_precision=DOT_PREC)  # (BM, BN) fp32
    s, _t = _scores(qk, rows[:, None], cols[None, :], M_base, s_mq, s_mk, Nq, Nk, qk_scale,
                    cap_log2, off, win_l, win_r, apply_mask, slope2, MASK_KIND, GEOM, HAS_LEFT, HAS_RIGHT,
                    SOFTCAP, ALIBI)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked so far: shift by 0
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])  # (BM, BN)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        p = p * _dropout_factor(rows[:, None], cols[None, :], b, h, seed, threshold, keep_scale)
    v = _load_rows(V_base, cols, s_vn, offs_dv, s_vd, col_ok, HEAD_DIM_V)  # (BN, BDV)
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
def _query_block(CU_Q, CU_K, ALIBI_SLOPES, alibi_sb, alibi_sh, Hq, GROUP, Nq, Nk, off, align_br,
                 BLOCK_M: tl.constexpr, VARLEN: tl.constexpr, ALIBI: tl.constexpr):
    """(b, h, hk, m0, q0, k0, Nq, Nk, off, slope2) of a program over (query block, b * Hq + h):
    the heaviest (last, under causal) query blocks start first; hk is the kv head query head h
    reads (GQA); then _sequence's and _slope's. The caller returns when m0 >= Nq (a shorter sequence)."""
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    q0, k0, Nq, Nk, off = _sequence(CU_Q, CU_K, b, Nq, Nk, off, align_br, VARLEN)
    slope2 = _slope(ALIBI_SLOPES, b, h, alibi_sb, alibi_sh, ALIBI)
    return b, h, h // GROUP, start_m * BLOCK_M, q0, k0, Nq, Nk, off, slope2


@triton.jit
def _offsets(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
             INDEX_64: tl.constexpr):
    """Row, key, feature and value-feature offsets of a tile (rows and keys 64-bit when INDEX_64)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    if INDEX_64:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
    return offs_m, offs_n, tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, M, S, CU_Q, CU_K, ALIBI_SLOPES, SINK_LOGITS,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_on, s_od,
    s_mb, s_mh, s_mq, s_mk,
    s_sb, s_sh, s_sq, s_sk, Tq, Tk, lse_sb, lse_sh, alibi_sb, alibi_sh, align_br,
    Hq, Nq, Nk, GROUP, qk_scale, cap_log2, off, win_l, win_r, Nq_b, Nk_b, seed, threshold, keep_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, INDEX_64: tl.constexpr, DOT_PREC: tl.constexpr,
    VARLEN: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr, SINKS: tl.constexpr,
):
    """Forward of one query block: grid (cdiv(Nq, BLOCK_M), B * Hq), Nq the longest sequence when VARLEN."""
    # float32 arithmetic whatever type the launcher gave the float arguments: torch.compile's
    # Inductor passes Python floats as fp64, which made the accumulator fp64 (a compile error in tl.dot)
    qk_scale, cap_log2, keep_scale = tl.cast(qk_scale, tl.float32), tl.cast(cap_log2, tl.float32), tl.cast(
        keep_scale, tl.float32)
    b, h, hk, m0, q0, k0, Nq, Nk, off, slope2 = _query_block(
        CU_Q, CU_K, ALIBI_SLOPES, alibi_sb, alibi_sh, Hq, GROUP, Nq, Nk, off, align_br, BLOCK_M, VARLEN, ALIBI)
    if m0 >= Nq:  # a shorter sequence of a varlen call: nothing here
        return
    offs_m, offs_n, offs_d, offs_dv = _offsets(BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, INDEX_64)
    rows = m0 + offs_m  # (BM,)

    K_base = K + b * s_kb + hk * s_kh + k0 * s_kn
    V_base = V + b * s_vb + hk * s_vh + k0 * s_vn
    M_base = M + b * s_mb + h * s_mh
    S_base = S + b * s_sb + h * s_sh
    row_ok = rows < Nq
    q = _load_rows(Q + b * s_qb + h * s_qh + q0 * s_qn, rows, s_qn, offs_d, s_qd, row_ok, HEAD_DIM)  # (BM, BD)

    if SINKS:  # a learned sink is one more score with no value: it starts the running max and sum
        m_i = tl.full([BLOCK_M], 0.0, tl.float32) + tl.load(SINK_LOGITS + h).to(tl.float32) * 1.4426950408889634
        l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    else:
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
                                           qk_scale, cap_log2, off, win_l, win_r, changes, slope2, b, h, seed,
                                           threshold, keep_scale, HEAD_DIM, HEAD_DIM_V, MASK_KIND, part != 1,
                                           HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, DOT_PREC, DROPOUT)

    empty = l_i == 0.0  # no visible key: out 0, lse -inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    tl.store(_rows_at(O + b * s_ob + h * s_oh + q0 * s_on, rows, s_on, offs_dv, s_od),
             out.to(O.dtype.element_ty), mask=_rows_mask(row_ok, offs_dv, HEAD_DIM_V))
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
                off, win_l, win_r, apply_mask, slope2, b, h, seed, threshold, keep_scale,
                HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, MASK_KIND: tl.constexpr, GEOM: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                DOT_PREC: tl.constexpr, DROPOUT: tl.constexpr):
    """One query block's contribution to dk (BN, BD) and dv (BN, BDV), transposed scores. Dropout's
    factors Z (regenerated): dv from P Z, and dS = P (Z dP - delta)."""
    rows = m0 + offs_m  # (BM,)
    row_ok = _in_range(rows, Nq, GEOM)
    qT = _load_columns(Q_base, rows, s_qn, offs_d, s_qd, row_ok, HEAD_DIM)  # (BD, BM)
    do = _load_rows(DO_base, rows, s_dn, offs_dv, s_dd, row_ok, HEAD_DIM_V)  # (BM, BDV)
    lse = tl.load(LSE_row + rows, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)  # (BM,)
    delta = tl.load(DELTA_row + rows, mask=row_ok, other=0.0)  # (BM,)
    qkT = tl.dot(k, qT, input_precision=DOT_PREC)  # (BN, BM)
    sT, tT = _scores(qkT, rows[None, :], cols[:, None], M_base, s_mq, s_mk, Nq, Nk, qk_scale,
                     cap_log2, off, win_l, win_r, apply_mask, slope2, MASK_KIND, GEOM, HAS_LEFT, HAS_RIGHT,
                     SOFTCAP, ALIBI)
    pT = tl.exp2(sT - lse2[None, :])  # (BN, BM) probabilities, 0 where invisible
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # (BN, BM)
    if DROPOUT:
        zT = _dropout_factor(rows[None, :], cols[:, None], b, h, seed, threshold, keep_scale)
        dv = tl.dot((pT * zT).to(do.dtype), do, dv, input_precision=DOT_PREC)
        dpT = dpT * zT
    else:
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
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
    Hq, Hkv, Nq, Nk, GROUP, qk_scale, cap_log2, scale, off, win_l, win_r, Nq_b, Nk_b, seed, threshold, keep_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, INDEX_64: tl.constexpr, DOT_PREC: tl.constexpr,
    VARLEN: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
):
    # grid: (cdiv(Nk, BLOCK_N), B * Hkv); each program owns one key block of one kv head
    qk_scale, cap_log2, scale = tl.cast(qk_scale, tl.float32), tl.cast(cap_log2, tl.float32), tl.cast(scale, tl.float32)
    keep_scale = tl.cast(keep_scale, tl.float32)  # float32 under torch.compile too (see _fwd_kernel)
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    hk = (bh % Hkv).to(tl.int64)
    n0 = tl.program_id(0) * BLOCK_N
    q0, k0, Nq, Nk, off = _sequence(CU_Q, CU_K, b, Nq, Nk, off, align_br, VARLEN)
    if n0 >= Nk:  # a shorter sequence of a varlen call: its keys end before this block
        return
    offs_m, offs_n, offs_d, offs_dv = _offsets(BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, INDEX_64)
    cols = n0 + offs_n  # (BN,)
    k = _load_rows(K + b * s_kb + hk * s_kh + k0 * s_kn, cols, s_kn, offs_d, s_kd, cols < Nk, HEAD_DIM)  # (BN, BD)
    v = _load_rows(
        V + b * s_vb + hk * s_vh + k0 * s_vn, cols, s_vn, offs_dv, s_vd, cols < Nk, HEAD_DIM_V)  # (BN, BDV)
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
                                         b, h, seed, threshold, keep_scale, HEAD_DIM, HEAD_DIM_V, MASK_KIND,
                                         part != 1, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, DOT_PREC, DROPOUT)
    dk = dk * scale  # d(score)/d(q.k) = scale (times 1 - tanh^2 under softcap, applied above)
    tl.store(_rows_at(DK + b * s_dkb + hk * s_dkh + k0 * s_dkn, cols, s_dkn, offs_d, s_dkd),
             dk.to(DK.dtype.element_ty), mask=_rows_mask(cols < Nk, offs_d, HEAD_DIM))
    tl.store(_rows_at(DV + b * s_dvb + hk * s_dvh + k0 * s_dvn, cols, s_dvn, offs_dv, s_dvd),
             dv.to(DV.dtype.element_ty), mask=_rows_mask(cols < Nk, offs_dv, HEAD_DIM_V))


@triton.jit
def _dq_block(dq, q, do, lse2, delta, K_base, V_base, M_base, n0, rows, offs_n, offs_d, offs_dv,
              s_kn, s_kd, s_vn, s_vd, s_mq, s_mk, Nq, Nk, qk_scale, cap_log2, off, win_l, win_r,
              apply_mask, slope2, b, h, seed, threshold, keep_scale, HEAD_DIM: tl.constexpr,
              HEAD_DIM_V: tl.constexpr, MASK_KIND: tl.constexpr, GEOM: tl.constexpr, HAS_LEFT: tl.constexpr,
              HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DOT_PREC: tl.constexpr,
              DROPOUT: tl.constexpr):
    """One key block's contribution to dq (BM, BD) (dropout's factors regenerated, as in _dkdv_block)."""
    cols = n0 + offs_n
    col_ok = _in_range(cols, Nk, GEOM)
    kT = _load_columns(K_base, cols, s_kn, offs_d, s_kd, col_ok, HEAD_DIM)  # (BD, BN)
    vT = _load_columns(V_base, cols, s_vn, offs_dv, s_vd, col_ok, HEAD_DIM_V)  # (BDV, BN)
    qk = tl.dot(q, kT, input_precision=DOT_PREC)  # (BM, BN)
    s, t = _scores(qk, rows[:, None], cols[None, :], M_base, s_mq, s_mk, Nq, Nk, qk_scale,
                   cap_log2, off, win_l, win_r, apply_mask, slope2, MASK_KIND, GEOM, HAS_LEFT, HAS_RIGHT,
                   SOFTCAP, ALIBI)
    p = tl.exp2(s - lse2[:, None])
    dp = tl.dot(do, vT, input_precision=DOT_PREC)  # (BM, BN)
    if DROPOUT:
        dp = dp * _dropout_factor(rows[:, None], cols[None, :], b, h, seed, threshold, keep_scale)
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
    Hq, Nq, Nk, GROUP, qk_scale, cap_log2, scale, off, win_l, win_r, Nq_b, Nk_b, seed, threshold, keep_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, INDEX_64: tl.constexpr, DOT_PREC: tl.constexpr,
    VARLEN: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
):
    """dQ of one query block: grid (cdiv(Nq, BLOCK_M), B * Hq), the forward's key walk."""
    qk_scale, cap_log2, scale = tl.cast(qk_scale, tl.float32), tl.cast(cap_log2, tl.float32), tl.cast(scale, tl.float32)
    keep_scale = tl.cast(keep_scale, tl.float32)  # float32 under torch.compile too (see _fwd_kernel)
    b, h, hk, m0, q0, k0, Nq, Nk, off, slope2 = _query_block(
        CU_Q, CU_K, ALIBI_SLOPES, alibi_sb, alibi_sh, Hq, GROUP, Nq, Nk, off, align_br, BLOCK_M, VARLEN, ALIBI)
    if m0 >= Nq:  # a shorter sequence of a varlen call: nothing here
        return
    offs_m, offs_n, offs_d, offs_dv = _offsets(BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, INDEX_64)
    rows = m0 + offs_m  # (BM,)
    row_ok = rows < Nq
    q = _load_rows(Q + b * s_qb + h * s_qh + q0 * s_qn, rows, s_qn, offs_d, s_qd, row_ok, HEAD_DIM)  # (BM, BD)
    do = _load_rows(DO + b * s_db + h * s_dh + q0 * s_dn, rows, s_dn, offs_dv, s_dd, row_ok, HEAD_DIM_V)  # (BM, BDV)
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
                               off, win_l, win_r, changes, slope2, b, h, seed, threshold, keep_scale, HEAD_DIM,
                               HEAD_DIM_V, MASK_KIND, part != 1, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, DOT_PREC,
                               DROPOUT)
    dq = dq * scale
    tl.store(_rows_at(DQ + b * s_dqb + h * s_dqh + q0 * s_dqn, rows, s_dqn, offs_d, s_dqd),
             dq.to(DQ.dtype.element_ty), mask=_rows_mask(row_ok, offs_d, HEAD_DIM))
