"""One self-contained HTML page from AttentionWeights.

The page's markup, style and script are in template.html (package data); the
data go into a JSON block inside it, the weights as base64 float32, so the
file needs nothing but itself: no network, no server, no other file.
"""

from __future__ import annotations

import base64
import json
from importlib import resources
from pathlib import Path

import numpy as np

PLACEHOLDER = "/*__ATTNKIT_DATA__*/"


def _template():
    return resources.files(__package__).joinpath("template.html").read_text(encoding="utf-8")


def find_token(tokens, query):
    """Index of `query` in tokens: an int index, or the first token equal to it (case-insensitive)."""
    if query is None:
        return None
    if isinstance(query, int) or (isinstance(query, str) and query.lstrip("-").isdigit()):
        index = int(query)
        if not -len(tokens) <= index < len(tokens):
            raise ValueError(f"query index {index} is outside the {len(tokens)} tokens")
        return index % len(tokens)
    wanted = str(query).casefold()
    for index, token in enumerate(tokens):
        if token.casefold() == wanted:
            return index
    raise ValueError(f"query {query!r} is not one of the tokens: {' '.join(tokens)}")


def render_html(attention, *, layer=None, head=0, query=None, all_heads=False):
    """The page as a string. layer (default: the last), head, query and all_heads set what shows first."""
    from .. import __version__

    layers, heads = attention.layers, attention.heads
    layer = layers - 1 if layer is None else layer
    if not 0 <= layer < layers:
        raise ValueError(f"layer must be in 0..{layers - 1} (0-based); got {layer}")
    if not 0 <= head < heads:
        raise ValueError(f"head must be in 0..{heads - 1} (0-based); got {head}")
    from .weights import head_patterns

    weights = np.ascontiguousarray(attention.weights, dtype="<f4")
    qkv = None if attention.qkv is None else np.ascontiguousarray(attention.qkv, dtype="<f4")
    data = {
        "text": attention.text,
        "tokens": list(attention.tokens),
        "layers": layers,
        "heads": heads,
        "weights_b64": base64.b64encode(weights.tobytes()).decode("ascii"),
        # (3, layers, heads, N, d) float32: the q, k, v each head received, for the step-through
        "qkv_b64": None if qkv is None else base64.b64encode(qkv.tobytes()).decode("ascii"),
        "head_dim": None if qkv is None else int(qkv.shape[-1]),
        "scale": None if attention.scale is None else float(attention.scale),
        "patterns": head_patterns(attention),
        "ablation": attention.ablation,
        "model": attention.model,
        "source": attention.source,
        "random": bool(attention.random),
        "note": attention.note,
        "attnkit_version": __version__,
        "initial": {
            "layer": int(layer), "head": int(head), "all_heads": bool(all_heads),
            "query": find_token(attention.tokens, query),
        },
    }
    # No "<" at all inside the <script> block (so no "</script>" or "<!--" from a
    # token can end or confuse it); "\u003c" reads back as "<" in JSON.
    payload = json.dumps(data, ensure_ascii=False).replace("<", "\\u003c")
    template = _template()
    if template.count(PLACEHOLDER) != 1:  # pragma: no cover - guards edits to the template
        raise RuntimeError("template.html must hold the data placeholder exactly once")
    return template.replace(PLACEHOLDER, payload)


def write_html(path, attention, **options):
    """Write the page to `path` (UTF-8); returns the path. Options as for render_html."""
    path = Path(path)
    path.write_text(render_html(attention, **options), encoding="utf-8")
    return path
