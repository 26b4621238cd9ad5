"""FlexAttention's API on attnkit's kernels: score_mod, mask_mod and block masks, forward and backward.

    attnkit.flex_attention(q, k, v, score_mod=None, block_mask=None, scale=None,
                           enable_gqa=False, return_lse=False)
    attnkit.create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device=None, BLOCK_SIZE=128)

The signatures and semantics are torch.nn.attention.flex_attention's, and so are the user
functions: a score_mod / mask_mod written for torch runs unchanged. Each is traced once by torch.fx
(attnkit/flex/trace.py), written out as Numba source, compiled into the CPU tile loop
(kernels/cpu/flex.py) and cached on disk by the source's digest: new values in the captured tensors
(a bias table, document ids) reuse the compiled kernel. `generated_source(...)` shows the code.

Unlike torch's compiled CPU path, the backward runs on the CPU, with gradients for captured tensors
that require one (a learnable bias table), and NumPy arrays are accepted (forward only).
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass, field

import numpy as np

from .. import _arrays
from ..backends import AttnkitFallbackWarning

# torch is imported only once a flex function is called: importing attnkit stays torch-free.


class UntraceableError(ValueError):
    """A score_mod / mask_mod uses something the kernels cannot compile (the message names it)."""


class FlexRecompileWarning(UserWarning):
    """A score_mod / mask_mod compiles again because Python numbers it reads changed value."""


IDENTITY_SCORE_MOD = (
    "SCORE_MOD_IS_IDENTITY = True\n\n\n"
    "@_jit(inline=\"always\")\n"
    "def score_mod(score, b, h, q_idx, kv_idx, caps):\n    return score\n\n\n"
    "@_jit(inline=\"always\")\n"
    "def score_mod_vjp(score, b, h, q_idx, kv_idx, caps, grad, grad_bufs, worker):\n    return grad\n"
)
NO_MASK_MOD = "@_jit(inline=\"always\")\ndef mask_mod(b, h, q_idx, kv_idx, caps):\n    return True\n"


def trace_score_mod(score_mod):
    from .trace import trace_score_mod as trace

    return trace(score_mod)


def trace_mask_mod(mask_mod):
    from .trace import trace_mask_mod as trace

    return trace(mask_mod)

__all__ = [
    "FlexRecompileWarning",
    "UntraceableError",
    "and_masks",
    "create_block_mask",
    "flex_attention",
    "generated_source",
    "noop_mask",
    "or_masks",
]

_DEFAULT_BLOCK = 128


def noop_mask(b, h, q_idx, kv_idx):
    """Every score visible (torch's noop_mask)."""
    return q_idx >= 0  # a tensor like q_idx, all True


def and_masks(*mask_mods):
    """A mask_mod that allows a score where every one of mask_mods does."""

    def mask(b, h, q_idx, kv_idx):
        result = noop_mask(b, h, q_idx, kv_idx)
        for mod in mask_mods:
            result = result & mod(b, h, q_idx, kv_idx)
        return result

    return mask


def or_masks(*mask_mods):
    """A mask_mod that allows a score where any one of mask_mods does."""

    def mask(b, h, q_idx, kv_idx):
        result = ~noop_mask(b, h, q_idx, kv_idx)
        for mod in mask_mods:
            result = result | mod(b, h, q_idx, kv_idx)
        return result

    return mask


def _module(score_traced, mask_traced):
    from ..kernels.cpu import flex_build

    if score_traced is None and mask_traced is None:
        return flex_build.module_for(None)
    # a traced score_mod: the kernels apply it (and its vjp) score by score
    score = f"SCORE_MOD_IS_IDENTITY = False\n\n\n{score_traced.source}" if score_traced is not None else IDENTITY_SCORE_MOD
    mask = mask_traced.source if mask_traced is not None else NO_MASK_MOD
    return flex_build.module_for(f"{score}\n\n{mask}")


def generated_source(score_mod=None, mask_mod=None, backend="numba"):
    """The source attnkit compiles for score_mod and mask_mod (either may be None): Numba functions of
    one score, or with backend="triton" Triton functions of a tile."""
    score = trace_score_mod(score_mod) if score_mod is not None else None
    mask = trace_mask_mod(mask_mod) if mask_mod is not None else None
    if backend == "triton":
        from .trace import triton_mask_source, triton_score_source

        return f"{triton_score_source(score)}\n\n{triton_mask_source(mask)}"
    if backend != "numba":
        raise ValueError(f"generated_source: backend must be 'numba' or 'triton'; got {backend!r}")
    return f"{score.source if score else IDENTITY_SCORE_MOD}\n\n{mask.source if mask else NO_MASK_MOD}"


def _capture_arrays(captures):
    """Captured tensors as NumPy arrays the kernel reads: floats in float64 or float32, ints as int64."""
    import torch

    arrays = []
    for tensor in captures:
        t = tensor.detach().cpu()
        t = t.reshape(1) if t.dim() == 0 else t  # the generated code reads a captured scalar as caps[n][0]
        if t.dtype == torch.bool:
            arrays.append(t.numpy().copy())
        elif t.dtype.is_floating_point:
            arrays.append(t.to(torch.float64 if t.dtype == torch.float64 else torch.float32).contiguous().numpy())
        else:
            arrays.append(t.to(torch.int64).contiguous().numpy())
    return tuple(arrays)


# ---------------------------------------------------------------------------
# Block masks
# ---------------------------------------------------------------------------


def _block_size(value, name="BLOCK_SIZE"):
    sizes = (value, value) if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    if len(sizes) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise ValueError(f"{name} must be a positive int or a pair of them (query block, key block); got {value!r}")
    return sizes


def create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device=None, BLOCK_SIZE=_DEFAULT_BLOCK, _compile=False):
    """torch's create_block_mask, evaluated by a compiled kernel (no Python call per score).

    B or H None means one block layout shared by every batch entry or head. Returns torch's own
    BlockMask (full blocks, partial blocks, and the transposed lists torch computes from them), so
    it works with torch's flex_attention as well as attnkit's.
    """
    import torch
    from torch.nn.attention.flex_attention import BlockMask

    from ..kernels.cpu import flex_build

    for name, value, allow_none in (("B", B, True), ("H", H, True), ("Q_LEN", Q_LEN, False),
                                    ("KV_LEN", KV_LEN, False)):
        if value is None and allow_none:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if allow_none else 0):
            raise ValueError(f"create_block_mask: {name} must be a {'positive ' if allow_none else 'non-negative '}"
                             f"int{' or None' if allow_none else ''}; got {value!r}")
    if not callable(mask_mod):
        raise TypeError(f"create_block_mask: mask_mod must be callable (b, h, q_idx, kv_idx) -> bool; got "
                        f"{type(mask_mod).__name__}")
    block_q, block_k = _block_size(BLOCK_SIZE)
    batch, heads = B or 1, H or 1
    traced = trace_mask_mod(mask_mod)
    kinds = flex_build.classify_blocks(_module(None, traced), batch, heads, Q_LEN, KV_LEN, block_q, block_k,
                                       _capture_arrays(traced.captures))
    partial_num, partial_idx, full_num, full_idx = _lists(kinds)
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device or "cpu")  # noqa: E731
    return BlockMask.from_kv_blocks(
        as_tensor(partial_num), as_tensor(partial_idx), as_tensor(full_num), as_tensor(full_idx),
        BLOCK_SIZE=(block_q, block_k), mask_mod=mask_mod, seq_lengths=(Q_LEN, KV_LEN),
    )  # fmt: skip


