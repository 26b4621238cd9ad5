"""Flash attention for NVIDIA GPUs in Triton: fused forward and backward (FlashAttention-2).

The device code (the @triton.jit functions) is in kernels/triton_kernels.py;
what each version changed and what its checks showed: docs/kernel-log.md.
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

import os

import numpy as np
import torch
import triton

from ..reference.attention import dense_alignment, visible_range
from ..reference.dropout import keep_scale, threshold
from .triton_kernels import (
    SUMMARY_TILE, _bwd_dkdv_kernel, _bwd_dq_kernel, _bwd_preprocess, _fwd_kernel,
)

__all__ = [
    "flash_forward",
    "flash_backward",
    "why_unsupported",
    "interpreting",
    "INTERPRETER_BLOCKS",
    "production_configs",
    "mask_operand",
    "mask_summary",
    "varlen_forward",
    "varlen_backward",
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
            # (128, 128, 8, 3): 478 against 443 TFLOP/s for 2 stages, bf16 N8192 on an H200 (gpu.md)
            128: [(128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 3)],
            256: [(128, 32, 8, 2), (64, 32, 8, 2)]},
    },
    "dkdv": {
        8: {64: [(32, 64, 4, 3), (32, 64, 8, 3)],
            128: [(32, 64, 8, 3), (16, 64, 4, 3)],
            256: [(16, 32, 4, 1), (32, 64, 8, 1)]},
        9: {64: [(64, 128, 8, 3), (32, 128, 8, 3)],
            # 64 x 128 spills (376 B of stack) yet ran forward+backward 12% faster on an H200 (gpu.md)
            128: [(32, 128, 8, 2), (32, 64, 8, 3), (64, 128, 8, 2)],
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
    if os.environ.get("ATTNKIT_TRITON_AUTOTUNE", "1") == "0":  # the first configuration only: quick first calls
        configs = configs[:1]
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


def _geometry(causal, window, nq, nk, align=None):
    """(off, win_l, win_r, HAS_LEFT, HAS_RIGHT): reference.visible_range's rule, causal folded into the
    right edge; query i sees key j iff i + off - win_l <= j <= i + off + win_r (sides given). align
    (where queries sit among the keys) defaults to causal's."""
    hides, default_align = dense_alignment(causal)
    align = align or default_align
    lo, hi, off = visible_range(nq, nk, causal=hides, align=align, window=window)
    limit = nq + nk + 1  # beyond this a window edge changes nothing; keeps int32 safe
    win_l = 0 if lo is None else max(-limit, min(int(off - lo), limit))
    win_r = 0 if hi is None else max(-limit, min(int(hi - off), limit))
    return int(off), win_l, win_r, lo is not None, hi is not None


def mask_operand(mask, shape, dummy):
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


def mask_summary(mask, shape, dummy):
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


def _common(q, k, v, mask, scale, causal, window, softcap, align=None, extra=()):
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    off, win_l, win_r, has_left, has_right = _geometry(causal, window, Nq, Nk, align)
    m, m_strides, mask_kind = mask_operand(mask, (B, Hq, Nq, Nk), q)
    summary, s_strides = mask_summary(mask, (B, Hq, Nq, Nk), q)
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
        align_br=int((align or dense_alignment(causal)[1]) == "bottom_right"),
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
        VARLEN=c["varlen"] is not None, ALIBI=c["alibi"] is not None, DROPOUT=c["dropout"] is not None,
    )


def _dropout(dropout_p, dropout_seed):
    """The kernels' (seed, threshold, keep scale) for attnkit.reference.dropout's mask, or None."""
    if not dropout_p:
        return None
    return int(dropout_seed), threshold(dropout_p), keep_scale(dropout_p)


def _dropout_scalars(c):
    return c["dropout"] or (0, 0, 1.0)


def _sequences(c, q, lse):
    """The kernels' arguments on sequences and ALiBi:
    (CU_Q, CU_K, ALIBI_SLOPES), (lse_sb, lse_sh, alibi_sb, alibi_sh, align_br)."""
    alibi = c["alibi"]
    alibi_strides = (0, 0) if alibi is None else (alibi.stride(0) if alibi.shape[0] > 1 else 0, alibi.stride(1))
    alibi = q if alibi is None else alibi
    if c["varlen"] is None:
        return (q, q, alibi), (lse.stride(0), lse.stride(1), *alibi_strides, c["align_br"])
    cu_q, cu_k = c["varlen"]
    return (cu_q, cu_k, alibi), (0, lse.stride(0), *alibi_strides, c["align_br"])


