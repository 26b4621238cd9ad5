"""flash-attn 2.x's functions, on every device: a thin layer over attnkit.attention and varlen_attention.

    from attnkit.flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

Same names, signatures and semantics as flash_attn.flash_attn_interface (2.x),
for torch tensors on the CPU (the Numba kernel) and on CUDA (the Triton
kernel). Layouts are flash-attn's: (B, N, H, D) and packed (total, H, D) with
int32 cu_seqlens of shape (B + 1,). Causal, the window and ALiBi are aligned
bottom-right (query i of a sequence sits at key position i + Nk - Nq), also
when not causal. flash_attn_func (and its packed forms) runs attention() on
(B, H, N, D) views; the varlen functions and the KV cache run
varlen_attention(), so sequences of a batch never pay for each other's length.

Dropout runs in the kernels (attnkit.reference.dropout's Philox mask, a fresh
seed from torch's default generator per call, so torch.manual_seed repeats a
run). With dropout_p > 0, return_attn_probs returns S_dmask as flash-attn
documents it: the softmax with dropped entries negated, (B, Hq, max Nq, max
Nk); here exactly the normalised weights (flash-attn's may be scaled per
block, for convert_flash_attn_S_to_softmax to undo), unpadded to multiples of
128, computed by the NumPy reference (slow: for tests). Without dropout it is
None, as in flash-attn.

Differences, all stated:
`deterministic` is accepted and always true (attnkit's backward has no
atomics); `num_splits` (up to 128, as in flash-attn) is accepted and ignored
(the CPU kernel chooses its own split); any page size >= 1 works (flash-attn 2
wants multiples of 256).

Refusals: flash-attn's C++ checks raise RuntimeError, so code written for it
catches RuntimeError. Every refusal here is a FlashAttnValueError or
FlashAttnTypeError: a ValueError / TypeError naming the argument (attnkit's
contract) that is a RuntimeError as well.
"""

from __future__ import annotations

import functools
import numbers
import operator

import numpy as np

from . import _arrays, kv_cache
from .api import _traced, attention
from .dropout import draw_dropout
from .reference.dropout import keep_mask
from .validation import dropout_probability, host_offsets
from .varlen import varlen_attention

__all__ = [
    "BACKEND",
    "FlashAttnTypeError",
    "FlashAttnValueError",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]


# Which attnkit backend these functions run on (attnkit.varlen_attention's `backend`):
# "auto" (Numba on the CPU, Triton on CUDA), or "reference" to check code against
# the NumPy specification, or "triton" to run the GPU kernel under TRITON_INTERPRET=1.
BACKEND = "auto"


class FlashAttnValueError(ValueError, RuntimeError):
    """A refused value: attnkit's ValueError, and the RuntimeError flash-attn raises for it."""


class FlashAttnTypeError(TypeError, RuntimeError):
    """A refused type: attnkit's TypeError, and the RuntimeError flash-attn raises for it."""


def _flash_attn_errors(function):
    """Re-raise the ValueError / TypeError of a refused call as the classes above (message unchanged)."""

    @functools.wraps(function)
    def translated(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except (FlashAttnValueError, FlashAttnTypeError):
            raise
        except ValueError as error:
            raise FlashAttnValueError(*error.args) from error
        except TypeError as error:
            raise FlashAttnTypeError(*error.args) from error

    return translated


def _torch():
    import torch

    return torch


def _tensor(name, x, ndim):
    torch = _torch()
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {_arrays.type_name(x)}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} axes; got shape {tuple(x.shape)}")
    return x


def _unpacked(name, x, axis, count, layout):
    """The tensors packed along `axis` of x (qkv or kv), after checking x's layout."""
    _tensor(name, x, layout.count(",") + 1)
    if x.shape[axis] != count:
        raise ValueError(f"{name} must be {layout}; got shape {tuple(x.shape)}")
    return x.unbind(axis)


def _same_device(**tensors):
    devices = {name: str(x.device) for name, x in tensors.items() if x is not None}
    if len(set(devices.values())) > 1:
        raise ValueError("tensors must be on one device; got " + ", ".join(f"{n} on {d}" for n, d in devices.items()))


def _window_entry(s):
    """One window_size entry as an int: a Python int, or an integer scalar / 0-d tensor (flash-attn's
    tests pass torch.randint(0, seqlen_k, (2,))), never a bool or a float."""
    if isinstance(s, (bool, np.bool_)):
        raise TypeError("bool")
    torch = _torch()
    if isinstance(s, torch.Tensor) and (s.dtype == torch.bool or s.is_floating_point() or s.is_complex()):
        raise TypeError(str(s.dtype))
    return operator.index(s)