@dataclass
class _BlockLists:
    """A block mask's lists as the kernels read them, made once per mask and call shape: the int32
    NumPy arrays (kv lists), and per device the Triton kernels' tensors, forward (kv lists) and
    transposed (q lists, for dK / dV). A CUDA call then copies nothing between host and device."""

    blocks: tuple  # (partial count, partial list, full count, full list) int32 NumPy arrays
    block_q: int
    block_k: int
    mask_mod: object
    nk: int
    versions: tuple = ()  # the mask's tensors (identity, in-place version) these were made from
    on_device: dict = field(default_factory=dict)

    def device_lists(self, device, transposed=False):
        """(full count, full list, partial count, partial list) tensors on device."""
        import torch

        key = (str(device), transposed)
        if key not in self.on_device:
            lists = self.blocks
            if transposed:
                lists = _lists(np.swapaxes(_kinds(lists, -(-self.nk // self.block_k)), 2, 3))
            partial_num, partial_idx, full_num, full_idx = lists
            self.on_device[key] = tuple(torch.from_numpy(np.ascontiguousarray(a)).to(device)
                                        for a in (full_num, full_idx, partial_num, partial_idx))
        return self.on_device[key]


_LISTS = weakref.WeakKeyDictionary()  # BlockMask -> {(batch, heads, nq, nk): _BlockLists}
_DEFAULT_LISTS = {}  # (nq, nk, block) -> _BlockLists of calls without a block mask
_MAX_DEFAULT_LISTS = 64


def _versions(block_mask):
    names = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")
    tensors = [getattr(block_mask, name) for name in names]
    return tuple((id(t), t._version) for t in tensors if t is not None)


def _block_lists(block_mask, batch, heads, nq, nk, default_block=_DEFAULT_BLOCK):
    """_mask_arrays' result as a _BlockLists, remembered per BlockMask (while its tensors stay the same
    objects, unchanged) or per shape without one."""
    if block_mask is None:
        key = (nq, nk, default_block)
        lists = _DEFAULT_LISTS.get(key)
        if lists is None:
            if len(_DEFAULT_LISTS) >= _MAX_DEFAULT_LISTS:
                _DEFAULT_LISTS.clear()
            lists = _DEFAULT_LISTS[key] = _BlockLists(*_mask_arrays(None, batch, heads, nq, nk, default_block), nk)
        return lists
    from torch.nn.attention.flex_attention import BlockMask

    if not isinstance(block_mask, BlockMask):  # _mask_arrays says what it takes
        return _BlockLists(*_mask_arrays(block_mask, batch, heads, nq, nk, default_block), nk)
    per_mask = _LISTS.setdefault(block_mask, {})
    key, versions = (batch, heads, nq, nk), _versions(block_mask)
    lists = per_mask.get(key)
    if lists is None or lists.versions != versions:
        lists = per_mask[key] = _BlockLists(*_mask_arrays(block_mask, batch, heads, nq, nk, default_block), nk,
                                            versions)
    return lists


def _mask_arrays(block_mask, batch, heads, nq, nk, default_block=_DEFAULT_BLOCK):
    """(partial count, partial list, full count, full list) int32 arrays, block sizes and the
    mask_mod of block_mask (torch's BlockMask, from either create_block_mask); None: all full."""
    if block_mask is None:
        block_q, block_k = default_block, default_block
        n_qb, n_kb = max(1, -(-nq // block_q)), max(1, -(-nk // block_k))
        full_num = np.full((1, 1, n_qb), n_kb if nk else 0, np.int32)
        full_idx = np.broadcast_to(np.arange(n_kb, dtype=np.int32), (1, 1, n_qb, n_kb)).copy()
        partial_num, partial_idx = np.zeros((1, 1, n_qb), np.int32), np.zeros((1, 1, n_qb, 1), np.int32)
        return (partial_num, partial_idx, full_num, full_idx), block_q, block_k, None
    try:
        from torch.nn.attention.flex_attention import BlockMask
    except ImportError:  # pragma: no cover: torch is a dependency
        BlockMask = ()
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be a BlockMask (from attnkit.create_block_mask or torch's) or None; got "
                        f"{type(block_mask).__name__}")
    block_q, block_k = block_mask.BLOCK_SIZE
    seq = tuple(block_mask.seq_lengths)
    if seq != (nq, nk):
        raise ValueError(f"block_mask was made for (Q_LEN, KV_LEN) = {seq}; the call has ({nq}, {nk}): make it "
                         "with the call's lengths")
    arrays = []
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        tensor = getattr(block_mask, name)
        if tensor is None:  # no separate full blocks: every listed block evaluates mask_mod
            tensor_array = np.zeros((1, 1, arrays[0].shape[2]) + ((1,) if name.endswith("indices") else ()), np.int32)
        else:
            tensor_array = np.ascontiguousarray(tensor.detach().cpu().numpy().astype(np.int32))
        arrays.append(tensor_array)
    for array, name in zip(arrays, ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")):
        if array.shape[0] not in (1, batch) or array.shape[1] not in (1, heads):
            raise ValueError(f"block_mask.{name} has shape {tuple(array.shape)}: its batch and head axes must be 1 "
                             f"or the call's ({batch}, {heads})")
    if arrays[0].shape[2] < -(-nq // block_q):
        raise ValueError(f"block_mask has {arrays[0].shape[2]} query blocks of {block_q}; the call's {nq} queries "
                         f"need {-(-nq // block_q)}")
    return tuple(arrays), block_q, block_k, block_mask.mask_mod


# ---------------------------------------------------------------------------
# flex_attention
# ---------------------------------------------------------------------------


@dataclass
class _Plan:
    """Everything a call's forward and backward need besides q, k, v: the kernels' module (CPU or
    Triton), the block lists, the captured tensors as the kernels read them."""

    kernel: str  # "numba" or "triton"
    module: object
    lists: _BlockLists  # the block mask's lists (NumPy, and on the Triton kernels' device)
    scale: float
    score_caps: tuple  # the score_mod's captured tensors as the kernel reads them
    mask_caps: tuple
    grad_captures: list  # torch tensors (score_mod's captures) that get gradients
    grad_slots: list  # their indices in score_caps
    device: object = None  # the Triton kernels' torch device

    def forward(self, q, k, v):
        """(out, lse float32, the kernel's own lse for the backward): torch from torch q, k, v, NumPy
        from NumPy. The CPU kernel's lse is in its compute dtype (float64 for float64 inputs)."""
        if self.kernel == "triton":
            out, lse = self.module.forward(*_triton_operands(q, k, v), self.scale, self.score_caps, self.mask_caps,
                                           self.lists.device_lists(self.device), self.block_q, self.block_k)
            return out, lse, lse
        from ..kernels.cpu import flex_build

        out, lse = flex_build.forward(self.module, *_cpu_operands(q, k, v), self.scale, self.score_caps,
                                      self.mask_caps, self.blocks, self.block_q, self.block_k)
        if _arrays.family(q) == "numpy":
            return out.astype(q.dtype, copy=False), lse.astype(np.float32), lse
        import torch

        return _arrays.like(out, q), torch.from_numpy(lse).float().to(q.device), lse

    def backward(self, q, k, v, out, d_out, lse, d_lse):
        """(dq, dk, dv, gradients of grad_captures) as torch tensors."""
        import torch

        if self.kernel == "triton":
            dq, dk, dv, grads = self.module.backward(
                *_triton_operands(q, k, v), out.contiguous(), d_out.contiguous(), lse.contiguous(),
                d_lse.float().contiguous(), self.scale, self.score_caps, self.mask_caps,
                self.lists.device_lists(self.device), self.lists.device_lists(self.device, transposed=True),
                self.block_q, self.block_k,
                self.grad_slots,
            )  # fmt: skip
        else:
            from ..kernels.cpu import flex_build

            compute = _compute_dtype(_arrays.dtype_name(q))
            arrays = [*_cpu_operands(q, k, v, out, d_out), lse, _operand(d_lse, compute)]
            dq, dk, dv, grads = flex_build.backward(
                self.module, *arrays, self.scale, self.score_caps, self.mask_caps, self.blocks, self.block_q,
                self.block_k, [tuple(t.shape) for t in self.grad_captures],
            )  # fmt: skip
            dq, dk, dv = (_arrays.like(g, x) for g, x in zip((dq, dk, dv), (q, k, v)))
            grads = [torch.from_numpy(g) for g in grads]
        results = [g.to(device=x.device, dtype=x.dtype) for g, x in zip((dq, dk, dv), (q, k, v))]
        return results + [g.to(device=t.device, dtype=t.dtype).reshape(t.shape) for g, t in zip(grads, self.grad_captures)]

    @property
    def blocks(self):
        return self.lists.blocks

    @property
    def block_q(self):
        return self.lists.block_q

    @property
    def block_k(self):
        return self.lists.block_k


def _triton_operands(*tensors):
    return [t.detach().contiguous() for t in tensors]


def _kinds(blocks, n_kb):
    """Dense (B or 1, H or 1, query blocks, key blocks) int8 from kv lists: 2 full, 1 partial, 0 empty."""
    partial_num, partial_idx, full_num, full_idx = blocks
    batch = max(a.shape[0] for a in blocks)
    heads = max(a.shape[1] for a in blocks)
    n_qb = partial_num.shape[2]
    kinds = np.zeros((batch, heads, n_qb, n_kb), np.int8)
    for num, idx, kind in ((partial_num, partial_idx, 1), (full_num, full_idx, 2)):
        num = np.broadcast_to(num, (batch, heads, n_qb))
        idx = np.broadcast_to(idx, (batch, heads, n_qb, idx.shape[3]))
        b, h, qb, n = np.nonzero(np.arange(idx.shape[3]) < num[..., None])
        kinds[b, h, qb, idx[b, h, qb, n]] = kind
    return kinds


def _lists(kinds):
    """(partial count, partial list, full count, full list) over kinds' last axis, each list in increasing
    order first and padded after (torch's BlockMask layout)."""
    partial, full = kinds == 1, kinds == 2
    return (partial.sum(-1, dtype=np.int32), np.argsort(~partial, axis=-1, kind="stable").astype(np.int32),
            full.sum(-1, dtype=np.int32), np.argsort(~full, axis=-1, kind="stable").astype(np.int32))


def _compute_dtype(dtype_name):
    return np.float64 if dtype_name == "float64" else np.float32


def _operand(x, dtype):
    """x as a C-contiguous NumPy array of the compute dtype (bf16 / fp16 widened once)."""
    return np.ascontiguousarray(_arrays.to_numpy(x), dtype=dtype)


def _cpu_operands(*tensors):
    """The CPU kernel's operands: bf16 tensors as their bits (uint16, no conversion: the products
    run on the bf16 path) where flex_build takes them, else C-contiguous arrays of the compute dtype."""
    from ..kernels.cpu import flex_build

    names = {_arrays.dtype_name(x) for x in tensors}
    if names == {"bfloat16"} and flex_build.takes_bf16_bits():
        return [np.ascontiguousarray(_arrays.bf16_bits(x)) for x in tensors]
    compute = _compute_dtype(_arrays.dtype_name(tensors[0]))
    return [_operand(x, compute) for x in tensors]


def _validate(query, key, value, scale, enable_gqa):
    """(dtype, device) after the checks every entry point shares (validation.py), and flex's own:
    4-D (B, H, N, D) operands with one batch, and enable_gqa for Hq != Hkv."""
    from ..validation import _check_heads, _check_inputs, _number

    _, device, dtype = _check_inputs(query, key, value)
    if _arrays.holds_no_data(query):
        raise ValueError(f"flex_attention: query is a {'meta' if query.is_meta else 'fake'} tensor, which holds no "
                         "data; flex_attention needs data to run score_mod and mask_mod (attention, "
                         "scaled_dot_product_attention and varlen_attention accept tensors without data)")
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.ndim != 4:
            raise ValueError(f"flex_attention: {name} must be 4-D (B, H, N, D); got shape {tuple(x.shape)}")
    if not query.shape[0] == key.shape[0] == value.shape[0]:
        raise ValueError(f"flex_attention: batch sizes differ: query {query.shape[0]}, key {key.shape[0]}, "
                         f"value {value.shape[0]}")
    _check_heads(tuple(query.shape), tuple(key.shape), tuple(value.shape))
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(f"flex_attention: query has {query.shape[1]} heads and key/value {key.shape[1]}; pass "
                         "enable_gqa=True for GQA")
    if scale is not None:
        _number("scale", scale)
    return dtype, device


def _uses_triton(query, backend):
    if backend not in ("auto", "numba", "triton"):
        raise ValueError(f"flex_attention: backend must be 'auto', 'numba' or 'triton'; got {backend!r}")
    on_gpu = _arrays.family(query) == "torch" and query.device.type != "cpu"
    if backend == "triton":
        if _arrays.family(query) != "torch":
            raise TypeError("flex_attention: backend='triton' takes torch tensors")
        from ..kernels import triton_attention  # imports triton: only when asked for

        if not on_gpu and not triton_attention.interpreting():
            raise ValueError("flex_attention: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                             "triton is imported, to run the Triton kernels on the CPU)")
        return True
    return on_gpu and backend == "auto" and _arrays.dtype_name(query) != "float64"


def _plan(query, key, score_mod, block_mask, scale, backend="numba"):
    batch, hq, nq, d = query.shape
    nk = key.shape[2]
    if score_mod is not None and not callable(score_mod):
        raise TypeError(f"flex_attention: score_mod must be callable (score, b, h, q_idx, kv_idx) -> score; got "
                        f"{type(score_mod).__name__}")
    triton = backend == "triton"
    lists = _block_lists(block_mask, batch, hq, nq, nk, default_block=64 if triton else _DEFAULT_BLOCK)
    block_q, block_k, mask_mod = lists.block_q, lists.block_k, lists.mask_mod
    if mask_mod is not None and not int(lists.blocks[0].max(initial=0)):
        mask_mod = None  # no partial block: mask_mod is never evaluated
    score_traced = trace_score_mod(score_mod) if score_mod is not None else None
    mask_traced = trace_mask_mod(mask_mod) if mask_mod is not None else None
    grad_slots = list(score_traced.grad_captures) if score_traced else []
    grad_captures = [score_traced.captures[n] for n in grad_slots]
    score_captures = score_traced.captures if score_traced else []
    mask_captures = mask_traced.captures if mask_traced else []
    if triton:
        for name, size in (("query", block_q), ("key", block_k)):
            if size & (size - 1) or size < 16:
                raise ValueError(f"flex_attention: the Triton kernel needs block sizes that are powers of two, at "
                                 f"least 16; the block mask's {name} blocks are {size}")
        device = query.device
        module = _triton_module(score_traced, mask_traced)
        score_caps = tuple(_device_capture(t, device) for t in score_captures)
        mask_caps = tuple(_device_capture(t, device) for t in mask_captures)
    else:
        device = None
        module = _module(score_traced, mask_traced)
        score_caps, mask_caps = _capture_arrays(score_captures), _capture_arrays(mask_captures)
    return _Plan(
        kernel="triton" if triton else "numba", module=module, lists=lists,
        scale=1.0 / math.sqrt(d) if scale is None else float(scale), score_caps=score_caps, mask_caps=mask_caps,
        grad_captures=grad_captures, grad_slots=grad_slots, device=device,
    )  # fmt: skip


def _triton_module(score_traced, mask_traced):
    from ..kernels import triton_flex
    from ..kernels.cpu import flex_build
    from .trace import triton_mask_source, triton_score_source

    if score_traced is None and mask_traced is None:
        return triton_flex
    return flex_build.module_for(f"{triton_score_source(score_traced)}\n\n{triton_mask_source(mask_traced)}",
                                 triton_flex)


def _device_capture(tensor, device):
    """A captured tensor as the Triton kernel reads it: contiguous, on the call's device; floats in
    float32, booleans as int8, a 0-d tensor as shape (1,)."""
    import torch

    t = tensor.detach().to(device)
    t = t.reshape(1) if t.dim() == 0 else t
    if t.dtype == torch.bool:
        t = t.to(torch.int8)
    elif t.dtype.is_floating_point:
        t = t.float()
    return t.contiguous()


def _autograd_function():
    import torch

    class FlexFunction(torch.autograd.Function):
        """q, k, v and the captured tensors that require grad -> (out, lse), on either kernel."""

        @staticmethod
        def forward(ctx, plan, query, key, value, *grad_captures):
            out, lse, ctx.kernel_lse = plan.forward(query, key, value)
            ctx.plan = plan
            ctx.save_for_backward(query, key, value, out, lse)
            return out, lse

        @staticmethod
        def backward(ctx, d_out, d_lse):
            query, key, value, out, lse = ctx.saved_tensors
            d_out = torch.zeros_like(out) if d_out is None else d_out
            d_lse = torch.zeros_like(lse) if d_lse is None else d_lse
            return (None, *ctx.plan.backward(query, key, value, out, d_out, ctx.kernel_lse, d_lse))

    return FlexFunction


_FLEX_FUNCTION = None
_OUTSIDE_COMPILE = None


def flex_attention(query, key, value, score_mod=None, block_mask=None, scale=None, enable_gqa=False,
                   return_lse=False, kernel_options=None, *, backend="auto"):
    """torch.nn.attention.flex_attention on attnkit's kernels.

    query (B, Hq, Nq, D), key (B, Hkv, Nk, D), value (B, Hkv, Nk, Dv): torch tensors (gradients
    flow to them and to captured tensors of score_mod that require grad) or NumPy arrays.
    score_mod(score, b, h, q_idx, kv_idx) -> score, applied to the scaled scores; block_mask from
    attnkit.create_block_mask or torch's; enable_gqa lets Hq be a multiple of Hkv. Returns out
    (B, Hq, Nq, Dv) in query's dtype, and with return_lse the natural-log log-sum-exp (B, Hq, Nq)
    in float32 (-inf, with out 0, on rows the mask hides entirely). kernel_options is accepted for
    torch's signature and ignored: each kernel picks its own tiles.

    backend (attnkit's addition): "auto" runs CUDA tensors on the Triton kernel (float64 on the
    CPU kernel, with a warning) and the rest on the Numba CPU kernel; "numba" or "triton" ask for
    one ("triton" on CPU tensors runs under the Triton interpreter, TRITON_INTERPRET=1).

    Under torch.compile the call is a graph break: the compiled graph runs up to it, attnkit's
    kernel (and its backward) runs, the graph goes on.
    """
    global _OUTSIDE_COMPILE
    del kernel_options
    if _arrays.family(query) != "torch":
        return _flex_attention(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse, backend)
    if _OUTSIDE_COMPILE is None:
        import torch

        # Dynamo cannot trace the tracing of score_mod (make_fx) or the kernels' calls: stop here, quietly.
        _OUTSIDE_COMPILE = torch._dynamo.disable(_flex_attention)
    return _OUTSIDE_COMPILE(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse, backend)


def _flex_attention(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse, backend):
    global _FLEX_FUNCTION
    _, device = _validate(query, key, value, scale, enable_gqa)
    triton = _uses_triton(query, backend)
    plan = _plan(query, key, score_mod, block_mask, scale, "triton" if triton else "numba")
    if _arrays.family(query) == "numpy":
        out, lse, _ = plan.forward(query, key, value)
        return (out, lse) if return_lse else out
    import torch

    if device != "cpu" and not triton:
        warnings.warn(
            f"attnkit.flex_attention: {device} {_arrays.dtype_name(query)} tensors run on the CPU kernel (the "
            "Triton kernel takes float16, bfloat16 and float32) and are copied back", AttnkitFallbackWarning,
            stacklevel=3,
        )  # fmt: skip
    if _FLEX_FUNCTION is None:
        _FLEX_FUNCTION = _autograd_function()
    needs_grad = torch.is_grad_enabled() and (
        any(x.requires_grad for x in (query, key, value)) or bool(plan.grad_captures))
    if needs_grad:
        out, lse = _FLEX_FUNCTION.apply(plan, query, key, value, *plan.grad_captures)
    else:
        out, lse, _ = plan.forward(query, key, value)
    return (out, lse) if return_lse else out
