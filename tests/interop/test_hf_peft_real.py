"""The HF peft round trips on the real models: all-MiniLM-L6-v2 (a sequence classifier with a new head, saved as
HF's modules_to_save) on real SST-2 sentences, and SmolLM2-135M (slow)."""

from __future__ import annotations

import copy

import pytest
import torch

import unipeft
from unipeft.core.recipe import Recipe

peft = pytest.importorskip("peft")

SENTENCES = ["a gripping, beautifully acted film", "the plot is thin and the jokes fall flat",
             "an utterly forgettable sequel"]


@pytest.fixture(scope="module")
def minilm(minilm_folder):
    """(MiniLM sequence classifier with a seeded new 2-label head, a tokenised batch of real sentences)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(minilm_folder, num_labels=2).eval()
    batch = dict(AutoTokenizer.from_pretrained(minilm_folder)(SENTENCES, padding=True, return_tensors="pt"))
    return model, batch


@pytest.mark.parametrize("config", [
    dict(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"]),
    pytest.param(dict(r=4, lora_alpha=8, target_modules=["query", "value"], use_dora=True,
                      modules_to_save=["classifier"], bias="lora_only"), marks=pytest.mark.slow),
])
def test_minilm_hf_lora_loads_with_the_same_outputs(hf_check, minilm, config):
    model, batch = minilm
    diff, handle = hf_check.hf_to_unipeft(copy.deepcopy(model), peft.LoraConfig(**config), batch)
    assert diff <= hf_check.tol
    assert any(spec.form.type == "copy" for spec in handle.recipes["default"].deltas)


@pytest.mark.parametrize("recipe", ["lora", pytest.param("ia3", marks=pytest.mark.slow)])
def test_minilm_unipeft_adapter_with_head_loads_in_hf_with_the_same_outputs(hf_check, minilm, recipe):
    model, batch = minilm
    recipe = unipeft.load_recipe(recipe)
    with_head = Recipe.from_dict({**recipe.to_dict(), "deltas": [
        *recipe.to_dict()["deltas"], {"form": {"type": "copy"}, "positions": ["head"], "insertion": "replace"}]})
    diff, config = hf_check.unipeft_to_hf(copy.deepcopy(model), with_head, batch)
    assert diff <= hf_check.tol
    assert config["modules_to_save"] == ["classifier"]


@pytest.fixture(scope="module")
def smollm2():
    from unipeft.models import load_model

    model, tokenizer = load_model("smollm2-135m", kind="causal_lm")
    batch = dict(tokenizer(["What is the capital of France?", "The capital of France is"], padding=True,
                           return_tensors="pt"))
    return model, batch


@pytest.mark.slow
@pytest.mark.parametrize("config", [
    peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    peft.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                         "down_proj"], rank_pattern={"down_proj": 2}, use_rslora=True),
    peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
])
def test_smollm2_hf_adapter_loads_with_the_same_outputs(hf_check, smollm2, config):
    model, batch = smollm2
    diff, _ = hf_check.hf_to_unipeft(copy.deepcopy(model), config, batch)
    assert diff <= hf_check.tol


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["lora", "dora", "ia3", "loha"])
def test_smollm2_unipeft_adapter_loads_in_hf_with_the_same_outputs(hf_check, smollm2, recipe):
    model, batch = smollm2
    diff, _ = hf_check.unipeft_to_hf(copy.deepcopy(model), recipe, batch)
    assert diff <= hf_check.tol