def _slopes(alibi, hq, device):
    """ALiBi slopes (Hq,) or (S, Hq) as the kernels' (S or 1, Hq) float32, or None."""
    return None if alibi is None else alibi.to(device=device, dtype=torch.float32).reshape(-1, hq)


def flash_forward(q, k, v, mask=None, *, scale, causal=None, window=None, softcap=None, align=None,
                  alibi=None, dropout_p=0.0, dropout_seed=None, sinks=None, _wrap=None, _force_int64=False):
    """Attention forward: returns (out (B, Hq, Nq, Dv) in q's dtype, lse (B, Hq, Nq) float32).

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv), any strides, one
    dtype; mask None, bool (True = attend) or additive float, broadcastable to
    (B, Hq, Nq, Nk); causal None / "top_left" / "bottom_right"; window None or
    (left, right) with None sides unlimited; softcap None or > 0; align where
    the queries sit for the window and ALiBi (default: causal's alignment);
    alibi (Hq,) or (B, Hq) slopes add -slope * |i + off - j| to the scores.
    dropout_p > 0 drops weights by attnkit.reference.dropout's mask for
    dropout_seed (an int in [0, 2**63)), the kept ones scaled by 1 / (1 - p).
    sinks: None or (Hq,) learned logits joining every row's softmax with no value
    (lse includes them; a row that sees no key gives 0 and lse = its sink).
    `_wrap` wraps each kernel before launch (torch.library.wrap_triton).
    """
    wrap = _wrap or _identity
    B, Hq, Nq, _ = q.shape
    Dv = v.shape[3]
    out = _empty_like_layout(q, (B, Hq, Nq, Dv))
    lse = torch.empty((B, Hq, Nq), dtype=torch.float32, device=q.device)
    if B * Hq * Nq == 0:
        return out, lse
    if k.shape[2] == 0:  # no keys: every row fully masked, all its weight on a sink if there is one
        out.zero_()
        lse.fill_(float("-inf"))
        if sinks is not None:
            lse.copy_(sinks.to(lse)[None, :, None].expand_as(lse))
        return out, lse
    c = _common(q, k, v, mask, scale, causal, window, softcap, align, extra=(out,))
    c.update(index_64=c["index_64"] or _force_int64, varlen=None, alibi=_slopes(alibi, Hq, q.device),
             dropout=_dropout(dropout_p, dropout_seed))
    _launch_forward(q, k, v, out, lse, c, B, Nq, wrap, sinks)
    return out, lse


def _launch_forward(q, k, v, out, lse, c, n_sequences, longest_q, wrap, sinks=None):
    launch, blocks = _launcher("fwd", _fwd_kernel, c, q.dtype, q.device, wrap)
    sink_logits = q if sinks is None else sinks.to(device=q.device, dtype=torch.float32).contiguous()
    pointers, scalars = _sequences(c, q, lse)

    def grid(meta):
        return (triton.cdiv(longest_q, meta["BLOCK_M"]), n_sequences * c["Hq"])

    launch[grid](
        q, k, v, out, lse, c["mask"], c["summary"], *pointers, sink_logits,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), *c["m_strides"], *c["s_strides"], *scalars,
        c["Hq"], c["Nq"], c["Nk"], c["group"], c["qk_scale"], c["cap_log2"], c["off"], c["win_l"],
        c["win_r"], _next_pow2(c["Nq"]), _next_pow2(c["Nk"]), *_dropout_scalars(c), **_constexprs(c), **blocks,
        SINKS=sinks is not None,
    )