def _window(window_size):
    """flash-attn's (left, right) with -1 = unlimited -> attnkit's window (None = unlimited).

    Any two-element sequence of integers: a tuple, a list, a 1-D integer tensor or array."""
    try:
        if isinstance(window_size, (str, bytes)) or len(window_size) != 2:
            raise TypeError("not a pair")
        entries = [_window_entry(s) for s in window_size]
    except TypeError:
        raise TypeError(f"window_size must be a (left, right) pair of ints, -1 for unlimited; "
                        f"got {window_size!r}") from None  # fmt: skip
    if any(s < -1 for s in entries):
        raise ValueError(f"window_size entries must be >= 0, or -1 for unlimited; got {tuple(entries)}")
    left, right = (None if s < 0 else s for s in entries)
    return None if left is None and right is None else (left, right)


def _options(softmax_scale, causal, window_size, softcap, deterministic):
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool; got {causal!r}")
    if not isinstance(deterministic, (bool, np.bool_)):
        raise TypeError(f"deterministic must be a bool; got {deterministic!r}")
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or softcap < 0:
        raise ValueError(f"softcap must be a float >= 0 (0.0 = off); got {softcap!r}")
    return dict(
        scale=softmax_scale, causal=bool(causal), window=_window(window_size),
        softcap=float(softcap) if softcap > 0 else None,
    )  # fmt: skip


def _dense(options):
    """_options for attention(): flash-attn aligns bottom-right, causal or not."""
    causal = "bottom_right" if options["causal"] else False
    return dict(options, causal=causal, align="bottom_right")


def _heads(q, k, v, names=("q", "k", "v")):
    hq, hkv = q.shape[-2], k.shape[-2]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"{names[0]} has {hq} heads and {names[1]} has {hkv}; the query heads must be a "
                         f"multiple of the kv heads (GQA/MQA)")
    if v.shape[-2] != hkv:
        raise ValueError(f"{names[2]} has {v.shape[-2]} heads; expected {hkv}, as {names[1]}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{names[1]}'s head dim ({k.shape[-1]}) must equal {names[0]}'s ({q.shape[-1]})")


def _attn_probs(q, k, v, cu_q, cu_k, options, alibi_slopes, sinks, dropout):
    """flash-attn's S_dmask: (B, Hq, max Nq, max Nk) float32, each sequence's attention weights
    (before dropout) with the weights dropout dropped negated; zeros past a sequence's end.

    q (total_q, Hq, D), k / v (total_k, Hkv, D). The weights come from the NumPy
    reference (the fused kernels never form them); the sign pattern is the
    dropout mask the kernels drew for the same seed.
    """
    torch = _torch()
    lengths_q, lengths_k = np.diff(cu_q), np.diff(cu_k)
    hq = q.shape[1]
    probs = torch.zeros((len(lengths_q), hq, int(lengths_q.max(initial=0)), int(lengths_k.max(initial=0))))
    slopes = None if alibi_slopes is None else alibi_slopes.reshape(-1, hq)
    with torch.no_grad():
        for b in range(len(lengths_q)):
            rows, keys = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
            _, weights = attention(
                q[rows].transpose(0, 1), k[keys].transpose(0, 1), v[keys].transpose(0, 1), **_dense(options),
                alibi_slopes=None if slopes is None else slopes[min(b, slopes.shape[0] - 1)], sinks=sinks,
                return_weights=True, backend="reference",
            )  # (Hq, Nq_b, Nk_b)
            keep = keep_mask(dropout.seed, dropout.p, 1, hq, int(lengths_q[b]), int(lengths_k[b]), first_sequence=b)[0]
            sign = torch.from_numpy(np.where(keep, 1.0, -1.0).astype(np.float32))
            probs[b, :, : lengths_q[b], : lengths_k[b]] = weights.float().cpu() * sign
    return probs.to(q.device)


