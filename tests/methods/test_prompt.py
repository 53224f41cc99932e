"""Prompt tuning (unipeft.methods.prompt): parity with HF peft's PromptTuningConfig, the three inits, generation
with a KV cache, parameter counts.

The shared invariants (init behaviour, merge refused, detach, grads, save/load, training) run over the ``prompt``
recipe on every family in tests/core/test_sequence.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

import unipeft
from unipeft.core.recipe import DeltaSpec, Recipe
from unipeft.methods.prompt import Prompt, PromptConfig


def _recipe(length: int = 4, **form) -> Recipe:
    return Recipe(name="prompt", family="additive",
                  deltas=(DeltaSpec(form=PromptConfig(length=length, **form), positions=("embed",)),))


def _form(peft: unipeft.Peft) -> Prompt:
    (_, placed), = peft.delta_modules()
    return placed.form


def _pair(model, task_type: str, length: int = 4):
    """(unipeft handle, HF peft model) on copies of ``model`` with the same prompt."""
    hf = get_peft_model(copy.deepcopy(model), PromptTuningConfig(task_type=task_type, num_virtual_tokens=length))
    peft = unipeft.attach(model, _recipe(length))
    with torch.no_grad():
        _form(peft).prompt.copy_(hf.prompt_encoder["default"].embedding.weight)
    return peft, hf


def test_same_prompt_gives_hf_peft_logits_and_loss_on_llama(tiny):
    model = tiny.model("llama")
    batch = tiny.batch("llama")
    mask = torch.ones_like(batch["input_ids"])
    mask[0, :2] = 0
    peft, hf = _pair(model, "CAUSAL_LM")
    with torch.no_grad():
        theirs = hf(**batch, attention_mask=mask)
        ours = model(**batch, attention_mask=mask)
    assert ours.logits.shape == theirs.logits.shape == (2, 4 + 7, tiny.vocab)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-6, rtol=0)
    assert peft.summary().trainable == hf.get_nb_trainable_parameters()[0] == 4 * tiny.width


def test_same_prompt_gives_hf_peft_logits_on_bert_classification(tiny):
    model = tiny.model("bert")
    batch = tiny.batch("bert")
    types = torch.zeros_like(batch["input_ids"])
    _, hf = _pair(model, "SEQ_CLS")
    with torch.no_grad():
        theirs = hf(**batch, token_type_ids=types)
        ours = model(**batch, token_type_ids=types)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-6, rtol=0)


def test_vocab_init_copies_embedding_rows(tiny):
    model = tiny.model("llama")
    prompt = _form(unipeft.attach(model, _recipe(6))).prompt
    table = model.get_input_embeddings().weight
    assert all(any(torch.equal(row, t) for t in table) for row in prompt)


def test_bart_vocab_init_goes_through_the_scaled_embedding(tiny):
    config = tiny.config("bart")
    config.scale_embedding = True
    model = type(tiny.model("bart"))(config).eval()
    prompt = _form(unipeft.attach(model, _recipe(3))).prompt
    embedding = model.get_input_embeddings()
    scale = embedding.base.embed_scale
    assert scale != 1.0
    assert all(any(torch.allclose(row, t * scale) for t in embedding.weight) for row in prompt)


def test_random_init_has_the_embeddings_scale(tiny):
    torch.manual_seed(0)
    model = tiny.model("gpt2")
    prompt = _form(unipeft.attach(model, _recipe(200, init="random"))).prompt
    std = model.get_input_embeddings().weight.std().item()
    assert abs(prompt.std().item() - std) < 0.2 * std


def test_text_init_matches_hf_peft(minilm_folder):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(minilm_folder, num_labels=2)
    text = "classify the sentiment of this review:"
    hf = get_peft_model(copy.deepcopy(model), PromptTuningConfig(
        task_type="SEQ_CLS", num_virtual_tokens=12, prompt_tuning_init=PromptTuningInit.TEXT,
        prompt_tuning_init_text=text, tokenizer_name_or_path=minilm_folder))
    peft = unipeft.attach(model, _recipe(12, init="text", text=text, tokenizer=minilm_folder))
    torch.testing.assert_close(_form(peft).prompt, hf.prompt_encoder["default"].embedding.weight, atol=0, rtol=0)


def test_config_validation():
    with pytest.raises(ValueError, match="needs both 'text' and 'tokenizer'"):
        PromptConfig(init="text", text="hello")
    with pytest.raises(ValueError, match="unknown prompt init"):
        PromptConfig(init="zeros")
    with pytest.raises(ValueError, match="length must be >= 1"):
        PromptConfig(length=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])
def test_generation_with_a_cache_equals_generation_without(tiny, family):
    model = tiny.model(family)
    unipeft.attach(model, _recipe(5))
    ids = tiny.batch(family)["input_ids"]
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    outputs = []
    for use_cache in (True, False):
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                                 do_sample=False, pad_token_id=0, use_cache=use_cache, output_scores=True,
                                 return_dict_in_generate=True)
        outputs.append((out.sequences, torch.stack(out.scores)))
    assert torch.equal(outputs[0][0], outputs[1][0])
    assert outputs[0][0].shape[1] == ids.shape[1] + 6 if family != "t5" else True  # no virtual tokens returned
    torch.testing.assert_close(outputs[0][1], outputs[1][1], atol=1e-4, rtol=0)


def test_generation_matches_hf_peft(tiny):
    model = tiny.model("llama")
    ids = tiny.batch("llama")["input_ids"]
    _, hf = _pair(model, "CAUSAL_LM", length=5)
    with torch.no_grad():
        ours = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        theirs = hf.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)
