"""attnkit inside five decoder architectures built from configs (random weights):
Llama (GQA), Mistral (sliding window), Gemma2 (softcap and sliding window), Qwen2, GPT-2.

For each, on a left-padded batch, attnkit's logits at the real tokens equal those
of transformers' own attention (sdpa; eager for Gemma2, whose softcap sdpa cannot
apply), and greedy generate() with a KV cache picks the same tokens.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attnkit.integrations import transformers as integration  # noqa: E402

VOCAB = 101


def small(config_class, **fields):
    return lambda: config_class(vocab_size=VOCAB, pad_token_id=0, **fields)


ARCHITECTURES = {
    "llama-gqa": (transformers.LlamaForCausalLM, "sdpa", small(
        transformers.LlamaConfig, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2)),
    "mistral-window": (transformers.MistralForCausalLM, "sdpa", small(
        transformers.MistralConfig, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, sliding_window=6,
        initializer_range=0.2)),
    "gemma2-softcap": (transformers.Gemma2ForCausalLM, "eager", small(
        transformers.Gemma2Config, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        sliding_window=6, attn_logit_softcapping=2.0, final_logit_softcapping=30.0, initializer_range=0.2)),
    "qwen2": (transformers.Qwen2ForCausalLM, "sdpa", small(
        transformers.Qwen2Config, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128, initializer_range=0.2)),
    "gpt2": (transformers.GPT2LMHeadModel, "sdpa", small(
        transformers.GPT2Config, n_embd=64, n_layer=2, n_head=4, n_positions=128, initializer_range=0.2)),
}


def build(name):
    model_class, peer, make_config = ARCHITECTURES[name]
    integration.register()
    torch.manual_seed(0)
    state = model_class(make_config()).state_dict()
    models = {}
    for implementation in (peer, "attnkit"):
        model = model_class._from_config(copy.deepcopy(make_config()), attn_implementation=implementation)
        model.load_state_dict(state)
        models[implementation] = model.eval()
    return models[peer], models["attnkit"]


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_architecture_matches_its_own_attention(name):
    peer, ours = build(name)
    torch.manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, 17))
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0  # left padding, as generate() pads
    ids[2, :11], mask[2, :11] = 0, 0
    with torch.no_grad():
        want = peer(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    error = (got - want)[real].abs().max().item()
    assert error <= 2e-5, f"{name}: logits differ by {error:.3g} at real tokens"

    prompt, prompt_mask = ids[1:], mask[1:]
    runs = [
        model.generate(prompt, attention_mask=prompt_mask, max_new_tokens=8, do_sample=False,
                       pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        for model in (peer, ours)
    ]
    assert torch.equal(runs[0].sequences, runs[1].sequences), f"{name}: greedy tokens differ"
    for step, (a, b) in enumerate(zip(runs[0].scores, runs[1].scores)):
        assert (a - b).abs().max() <= 2e-4, f"{name}: scores of step {step} differ"


@pytest.mark.parametrize("name", ["gemma2-softcap", "llama-gqa", "mistral-window", "qwen2"])
def test_packed_batch_equals_sequences_one_by_one(name, monkeypatch):
    """DataCollatorWithFlattening's layout (one row, position_ids restarting) runs through
    attnkit.varlen_attention and gives each sequence what it gets alone."""
    _, ours = build(name)
    torch.manual_seed(2)
    lengths = [9, 1, 17, 5]
    sequences = [torch.randint(1, VOCAB, (1, n)) for n in lengths]
    packed = torch.cat(sequences, dim=1)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    calls = []
    real_varlen = integration.attnkit.varlen_attention
    monkeypatch.setattr(integration.attnkit, "varlen_attention", lambda *a, **k: calls.append(1) or real_varlen(*a, **k))
    with torch.no_grad():
        got = ours(input_ids=packed, position_ids=positions).logits[0]
        assert calls, "the packed batch did not go through varlen_attention"
        want = torch.cat([ours(input_ids=ids).logits[0] for ids in sequences])
    error = (got - want).abs().max().item()
    assert error <= 2e-5, f"{name}: packed logits differ from one-by-one by {error:.3g}"