def _varlen(q, k, v, cu_q, cu_k, dropout_p, options, alibi_slopes, sinks, return_attn_probs):
    """q (total_q, Hq, D), k / v (total_k, Hkv, D) -> out (total_q, Hq, Dv), lse (Hq, total_q), S_dmask or None.

    Sequence b draws the dropout mask of a dense call's batch entry b.
    """
    dropout = _seed_for_probs(dropout_p, return_attn_probs)
    out, lse = varlen_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), cu_q, cu_k, **options, align="bottom_right",
        alibi_slopes=alibi_slopes, sinks=sinks, dropout_p=dropout_p, dropout_seed=dropout and dropout.seed,
        return_lse=True, backend=BACKEND,
    )  # fmt: skip
    probs = None
    if dropout is not None:  # as flash-attn: S_dmask only with dropout
        probs = _attn_probs(q, k, v, cu_q, cu_k, options, alibi_slopes, sinks, dropout)
    return out.transpose(0, 1), lse, probs


def _seed_for_probs(dropout_p, return_attn_probs):
    """The call's Dropout when S_dmask must show its mask (drawn here, from torch's generator, and
    handed to the kernel), else None: attention() then draws the seed itself, the same draw, which
    torch.compile keeps inside the graph (an int drawn here would be data-dependent there)."""
    return draw_dropout(dropout_p, None, "torch") if return_attn_probs else None


def _results(out, lse, probs, return_attn_probs):
    return (out, lse, probs) if return_attn_probs else out


def _uniform_offsets(batch, n):
    """cu_seqlens of `batch` sequences of n tokens each (int32, host: the offsets are read there)."""
    torch = _torch()
    return torch.arange(0, (batch + 1) * n, n, dtype=torch.int32)


@_flash_attn_errors
def flash_attn_func(
    q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, learnable_sink=None,
):  # fmt: skip
    """flash-attn's flash_attn_func.

    q (B, Nq, Hq, D), k (B, Nk, Hkv, D), v (B, Nk, Hkv, Dv); Hq a multiple of Hkv.
    alibi_slopes (Hq,) or (B, Hq), float32. learnable_sink (Hq,): a logit per head
    joining every row's softmax (FA4's name; attnkit's sinks). Returns out (B, Nq, Hq, Dv), or
    (out, softmax_lse (B, Hq, Nq) float32, None) with return_attn_probs.
    Runs as attnkit.attention on (B, H, N, D) views, bottom-right aligned.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        _tensor(name, x, 4)
    _same_device(q=q, k=k, v=v, alibi_slopes=alibi_slopes)
    _heads(q, k, v)
    batch, nq, hq, _ = q.shape
    if k.shape[0] != batch or v.shape[:2] != k.shape[:2]:
        raise ValueError(f"k and v must be (B, Nk, Hkv, D) with q's batch {batch}; got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    nk = k.shape[1]
    options = _options(softmax_scale, causal, window_size, softcap, deterministic)
    dropout_p = dropout_probability(dropout_p)
    dropout = _seed_for_probs(dropout_p, return_attn_probs)
    out, lse = attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **_dense(options), alibi_slopes=alibi_slopes,
        sinks=learnable_sink, dropout_p=dropout_p, dropout_seed=dropout and dropout.seed,
        return_lse=True, backend=BACKEND,
    )  # (B, Hq, Nq, Dv), (B, Hq, Nq)
    probs = None
    if dropout is not None:  # as flash-attn: S_dmask only with dropout
        probs = _attn_probs(
            q.reshape(batch * nq, hq, -1), k.reshape(batch * nk, k.shape[2], -1),
            v.reshape(batch * nk, v.shape[2], -1), np.arange(batch + 1) * nq, np.arange(batch + 1) * nk,
            options, alibi_slopes, learnable_sink, dropout,
        )  # fmt: skip
    return _results(out.transpose(1, 2), lse, probs, return_attn_probs)


@_flash_attn_errors
def flash_attn_qkvpacked_func(
    qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
    deterministic=False, return_attn_probs=False, *, learnable_sink=None,
):  # fmt: skip
    """flash_attn_func with qkv (B, N, 3, H, D) packed."""
    q, k, v = _unpacked("qkv", qkv, 2, 3, "(B, N, 3, H, D)")
    return flash_attn_func(
        q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
        return_attn_probs, learnable_sink=learnable_sink,
    )  # fmt: skip


@_flash_attn_errors
def flash_attn_kvpacked_func(
    q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
    deterministic=False, return_attn_probs=False, *, learnable_sink=None,
):  # fmt: skip
    """flash_attn_func with kv (B, Nk, 2, Hkv, D) packed."""
    k, v = _unpacked("kv", kv, 2, 2, "(B, Nk, 2, Hkv, D)")
    return flash_attn_func(
        q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
        return_attn_probs, learnable_sink=learnable_sink,
    )  # fmt: skip


def _max_seqlen(name, value, offsets):
    """value an int, at least the longest sequence of offsets (None: not read, under torch.compile)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {value!r}")
    if offsets is None:
        return
    longest = int(np.diff(offsets).max(initial=0))
    if value < longest:
        raise ValueError(f"{name} is {int(value)}, but a sequence in the batch has {longest} tokens")


