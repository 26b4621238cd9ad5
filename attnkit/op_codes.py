"""The one table of option codes shared by attnkit's torch operators (attnkit.torch_ops, both devices).

torch.library operators take plain numbers, so a spec's options travel as
(scale, causal code, align code, window_left, window_right, softcap,
dropout_p, dropout_seed) with
causal coded 0 (none), 1 ("top_left", torch's is_causal) and 2
("bottom_right"), and align (where queries sit among the keys, for the window
and ALiBi) coded 1 or 2 the same way.
"""

from __future__ import annotations

__all__ = ["CAUSAL_CODES", "CAUSAL_NAMES", "operator_options", "window_of"]

CAUSAL_CODES = {None: 0, False: 0, True: 1, "top_left": 1, "bottom_right": 2}
CAUSAL_NAMES = {0: None, 1: "top_left", 2: "bottom_right"}


def operator_options(spec, dropout=None):
    """A validated spec's options, and the call's attnkit.dropout.Dropout or None, in the operators'
    positional form (no dropout: probability 0, seed 0)."""
    left, right = spec.window or (None, None)
    p, seed = (0.0, 0) if dropout is None else dropout
    return spec.scale, CAUSAL_CODES[spec.causal], CAUSAL_CODES[spec.align], left, right, spec.softcap, p, seed


def window_of(window_left, window_right):
    """The operators' two window sides back as attnkit's window (None when both are unlimited)."""
    return None if window_left is None and window_right is None else (window_left, window_right)
