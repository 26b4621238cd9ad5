"""attnkit: exact attention, from a NumPy specification to fused kernels.

    attnkit.attention(q, k, v, causal=..., mask=..., ...)        the full contract
    attnkit.scaled_dot_product_attention(query, key, value, ...)  torch's drop-in
    attnkit.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k) packed sequences of different lengths
    attnkit.flash_attn                                            flash-attn's functions, on every device
    attnkit.flex_attention(q, k, v, score_mod=, block_mask=)      FlexAttention's, with a CPU backward
    attnkit.explain(q, k, v, ...)                                 which backend, and why
    attnkit.reference                                             the NumPy specification
"""

__version__ = "0.1.0"

import os as _os

# In a source checkout kernels/, reference/ and bench/ sit beside this folder and
# setup.cfg maps them into attnkit when installed. Seeing them here as well keeps
# `python -m ...` from the checkout's root (where this folder shadows the
# installed mapping) importing the same files.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout, "setup.cfg")) and _os.path.isdir(
    _os.path.join(_checkout, "reference")
):
    __path__.append(_checkout)

from .api import (
    attention,
    attention_backward,
    attention_forward,
    available_backends,
    explain,
    scaled_dot_product_attention,
    warmup,
)
from .backends import AttnkitFallbackWarning
from .flex import create_block_mask, flex_attention
from .varlen import varlen_attention

__all__ = [
    "AttnkitFallbackWarning",
    "attention",
    "attention_backward",
    "attention_forward",
    "available_backends",
    "create_block_mask",
    "explain",
    "flex_attention",
    "scaled_dot_product_attention",
    "varlen_attention",
    "warmup",
]