@_flash_attn_errors
def flash_attn_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
    causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
    return_attn_probs=False, block_table=None, *, learnable_sink=None,
):  # fmt: skip
    """flash-attn's flash_attn_varlen_func: packed sequences of different lengths.

    q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv);
    cu_seqlens_q / cu_seqlens_k int32 (B + 1,), from 0 to total_q / total_k;
    max_seqlen_q / max_seqlen_k at least the longest sequence. With
    block_table (B, max_blocks) int32, k and v are a paged cache
    (num_blocks, page_block_size, Hkv, D) and sequence b's keys are its first
    cu_seqlens_k[b+1] - cu_seqlens_k[b] positions through its pages.
    Returns out (total_q, Hq, Dv), or (out, softmax_lse (Hq, total_q), None).
    """
    _tensor("q", q, 3)
    paged = block_table is not None
    _tensor("k", k, 4 if paged else 3)
    _tensor("v", v, 4 if paged else 3)
    _same_device(q=q, k=k, v=v, alibi_slopes=alibi_slopes, block_table=block_table)
    _heads(q, k, v)
    traced = _traced(q)  # the offsets are data there: checked by type and shape here, by value when run
    cu_q = host_offsets("cu_seqlens_q", cu_seqlens_q, q.shape[0], int32_only=True, read=not traced)
    if paged and traced:
        raise ValueError("flash_attn_varlen_func with a block_table is not traced by torch.compile (the pages are "
                         "gathered on the host); call it outside the compiled region")  # fmt: skip
    if traced and return_attn_probs and dropout_probability(dropout_p) > 0:
        raise ValueError("return_attn_probs with dropout needs the NumPy reference, which torch.compile cannot "
                         "trace; call flash_attn_varlen_func outside the compiled region for it")  # fmt: skip
    if paged:
        lengths = np.diff(np.asarray(_arrays.to_numpy(cu_seqlens_k), np.int64))
        cu_k = host_offsets("cu_seqlens_k", cu_seqlens_k, int(lengths.sum()), int32_only=True)
        pages = kv_cache.check_block_table(block_table, len(lengths), k.shape[0], lengths, k.shape[1])
        k, v = kv_cache.gather(k, v, pages, np.zeros_like(lengths), lengths)
    else:
        cu_k = host_offsets("cu_seqlens_k", cu_seqlens_k, k.shape[0], int32_only=True, read=not traced)
        if v.shape[0] != k.shape[0]:
            raise ValueError(f"v must have k's {k.shape[0]} tokens; got shape {tuple(v.shape)}")
    if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must have the same length; "
                         f"got {cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}")  # fmt: skip
    _max_seqlen("max_seqlen_q", max_seqlen_q, cu_q)
    _max_seqlen("max_seqlen_k", max_seqlen_k, cu_k)
    if traced:  # the operator reads the tensors when it runs
        cu_q, cu_k = cu_seqlens_q, cu_seqlens_k
    options = _options(softmax_scale, causal, window_size, softcap, deterministic)
    out, lse, probs = _varlen(
        q, k, v, cu_q, cu_k, dropout_probability(dropout_p), options, alibi_slopes, learnable_sink, return_attn_probs
    )
    return _results(out, lse, probs, return_attn_probs)


@_flash_attn_errors
def flash_attn_varlen_qkvpacked_func(
    qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *, learnable_sink=None,
):  # fmt: skip
    """flash_attn_varlen_func with qkv (total, 3, H, D) packed and one cu_seqlens."""
    q, k, v = _unpacked("qkv", qkv, 1, 3, "(total, 3, H, D)")
    return flash_attn_varlen_func(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale, causal, window_size,
        softcap, alibi_slopes, deterministic, return_attn_probs, learnable_sink=learnable_sink,
    )  # fmt: skip


