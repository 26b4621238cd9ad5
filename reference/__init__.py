"""attnkit.reference: the NumPy specification of attention.

Every backend is tested against these functions. See attention.py for the
exact definition (order of scale, softcap, masks; fully masked rows).
"""

from .attention import (
    CAUSAL_MODES,
    attention,
    attention_backward,
    attention_mask_gradient,
    compute_dtype,
    resolve_causal,
    resolve_scale,
    visible_keys,
    visible_range,
)
from .mha import multi_head_attention
from .varlen import varlen_attention, varlen_attention_backward
from .naive import naive_attention

__all__ = [
    "CAUSAL_MODES",
    "attention",
    "attention_backward",
    "attention_mask_gradient",
    "compute_dtype",
    "multi_head_attention",
    "naive_attention",
    "resolve_causal",
    "resolve_scale",
    "varlen_attention",
    "varlen_attention_backward",
    "visible_keys",
    "visible_range",
]
