"""How many of MiniLM's heads can go? Remove heads and measure how far sentence embeddings move.

    attnkit viz --ablate [-o ablation.html] [--seed 0] [--candidates 12]

The model is all-MiniLM-L6-v2 (6 layers x 12 heads), its sentence embedding
the mean of its last hidden states over the sentence's tokens, normalised (as
sentence-transformers pools it). A removed head's output is replaced by zeros
in every call (attnkit.integrations.transformers.remove_heads), as if pruned.

Two measurements, over the built-in sentence pairs below:
- single: each of the 72 heads removed on its own; the change is
  1 - (mean cosine similarity between each sentence's embedding with and
  without the head);
- greedy: heads removed one after another, each time the candidate whose
  removal moves the embeddings least (candidates: `candidates` heads drawn at
  random, with `seed`, from those left; all of them when candidates >= the
  number left), until the change passes `threshold` (1%). Along the way, the
  Spearman correlation between the pairs' similarities with and without the
  removed heads says whether the model still ranks the pairs the same way.
Deterministic for a given seed. This is measured, not claimed: the numbers in
the page and in docs/ablation.md come from running it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Pairs from near-paraphrase to unrelated: their similarities spread out, so
# that a change in their ranking is visible.
SENTENCE_PAIRS = [
    ("A man is playing a guitar.", "Someone plays an acoustic guitar."),
    ("The cat sat on the mat.", "A cat is sitting on a rug."),
    ("The train was late this morning.", "This morning's train arrived behind schedule."),
    ("She bought fresh bread at the bakery.", "He ordered coffee at the station."),
    ("Interest rates rose again in March.", "The central bank raised rates in spring."),
    ("The children built a sandcastle.", "Kids made a castle out of sand on the beach."),
    ("The server crashed during the update.", "Our deployment failed because the machine went down."),
    ("He is reading a novel in the park.", "The stock market closed lower today."),
    ("Rain is expected tomorrow afternoon.", "Tomorrow will be sunny and dry."),
    ("The museum opens at nine.", "A dog chased the ball across the field."),
    ("She plays the violin in an orchestra.", "The violinist performs with a symphony."),
    ("Turn left at the second traffic light.", "Quantum computers use qubits."),
]


@dataclass
class AblationResult:
    """What the experiment measured (all plain numbers, for the page and for JSON)."""

    seed: int
    threshold: float
    candidates: int
    single: list = field(default_factory=list)  # [(layer, head, change)] for every head alone
    greedy: list = field(default_factory=list)  # [(layer, head, change, spearman)] in removal order
    heads_within_threshold: int = 0  # how many heads the greedy order removes before the change passes the threshold
    baseline_spearman: float = 1.0

    def as_dict(self):
        return {
            "seed": self.seed, "threshold": self.threshold, "candidates": self.candidates,
            "single": [list(x) for x in self.single], "greedy": [list(x) for x in self.greedy],
            "heads_within_threshold": self.heads_within_threshold,
        }


def _spearman(a, b):
    """Spearman rank correlation (no ties in practice: similarities are floats)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


class _Embedder:
    """Sentence embeddings of the built-in sentences, with any set of heads removed."""

    def __init__(self):
        import torch

        from ..integrations.transformers import remove_heads
        from .weights import load_pretrained

        self.torch, self.remove_heads = torch, remove_heads
        self.tokenizer, self.model = load_pretrained()
        sentences = [s for pair in SENTENCE_PAIRS for s in pair]
        self.batch = self.tokenizer(sentences, padding=True, return_tensors="pt")
        self.layers = self.model.config.num_hidden_layers
        self.heads = self.model.config.num_attention_heads
        self.full = self(())

    def __call__(self, removed):
        """(2 * pairs, width) unit-norm embeddings with the heads in `removed` zeroed."""
        with self.torch.no_grad(), self.remove_heads(removed):
            hidden = self.model(**self.batch).last_hidden_state  # (S, T, W)
        mask = self.batch["attention_mask"][..., None].to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return self.torch.nn.functional.normalize(pooled, dim=-1).numpy().astype(np.float64)

    def change(self, embeddings):
        """1 - mean cosine similarity to the full model's embeddings of the same sentences."""
        return float(1.0 - np.mean(np.sum(embeddings * self.full, axis=1)))

    @staticmethod
    def pair_similarities(embeddings):
        return np.sum(embeddings[0::2] * embeddings[1::2], axis=1)


