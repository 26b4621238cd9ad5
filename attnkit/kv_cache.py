"""The KV cache of flash_attn_with_kvcache: layouts, checks, append, rotary, reading each sequence's keys.

A cache is contiguous, (B_cache, N_cache, Hkv, D) with a row per sequence
(cache_batch_idx picks it), or paged, (num_blocks, page_block_size, Hkv, D)
with a block_table (B, max_blocks) of page indices: sequence b's position p
lives in page block_table[b, p // page_size], row p % page_size. Both are
described by one plan (a page table whose contiguous case is one "page" per
row), checked completely before anything is written, so a refused call
leaves the cache as it was. Any page size >= 1 works (vLLM uses 16).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from . import _arrays

__all__ = ["CachePlan", "append", "check_block_table", "gather", "index_vector", "plan", "rotate", "storage_rows"]


def _torch():
    import torch

    return torch


@dataclass(frozen=True)
class CachePlan:
    """Where a call's sequences live in the cache: pages (B, max_pages) host int64 page indices
    (a contiguous cache: one page, the sequence's row), page_size, and per sequence the first
    visible position (starts, the left pad), the filled length before the append and after it."""

    pages: np.ndarray
    page_size: int
    starts: np.ndarray
    filled: np.ndarray
    stops: np.ndarray


def plan(k_cache, batch, n_new, cache_seqlens, cache_leftpad, cache_batch_idx, block_table, device):
    """Check the cache arguments of a call appending n_new keys; returns its CachePlan."""
    paged = block_table is not None
    page_size = k_cache.shape[1]
    if cache_seqlens is None and paged:
        raise ValueError("a paged cache (block_table) needs cache_seqlens")
    filled = (np.full(batch, k_cache.shape[1], np.int64) if cache_seqlens is None
              else index_vector("cache_seqlens", cache_seqlens, batch, device))  # fmt: skip
    starts = (np.zeros(batch, np.int64) if cache_leftpad is None
              else index_vector("cache_leftpad", cache_leftpad, batch, device))  # fmt: skip
    stops = filled + n_new
    if np.any(filled < 0):
        raise ValueError(f"cache_seqlens must be >= 0; got {filled.tolist()}")
    if np.any(starts < 0) or np.any(starts > filled):
        raise ValueError(f"cache_leftpad must be in [0, cache_seqlens]; got {starts.tolist()} for {filled.tolist()}")
    if paged:
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx cannot be combined with a paged cache (block_table), as in flash-attn")
        pages = check_block_table(block_table, batch, k_cache.shape[0], stops, page_size)
        return CachePlan(pages, page_size, starts, filled, stops)
    rows = np.arange(batch) if cache_batch_idx is None else index_vector(
        "cache_batch_idx", cache_batch_idx, batch, device)
    if np.any((rows < 0) | (rows >= k_cache.shape[0])):
        raise ValueError(f"cache_batch_idx entries must be in [0, {k_cache.shape[0]}); got {rows.tolist()}")
    if cache_batch_idx is None and batch > k_cache.shape[0]:
        raise ValueError(f"q has {batch} sequences but the cache only {k_cache.shape[0]} rows")
    if np.any(stops > k_cache.shape[1]):
        b = int(np.argmax(stops > k_cache.shape[1]))
        raise ValueError(f"the cache holds {k_cache.shape[1]} positions; sequence {b} needs {int(stops[b])} "
                         f"(cache_seqlens {int(filled[b])} + {n_new} new)")
    return CachePlan(rows[:, None], k_cache.shape[1], starts, filled, stops)


def append(k_cache, v_cache, k, v, cache):
    """Write k, v (B, N_new, Hkv, D) in place at positions cache.filled[b] ... cache.stops[b] - 1."""
    torch = _torch()
    page_ids, in_page = storage_rows(cache.pages, cache.page_size, cache.filled, cache.stops)
    page_ids, in_page = (torch.from_numpy(x).to(k_cache.device) for x in (page_ids, in_page))
    k_cache[page_ids, in_page] = k.reshape(-1, k.shape[2], k.shape[3])
    v_cache[page_ids, in_page] = v.reshape(-1, v.shape[2], v.shape[3])


def index_vector(name, x, batch, device):
    """An int or (B,) int32 tensor as a host int64 (B,) array."""
    torch = _torch()
    if isinstance(x, numbers.Integral) and not isinstance(x, bool):
        return np.full(batch, int(x), np.int64)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be an int or a (B,) int32 tensor; got {_arrays.type_name(x)}")
    if x.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype int32; got {_arrays.dtype_name(x)}")
    if tuple(x.shape) != (batch,):
        raise ValueError(f"{name} must have shape ({batch},); got {tuple(x.shape)}")
    if str(x.device) != str(device):
        raise ValueError(f"{name} is on {x.device}; q is on {device}")
    return x.cpu().numpy().astype(np.int64)


def storage_rows(pages, page_size, starts, stops):
    """(page index, row in page) of positions [starts[b], stops[b]) of every sequence b, in order.

    pages (B, max_pages): sequence b's position p lives in page pages[b, p // page_size].
    """
    lengths = stops - starts
    seq = np.repeat(np.arange(len(starts)), lengths)
    positions = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths) + starts[seq]
    return pages[seq, positions // page_size], positions % page_size


def gather(k_cache, v_cache, pages, starts, stops):
    """Each sequence's keys [starts[b], stops[b]) from a paged cache, packed: (total, Hkv, D) each;
    pages (B, max_pages) host int64. Reads those positions and nothing else.

    CPU caches are gathered by NumPy on views of their memory: a torch indexing
    op here leaves torch's worker threads spinning on the cores the attention
    kernel starts on next (a decode step ran 3-7x slower after one).
    """
    torch = _torch()
    page_ids, rows = storage_rows(pages, k_cache.shape[1], starts, stops)
    if k_cache.device.type != "cpu":
        page_ids, rows = (torch.from_numpy(x).to(k_cache.device) for x in (page_ids, rows))
        return k_cache[page_ids, rows], v_cache[page_ids, rows]
    return tuple(_from_host(_host_view(x)[page_ids, rows], x.dtype) for x in (k_cache, v_cache))


def _host_view(x):
    """A CPU tensor's memory as a NumPy array (bf16 as its uint16 bits), no copy."""
    return _arrays.bf16_bits(x) if x.dtype == _torch().bfloat16 else x.detach().numpy()


def _from_host(array, dtype):
    torch = _torch()
    if dtype == torch.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def check_block_table(block_table, batch, num_blocks, stops, page_size):
    torch = _torch()
    if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 or block_table.ndim != 2:
        raise TypeError(f"block_table must be a (B, max_blocks) int32 tensor; got {_arrays.type_name(block_table)} "
                        f"{getattr(block_table, 'dtype', '')} {tuple(getattr(block_table, 'shape', ()))}")
    if block_table.shape[0] != batch:
        raise ValueError(f"block_table must have {batch} rows (one per sequence); got {block_table.shape[0]}")
    table = block_table.cpu().numpy().astype(np.int64)
    capacity = block_table.shape[1] * page_size
    if np.any(stops > capacity):
        b = int(np.argmax(stops > capacity))
        raise ValueError(f"sequence {b} needs {int(stops[b])} cache positions; its block_table row holds "
                         f"{block_table.shape[1]} pages of {page_size} = {capacity}")
    for b in range(batch):
        used = table[b, : -(-int(stops[b]) // page_size)]
        if np.any((used < 0) | (used >= num_blocks)):
            bad = int(used[(used < 0) | (used >= num_blocks)][0])
            raise ValueError(f"block_table[{b}] holds page {bad}; the cache has pages 0..{num_blocks - 1}")
    return table


def rotate(x, cos, sin, positions, interleaved):
    """x (B, N, H, D) rotated at positions (B, N) by cos / sin (L, R/2) on its first R features, in
    float32 (float64 for float64 x, which float32 arithmetic left float32-accurate)."""
    torch = _torch()
    half = cos.shape[1]
    compute = torch.promote_types(x.dtype, torch.float32)
    c = cos[positions][:, :, None, :].to(compute)  # (B, N, 1, R/2)
    s = sin[positions][:, :, None, :].to(compute)
    xf = x.to(compute)
    if interleaved:  # GPT-J: pairs (0, 1), (2, 3), ...
        x1, x2 = xf[..., 0 : 2 * half : 2], xf[..., 1 : 2 * half : 2]
        rotated = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    else:  # GPT-NeoX: halves (0, R/2), (1, R/2 + 1), ...
        x1, x2 = xf[..., :half], xf[..., half : 2 * half]
        rotated = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)
    return torch.cat([rotated.to(x.dtype), x[..., 2 * half :]], dim=-1)