@_flash_attn_errors
def flash_attn_varlen_kvpacked_func(
    q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
    causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
    return_attn_probs=False, *, learnable_sink=None,
):  # fmt: skip
    """flash_attn_varlen_func with kv (total_k, 2, Hkv, D) packed."""
    k, v = _unpacked("kv", kv, 1, 2, "(total_k, 2, Hkv, D)")
    return flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
        window_size, softcap, alibi_slopes, deterministic, return_attn_probs, learnable_sink=learnable_sink,
    )  # fmt: skip


def _decode_in_place(q, k_cache, v_cache, starts, stops, options, sinks):
    """A decode step, one query per sequence, against a contiguous cache on the CPU: attention() on
    (B, Hkv, N, D) views of the cache's first rows, which the decode kernel reads in place (no
    gather: the packed path copied the cache on every call), each sequence's visible keys [starts[b],
    stops[b]) a boolean mask (B, 1, 1, N) of one run per row, whose ends the kernel reads (never
    the mask). Causal changes nothing for a sequence's last position; a window's left side moves
    the run's start. Returns out (B, 1, Hq, Dv) and lse (B, Hq, 1)."""
    batch, longest = q.shape[0], int(stops.max())
    left = None if options["window"] is None else options["window"][0]
    if left is not None:
        starts = np.maximum(starts, stops - 1 - left)
    keys, values = (x[:batch, :longest].transpose(1, 2) for x in (k_cache, v_cache))  # (B, Hkv, N, D) views
    mask = None
    if np.any(starts > 0) or np.any(stops < longest):
        positions = np.arange(longest)
        visible = (positions >= starts[:, None]) & (positions < stops[:, None])  # (B, N)
        mask = _torch().from_numpy(visible[:, None, None, :])
    out, lse = attention(q.transpose(1, 2), keys, values, mask=mask, scale=options["scale"],
                         softcap=options["softcap"], sinks=sinks, return_lse=True, backend=BACKEND)  # fmt: skip
    return out.transpose(1, 2), lse