def flash_backward(q, k, v, mask, out, d_out, lse, *, scale, causal=None, window=None,
                   softcap=None, align=None, alibi=None, d_lse=None, dropout_p=0.0, dropout_seed=None, _wrap=None,
                   _force_int64=False):
    """Attention backward: returns (dq, dk, dv) with the shapes and dtypes of q, k, v.

    Options as for flash_forward; out, d_out (B, Hq, Nq, Dv) and lse (B, Hq, Nq) come from it;
    d_lse (B, Hq, Nq), optional, is the gradient reaching lse itself. The same dropout_seed
    regenerates the forward's dropout mask.
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
    c = _common(q, k, v, mask, scale, causal, window, softcap, align, extra=(out, d_out, dq, dk, dv))
    c.update(index_64=c["index_64"] or _force_int64, varlen=None, alibi=_slopes(alibi, Hq, q.device),
             dropout=_dropout(dropout_p, dropout_seed))
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
    buckets = (_next_pow2(Nq), _next_pow2(Nk), *_dropout_scalars(c))  # Nq_b, Nk_b (autotuning keys), dropout

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


def _varlen_setup(q, k, v, cu_q, cu_k, options, extra):
    """(q, k, v as (S, H, total, D) views with batch stride 0, the launch dict c)."""
    q4, k4, v4 = (_batched(x, len(cu_q) - 1) for x in (q, k, v))
    longest_q = max(1, int(np.diff(cu_q).max(initial=0)))
    longest_k = max(1, int(np.diff(cu_k).max(initial=0)))
    # _geometry's offset is per call; the kernels recompute it per sequence from cu_seqlens.
    c = _common(q4[..., :longest_q, :], k4[..., :longest_k, :], v4[..., :longest_k, :], None, options["scale"],
                options["causal"], options["window"], options["softcap"], options["align"], extra=(q4, k4, v4) + extra)
    cu = [torch.as_tensor(x, dtype=torch.int32).to(q.device) for x in (cu_q, cu_k)]
    c.update(varlen=(cu[0], cu[1]), alibi=_slopes(options["alibi"], q.shape[0], q.device), off=0,
             dropout=_dropout(options["dropout_p"], options["dropout_seed"]))
    return q4, k4, v4, c


def varlen_forward(q, k, v, cu_q, cu_k, *, scale, causal=None, align="bottom_right", window=None, softcap=None,
                   alibi=None, dropout_p=0.0, dropout_seed=None, sinks=None, _wrap=None):  # fmt: skip
    """(out (Hq, total_q, Dv), lse (Hq, total_q) float32) for packed sequences.

    q (Hq, total_q, D), k (Hkv, total_k, D), v (Hkv, total_k, Dv) CUDA tensors
    (any strides); cu_q, cu_k (S + 1,) host offsets; options as for
    flash_forward, each sequence aligned by `align`. One launch for all
    sequences: program (query block, sequence x head) reads its sequence's
    offsets from cu_seqlens and stops when the sequence is shorter.
    """
    hq, dv = q.shape[0], v.shape[2]
    out = torch.zeros((hq, q.shape[1], dv), dtype=q.dtype, device=q.device)  # rows of no sequence: 0
    lse = torch.full((hq, q.shape[1]), float("-inf"), dtype=torch.float32, device=q.device)
    n_sequences = len(cu_q) - 1
    if n_sequences == 0 or q.shape[1] == 0 or hq == 0:
        return out, lse
    out4 = _batched(out, n_sequences)
    options = dict(scale=scale, causal=causal, align=align, window=window, softcap=softcap, alibi=alibi,
                   dropout_p=dropout_p, dropout_seed=dropout_seed)
    q4, k4, v4, c = _varlen_setup(q, k, v, cu_q, cu_k, options, (out4,))
    _launch_forward(q4, k4, v4, out4, lse, c, n_sequences, c["Nq"], _wrap or _identity, sinks)
    return out, lse


def varlen_backward(q, k, v, out, d_out, lse, cu_q, cu_k, *, scale, causal=None, align="bottom_right", window=None,
                    softcap=None, alibi=None, dropout_p=0.0, dropout_seed=None, _wrap=None):  # fmt: skip
    """(dq, dk, dv) of varlen_forward, shaped like q, k and v (zero outside every sequence)."""
    dq, dk, dv = (torch.zeros_like(x) for x in (q, k, v))
    n_sequences = len(cu_q) - 1
    if n_sequences == 0 or q.shape[1] == 0 or k.shape[1] == 0:
        return dq, dk, dv
    extra = tuple(_batched(x, n_sequences) for x in (out, d_out, dq, dk, dv))
    options = dict(scale=scale, causal=causal, align=align, window=window, softcap=softcap, alibi=alibi,
                   dropout_p=dropout_p, dropout_seed=dropout_seed)
    q4, k4, v4, c = _varlen_setup(q, k, v, cu_q, cu_k, options, extra)
    _launch_backward(q4, k4, v4, extra[0], extra[1], lse, None, *extra[2:], c, scale, n_sequences,
                     _wrap or _identity)
    return dq, dk, dv
