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


# Pronouns whose antecedent a head may find: the page opens on the first one when the text has one.
PRONOUNS = frozenset("it its he him his she her they them their this that".split())
SPECIAL_TOKENS = frozenset({"[CLS]", "[SEP]", "<s>", "</s>"})


def _strongest_link(weights, tokens, query):
    """(weight, key) of the query's largest weight on another, ordinary token (not itself, not [CLS]/[SEP])."""
    candidates = [k for k, token in enumerate(tokens) if k != query and token not in SPECIAL_TOKENS]
    if not candidates:
        return 0.0, None
    key = max(candidates, key=lambda k: weights[query, k])
    return float(weights[query, key]), key


def default_start(attention, layer, head=None, query=None):
    """(head, query, reason): what the page opens on when not told, so that it shows something.

    The query is the first pronoun (its head usually finds what it refers to), else the token whose
    attention is most concentrated on one other token; the head is the one of `layer` that puts the
    most of that query's attention on one other token. Either may be given; reason says why, in words.
    """
    tokens = list(attention.tokens)
    ordinary = [i for i, token in enumerate(tokens) if token not in SPECIAL_TOKENS]
    if not ordinary:
        return head or 0, query, "nothing to point at: the text has no ordinary tokens"
    heads = range(attention.heads) if head is None else [head]
    why_query = "given"
    if query is None:
        pronouns = [i for i in ordinary if tokens[i].casefold() in PRONOUNS]
        if pronouns:
            query, why_query = pronouns[0], "the first pronoun"
        else:
            query = max(ordinary, key=lambda i: max(_strongest_link(attention.weights[layer, h], tokens, i)[0]
                                                   for h in heads))  # fmt: skip
            why_query = "the token whose attention is most concentrated"
    links = {h: _strongest_link(attention.weights[layer, h], tokens, query) for h in heads}
    head = max(links, key=lambda h: links[h][0])
    weight, key = links[head]
    reason = f"Opened on {tokens[query]!r} ({why_query}) and head {head}"
    if key is not None:
        reason += (f", which puts {weight:.2f} of its attention on {tokens[key]!r}"
                   + (f", the most of any head in layer {layer}" if len(heads) > 1 else ""))  # fmt: skip
    return head, query, reason + "."


def render_html(attention, *, layer=None, head=None, query=None, all_heads=False):
    """The page as a string. layer (default: the last), head, query and all_heads set what shows first;
    a head or query not given is chosen by default_start, and the page says why."""
    from .. import __version__

    layers, heads = attention.layers, attention.heads
    layer = layers - 1 if layer is None else layer
    if not 0 <= layer < layers:
        raise ValueError(f"layer must be in 0..{layers - 1} (0-based); got {layer}")
    if head is not None and not 0 <= head < heads:
        raise ValueError(f"head must be in 0..{heads - 1} (0-based); got {head}")
    query = find_token(attention.tokens, query)
    reason = None
    if head is None or query is None:
        head, query, reason = default_start(attention, layer, head, query)
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
            "query": query, "reason": reason,
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