@_flash_attn_errors
def flash_attn_with_kvcache(
    q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
    cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None, causal=False,
    window_size=(-1, -1), softcap=0.0, rotary_interleaved=True, alibi_slopes=None, num_splits=0,
    return_softmax_lse=False, *, learnable_sink=None,
):  # fmt: skip
    """flash-attn's flash_attn_with_kvcache: decoding (or chunked prefill) against a KV cache.

    q (B, Nq, Hq, D). k_cache / v_cache (B_cache, N_cache, Hkv, D), or paged
    (num_blocks, page_block_size, Hkv, D) with block_table (B, max_blocks)
    int32 (any page size >= 1). k / v (B, N_new, Hkv, D), optional: written into
    the cache in place at positions cache_seqlens[b] ... + N_new (rotated first
    when rotary_cos / rotary_sin (L, R/2) are given). cache_seqlens: int or (B,)
    int32, the cache's filled length before the append (default: the whole
    cache). cache_batch_idx (B,) int32: which cache row each sequence uses
    (contiguous caches). cache_leftpad (B,) int32: where each sequence's keys
    start. Sequence b attends to keys [cache_leftpad[b], cache_seqlens[b] +
    N_new), aligned bottom-right. Rotary positions are absolute cache positions,
    as flash-attn's kernel has them (the left pad included): the new keys at
    cache_seqlens[b] + i, q at cache_seqlens[b] + i, or all at cache_seqlens[b]
    when neither causal nor local.
    Returns out (B, Nq, Hq, Dv), or (out, softmax_lse (B, Hq, Nq)). No
    backward, as in flash-attn. Nothing is written when an argument is refused.
    """
    torch = _torch()
    _tensor("q", q, 4)
    _tensor("k_cache", k_cache, 4)
    _tensor("v_cache", v_cache, 4)
    _same_device(
        q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
        alibi_slopes=alibi_slopes, block_table=block_table, cache_batch_idx=cache_batch_idx,
        cache_leftpad=cache_leftpad,
    )  # fmt: skip
    _heads(q, k_cache, v_cache, ("q", "k_cache", "v_cache"))
    if v_cache.shape[:2] != k_cache.shape[:2]:
        raise ValueError(f"v_cache must match k_cache's first axes {tuple(k_cache.shape[:2])}; got {tuple(v_cache.shape)}")
    if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0; got {num_splits!r}")
    if num_splits > 128:
        raise ValueError(f"num_splits must be at most 128, as in flash-attn; got {num_splits}")
    if not isinstance(rotary_interleaved, (bool, np.bool_)):
        raise TypeError(f"rotary_interleaved must be a bool; got {rotary_interleaved!r}")
    options = _options(softmax_scale, causal, window_size, softcap, False)
    batch, nq, hq, d = q.shape
    hkv = k_cache.shape[2]
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (the new keys and values), or neither")
    n_new = 0
    if k is not None:
        _tensor("k", k, 4)
        _tensor("v", v, 4)
        n_new = k.shape[1]
        if k.shape[:3] != (batch, n_new, hkv) or k.shape[3] != d or v.shape[:3] != k.shape[:3]:
            raise ValueError(f"k and v must be (B, N_new, Hkv, D) = ({batch}, N_new, {hkv}, {d}); got "
                             f"{tuple(k.shape)} and {tuple(v.shape)}")
        if v.shape[3] != v_cache.shape[3]:
            raise ValueError(f"v's head dim ({v.shape[3]}) must equal v_cache's ({v_cache.shape[3]})")
        if k.dtype != k_cache.dtype or v.dtype != v_cache.dtype:
            raise TypeError(f"k and v must have the cache's dtype {k_cache.dtype}; got {k.dtype} and {v.dtype}")
    if q.dtype != k_cache.dtype or v_cache.dtype != k_cache.dtype:
        raise TypeError(f"q, k_cache and v_cache must share a dtype; got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")

    cache = kv_cache.plan(k_cache, batch, n_new, cache_seqlens, cache_leftpad, cache_batch_idx, block_table,
                          q.device)  # fmt: skip
    filled, starts, stops = cache.filled, cache.starts, cache.stops
    rotary = rotary_cos is not None or rotary_sin is not None
    if rotary:
        if rotary_cos is None or rotary_sin is None or rotary_cos.shape != rotary_sin.shape or rotary_cos.ndim != 2:
            raise ValueError("rotary_cos and rotary_sin must both be given, with the same shape (L, R/2)")
        if 2 * rotary_cos.shape[1] > d:
            raise ValueError(f"rotary_cos has {rotary_cos.shape[1]} columns: R = {2 * rotary_cos.shape[1]} > D = {d}")
        # Absolute cache positions, left pad included: flash-attn's kernel adds leftpad_k back into
        # its cos/sin offset. Queries all sit at cache_seqlens unless causal or local.
        local = options["causal"] or options["window"] is not None
        query_rows = nq if local else min(nq, 1)
        needed = int((filled + max(n_new, query_rows)).max(initial=0))
        if needed > rotary_cos.shape[0]:
            raise ValueError(f"rotary_cos has {rotary_cos.shape[0]} positions; this call needs {needed}")

    # Everything is checked: now write.
    if k is not None:
        if rotary:
            offsets = torch.from_numpy(filled[:, None] + np.arange(n_new)[None]).to(q.device)
            k = kv_cache.rotate(k, rotary_cos, rotary_sin, offsets, rotary_interleaved)
        kv_cache.append(k_cache, v_cache, k, v, cache)
    if rotary:
        steps = np.arange(nq)[None] if local else np.zeros((1, nq), np.int64)
        q = kv_cache.rotate(q, rotary_cos, rotary_sin, torch.from_numpy(filled[:, None] + steps).to(q.device),
                    rotary_interleaved)

    if nq == 1 and block_table is None and cache_batch_idx is None and alibi_slopes is None and q.device.type == "cpu" \
            and int(stops.max(initial=0)) > 0:  # fmt: skip
        with torch.no_grad():
            out, lse = _decode_in_place(q, k_cache, v_cache, starts, stops, options, learnable_sink)
        return (out, lse) if return_softmax_lse else out
    keys, values = kv_cache.gather(k_cache, v_cache, cache.pages, starts, stops)
    cu_q = _uniform_offsets(batch, nq)
    cu_k = torch.from_numpy(np.concatenate([[0], np.cumsum(stops - starts)]).astype(np.int32))
    with torch.no_grad():
        out, lse = varlen_attention(
            q.reshape(batch * nq, hq, d).transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1), cu_q, cu_k,
            **options, align="bottom_right", alibi_slopes=alibi_slopes, sinks=learnable_sink, return_lse=True,
            backend=BACKEND,
        )  # fmt: skip
    out = out.transpose(0, 1).reshape(batch, nq, hq, -1)
    if return_softmax_lse:
        return out, lse.reshape(hq, batch, nq).transpose(0, 1)
    return out
