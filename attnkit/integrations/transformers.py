"""attnkit as an attention implementation for Hugging Face transformers.

    from attnkit.integrations.transformers import register
    register()                                   # once per process
    model = AutoModel.from_pretrained(path, attn_implementation="attnkit")

register() adds two functions under one name:

- the attention function (transformers' ``AttentionInterface``), which every
  attention layer of a model calls with (B, H, S, D) query, key and value and
  which runs attnkit.attention on the fastest backend for the device;
- the mask function (``AttentionMaskInterface``). Without it transformers
  treats the name as a backend that builds no mask, and padding and
  causality would silently reach the attention function as ``None``. attnkit
  takes masks the way torch's SDPA does (boolean, True = may attend), so the
  SDPA mask builder is registered: it hands over a boolean mask, or ``None``
  when the call is unpadded and plain causal or plain bidirectional.

Packed batches (several sequences in one row, as ``DataCollatorWithFlattening``
makes them: ``position_ids`` that restart at 0, or ``cu_seq_lens_q`` /
``cu_seq_lens_k`` in the call's kwargs) run through attnkit.varlen_attention:
each sequence at its own length, causal within itself, no mask read. The
block-diagonal mask transformers may still build for them is not used.

The attention weights are computed (by the NumPy reference, the one backend
that forms them) only when the caller asks for them with
``output_attentions=True``; otherwise the call goes to backend="auto" and
never materialises the score matrix.
"""

from __future__ import annotations

import logging
import warnings

import attnkit
from attnkit.backends import AttnkitFallbackWarning

NAME = "attnkit"

log = logging.getLogger("attnkit")

__all__ = ["NAME", "attention_forward", "is_registered", "observe", "register", "remove_heads"]

# Called as observer(module, query, key, value) at the start of every attention
# call (see observe()); the visualiser reads the real q, k and v this way.
_OBSERVERS = []


class observe:
    """Within `with observe(fn):`, every attention call through attnkit first calls
    fn(module, query, key, value) with the (B, H, S, D) tensors it received."""

    def __init__(self, fn):
        self.fn = fn

    def __enter__(self):
        _OBSERVERS.append(self.fn)
        return self

    def __exit__(self, *exc):
        _OBSERVERS.remove(self.fn)


# {layer index: [head, ...]} whose outputs attention calls replace by zeros (see remove_heads()).
_REMOVED = {}


class remove_heads:
    """Within `with remove_heads({(layer, head), ...}):`, those heads' outputs are zero in every
    attention call through attnkit (the layer read from the module's layer_idx): the model runs
    as if the heads had been pruned (the head-ablation experiment of `attnkit viz --ablate`)."""

    def __init__(self, heads):
        self.heads = {}
        for layer, head in heads:
            self.heads.setdefault(int(layer), []).append(int(head))

    def __enter__(self):
        if _REMOVED:
            raise RuntimeError("remove_heads() does not nest")
        _REMOVED.update(self.heads)
        return self

    def __exit__(self, *exc):
        _REMOVED.clear()


def _without_removed_heads(module, out):
    """out (B, H, S, D) with the heads remove_heads() names for this layer zeroed."""
    heads = _REMOVED.get(getattr(module, "layer_idx", None))
    if heads:
        out = out.clone()
        out[:, heads] = 0
    return out


def register(name: str = NAME) -> str:
    """Register attnkit with transformers under `name` (default "attnkit"); returns the name.

    Afterwards ``from_pretrained(..., attn_implementation=name)`` (or
    ``model.set_attn_implementation(name)``) runs the model's attention
    through attnkit. Calling it again is harmless.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty string; got {name!r}")
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "attnkit.integrations.transformers needs transformers >= 4.48 (with "
            f"AttentionInterface and AttentionMaskInterface): {error}. "
            "Install it with: pip install transformers"
        ) from error
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def is_registered(name: str = NAME) -> bool:
    """True when both the attention and the mask function are registered under `name`."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return False
    return (
        AttentionInterface._global_mapping.get(name) is attention_forward
        and name in AttentionMaskInterface._global_mapping
    )


def _weights_requested(module, kwargs) -> bool:
    flag = kwargs.get("output_attentions")
    if flag is None:
        config = getattr(module, "config", None)
        flag = getattr(config, "output_attentions", False)
    return bool(flag)


def _fold_causal(mask, nq, nk, device):
    """A top-left causal pattern folded into `mask` (None, boolean or additive)."""
    import torch

    causal = torch.ones(nq, nk, dtype=torch.bool, device=device).tril()
    if mask is None:
        return causal
    if mask.dtype == torch.bool:
        return mask & causal
    return torch.where(causal, mask, torch.tensor(float("-inf"), dtype=mask.dtype, device=device))


def _add_bias(mask, bias):
    """An additive float mask: `bias` plus `mask` (boolean masks become 0 / -inf)."""
    import torch

    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return torch.where(mask, bias, torch.tensor(float("-inf"), dtype=bias.dtype, device=bias.device))
    return bias + mask.to(bias.dtype)