def run_ablation(*, seed=0, threshold=0.01, candidates=12, max_removed=None, heads=None, progress=None):
    """The experiment (see the module docstring); returns an AblationResult.

    heads limits it to those (layer, head) pairs (default: all 72); max_removed
    stops the greedy walk early (both for quick runs and tests); progress, if
    given, is called as progress(label) after each step.
    """
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1); got {threshold}")
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1; got {candidates}")
    embed = _Embedder()
    all_heads = [(l, h) for l in range(embed.layers) for h in range(embed.heads)]
    if heads is not None:
        unknown = [x for x in heads if tuple(x) not in all_heads]
        if unknown:
            raise ValueError(f"heads must be (layer, head) pairs of the model's {embed.layers} x {embed.heads}; got {unknown}")
        all_heads = [tuple(x) for x in heads]
    result = AblationResult(seed=seed, threshold=threshold, candidates=candidates)
    full_pairs = embed.pair_similarities(embed.full)
    result.baseline_spearman = _spearman(full_pairs, full_pairs)
    for head in all_heads:
        result.single.append((*head, round(embed.change(embed((head,))), 6)))
        if progress:
            progress(f"single head {head}")

    rng = np.random.default_rng(seed)
    removed, left = [], list(all_heads)
    limit = len(all_heads) if max_removed is None else max_removed
    while left and len(removed) < limit:
        pool = left if candidates >= len(left) else [left[i] for i in sorted(rng.choice(len(left), candidates, replace=False))]
        scored = []
        for head in pool:
            embeddings = embed(removed + [head])
            scored.append((embed.change(embeddings), head, embeddings))
        change, head, embeddings = min(scored, key=lambda x: (x[0], x[1]))
        removed.append(head)
        left.remove(head)
        spearman = _spearman(full_pairs, embed.pair_similarities(embeddings))
        result.greedy.append((*head, round(change, 6), round(spearman, 6)))
        if change <= threshold:
            result.heads_within_threshold = len(removed)
        if progress:
            progress(f"greedy step {len(removed)}: layer {head[0]} head {head[1]}, change {100 * change:.3f}%")
        if change > threshold:
            break
    return result


def summary_lines(result):
    """A few lines of text on what was measured."""
    single = sorted(result.single, key=lambda x: x[2])
    lines = [
        f"Heads removed one at a time: the least missed is layer {single[0][0]} head {single[0][1]} "
        f"(embeddings move {100 * single[0][2]:.3f}%), the most missed layer {single[-1][0]} head "
        f"{single[-1][1]} ({100 * single[-1][2]:.2f}%).",
        f"Removed greedily (seed {result.seed}, {result.candidates} candidates per step): "
        f"{result.heads_within_threshold} of {len(result.single)} heads go before the embeddings move "
        f"more than {100 * result.threshold:g}%.",
    ]
    if result.greedy:
        last_ok = result.greedy[max(0, result.heads_within_threshold - 1)]
        lines.append(f"With those {result.heads_within_threshold} heads gone, the pairs' similarity ranking "
                     f"keeps a Spearman correlation of {last_ok[3]:.3f} with the full model's.")
    return lines


def write_record(directory, result):
    """docs/ablation.md (the numbers) and docs/ablation.png (the figure, with matplotlib)."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    changes = [100 * x[2] for x in result.greedy]
    left.plot(range(1, len(changes) + 1), changes, marker="o", ms=3)
    left.axhline(100 * result.threshold, color="grey", ls="--", lw=1)
    left.set(xlabel="heads removed (greedy order)", ylabel="embedding change (%)",
             title=f"Greedy removal, seed {result.seed}")
    single = np.array([[x[0], x[1], 100 * x[2]] for x in result.single])
    layers, heads = int(single[:, 0].max()) + 1, int(single[:, 1].max()) + 1
    grid = np.full((layers, heads), np.nan)
    grid[single[:, 0].astype(int), single[:, 1].astype(int)] = single[:, 2]
    image = right.imshow(grid, cmap="viridis")
    right.set(xlabel="head", ylabel="layer", title="One head removed: change (%)")
    figure.colorbar(image, ax=right)
    figure.tight_layout()
    figure.savefig(directory / "ablation.png", dpi=110)
    plt.close(figure)
    lines = ["# Head ablation in all-MiniLM-L6-v2", "",
             f"`python -m attnkit.viz.ablation --seed {result.seed} --candidates {result.candidates} "
             f"--out {directory}` (the same numbers as `attnkit viz TEXT --ablate --seed {result.seed}`).", "",
             *summary_lines(result), "", "![ablation](ablation.png)", "",
             "| step | layer | head | change | Spearman of pair similarities |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {i} | {l} | {h} | {100 * c:.3f}% | {r:.3f} |" for i, (l, h, c, r) in enumerate(result.greedy, 1)]
    (directory / "ablation.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv=None):
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m attnkit.viz.ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--candidates", type=int, default=12, help="heads tried per greedy step (default 12)")
    parser.add_argument("--threshold", type=float, default=0.01, help="embedding change to stop at (default 0.01)")
    parser.add_argument("--out", default="docs", help="folder for ablation.md and ablation.png (default docs)")
    args = parser.parse_args(argv)
    result = run_ablation(seed=args.seed, threshold=args.threshold, candidates=args.candidates,
                          progress=lambda label: print(label, file=sys.stderr, flush=True))
    write_record(args.out, result)
    print("\n".join(summary_lines(result)))


if __name__ == "__main__":
    main()