def _packed_offsets(kwargs, batch, nq, nk):
    """int32 (S + 1,) offsets of the sequences packed into the call's one row, or None.

    From ``cu_seq_lens_q`` / ``cu_seq_lens_k`` when the collator gave them, else
    from ``position_ids`` (1, T): a new sequence starts wherever the position
    does not step by one. None for anything else (a batch of rows, a cache).
    """
    import torch

    if batch != 1 or nq != nk:
        return None
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None and torch.equal(cu_q.cpu(), cu_k.cpu()) and int(cu_q[-1]) == nq:
        return cu_q.to(device="cpu", dtype=torch.int32)
    positions = kwargs.get("position_ids")
    if positions is None or positions.dim() != 2 or positions.shape != (1, nq):
        return None
    starts = torch.nonzero(positions[0, 1:] - positions[0, :-1] != 1).flatten() + 1
    if starts.numel() == 0:
        return None  # one sequence: the plain path
    edges = [torch.zeros(1, dtype=torch.long), starts.cpu(), torch.tensor([nq])]
    return torch.cat(edges).to(torch.int32)


def _packed_attention(query, key, value, offsets, causal, scaling, softcap, kwargs, sinks=None):
    """(B=1, H, T, D) packed sequences through attnkit.varlen_attention -> (1, H, T, Dv)."""
    window = kwargs.get("sliding_window")  # a query sees itself and the sliding_window - 1 keys before it
    out = attnkit.varlen_attention(
        query[0], key[0], value[0], offsets, offsets, causal=causal, scale=scaling, softcap=softcap,
        window=(int(window) - 1, None) if window else None, sinks=sinks,
    )  # fmt: skip
    return out[None]


def attention_forward(
    module,
    query,
    key,
    value,
    attention_mask,
    scaling=None,
    dropout=0.0,
    **kwargs,
):
    """transformers' attention-function signature, computed by attnkit.

    Args:
        module: the calling attention layer; read for ``training`` and
            ``is_causal`` (and ``config.output_attentions`` when the call
            does not say).
        query: (B, Hq, Sq, D); key, value: (B, Hkv, Sk, D), Hq a multiple of
            Hkv (grouped-query attention: query head h reads kv head
            h // (Hq // Hkv), as transformers' repeat_kv does; nothing is copied).
        attention_mask: None, boolean (True = may attend) or additive float,
            broadcastable to (B, Hq, Sq, Sk); a longer key axis is cut to Sk.
        scaling: factor on q.k (None: 1/sqrt(D)).
        dropout: attention dropout probability, applied only while
            ``module.training``.
        **kwargs: ``is_causal`` (else ``module.is_causal``), ``softcap``,
            ``s_aux`` (gpt-oss's learned sinks, one logit per head: attnkit's
            ``sinks``), ``position_bias`` (additive, as T5-style models pass it),
            ``output_attentions``; anything else is ignored, as by torch's
            SDPA integration (a sliding window, for one, already lives in the mask).

    Returns:
        (out, weights): out (B, Sq, Hq, Dv) contiguous; weights (B, Hq, Sq, Sk)
        when attentions were asked for, else None. With dropout active the
        weights returned are those before dropout.
    """
    for observer in _OBSERVERS:
        observer(module, query, key, value)
    sinks = kwargs.get("s_aux")  # gpt-oss: (Hq,) logits joining every row's softmax
    nq, nk = query.shape[-2], key.shape[-2]
    mask = attention_mask
    if mask is not None and mask.shape[-1] > nk:
        mask = mask[..., :nk]

    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    # As with torch's SDPA integration: a causal layer receives mask=None only
    # when top-left causality is exactly right (Sq == Sk, or an empty static
    # cache); a single query attends to every cached key.
    causal = bool(is_causal) and mask is None and nq > 1

    position_bias = kwargs.get("position_bias")
    if position_bias is not None:
        if causal:
            mask, causal = _fold_causal(mask, nq, nk, query.device), False
        mask = _add_bias(mask, position_bias[..., :nk])

    softcap = kwargs.get("softcap")
    want_weights = _weights_requested(module, kwargs)
    dropout_p = float(dropout or 0.0) if getattr(module, "training", False) else 0.0

    weights = None
    if dropout_p > 0:
        if softcap is not None:
            raise NotImplementedError(
                "attnkit does not combine softcap with attention dropout; set the model's "
                "attention dropout to 0 or put it in eval mode"
            )
        if causal and mask is not None:  # pragma: no cover - excluded above
            mask, causal = _fold_causal(mask, nq, nk, query.device), False
        out = attnkit.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout_p, is_causal=causal,
            scale=scaling, enable_gqa=True, sinks=sinks,
        )
        if want_weights:
            weights = _weights(query, key, value, mask, causal, scaling, softcap, sinks=sinks)
    elif want_weights:
        out, weights = _weights(query, key, value, mask, causal, scaling, softcap, with_output=True, sinks=sinks)
    elif position_bias is None and (offsets := _packed_offsets(kwargs, query.shape[0], nq, nk)) is not None:
        out = _packed_attention(query, key, value, offsets, bool(is_causal), scaling, softcap, kwargs, sinks)
    else:
        out = attnkit.attention(
            query, key, value, causal=causal, mask=mask, scale=scaling, softcap=softcap, sinks=sinks,
            backend="auto",
        )
    if _REMOVED:
        out = _without_removed_heads(module, out)
    return out.transpose(1, 2).contiguous(), weights


def _weights(query, key, value, mask, causal, scaling, softcap, with_output=False, sinks=None):
    """attnkit.attention with return_weights=True; (out, weights) or weights.

    Only the NumPy reference forms the weight matrix, so "auto" picks it: that
    is what was asked for, not a silent slowdown, and its fallback warning is
    logged at debug level instead of raised.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AttnkitFallbackWarning)
        out, weights = attnkit.attention(
            query, key, value, causal=causal, mask=mask, scale=scaling, softcap=softcap, sinks=sinks,
            return_weights=True, backend="auto",
        )
    log.debug("attention weights requested: computed by the reference backend")
    return (out, weights) if with_output else weights
