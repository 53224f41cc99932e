"""The pure mapping parts: HF config → unipeft recipe, unipeft adapter → HF config, and HF's matching rules."""

from __future__ import annotations

import pytest
import torch

import unipeft
from unipeft.core.recipe import Recipe
from unipeft.interop import hf_config_to_recipe, load_hf_adapter, recipe_to_hf_config, save_hf_adapter
from unipeft.interop.hf_match import compress_targets, hf_targets, layer_index, pattern_value


def test_lora_config_maps_to_module_patterns(tiny):
    recipe = hf_config_to_recipe({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
                                  "target_modules": ["query", "value"], "use_rslora": True}, tiny.model("bert"))
    (spec,) = recipe.deltas
    assert spec.modules == ("query", "value") and not spec.positions
    assert (spec.form.r, spec.form.alpha, spec.form.dropout, spec.form.rslora) == (4, 8.0, 0.1, True)
    assert Recipe.from_dict(recipe.to_dict()) == recipe


def test_rank_and_alpha_patterns_split_into_one_delta_per_value(tiny):
    recipe = hf_config_to_recipe({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                                  "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"model.layers.1.self_attn.q_proj": 3}},
                                 tiny.model("llama"))
    got = {(s.form.r, s.form.alpha): s.modules for s in recipe.deltas}
    assert got == {(4, 8.0): ("model.layers.0.self_attn.q_proj",),
                   (2, 8.0): ("model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"),
                   (4, 3.0): ("model.layers.1.self_attn.q_proj",)}


def test_modules_to_save_and_bias_become_copy_and_bias_deltas(tiny):
    recipe = hf_config_to_recipe({"peft_type": "LORA", "r": 4, "target_modules": ["query"], "bias": "lora_only",
                                  "modules_to_save": ["classifier"]}, tiny.model("bert"))
    kinds = [(s.form.type, s.resolved_insertion, s.modules) for s in recipe.deltas]
    assert kinds == [("lora", "parallel", ("query",)), ("copy", "replace", ("classifier",)),
                     ("bias", "parallel", ("bert.encoder.layer.0.attention.self.query",
                                           "bert.encoder.layer.1.attention.self.query"))]


def test_ia3_feedforward_modules_scale_the_input(tiny):
    recipe = hf_config_to_recipe({"peft_type": "IA3", "target_modules": ["k_proj", "down_proj"],
                                  "feedforward_modules": ["down_proj"]}, tiny.model("llama"))
    assert [(s.resolved_insertion, len(unipeft.core.positions.resolve_patterns(tiny.model("llama"), s.modules)))
            for s in recipe.deltas] == [("multiplicative", 2), ("multiplicative_input", 2)]


def test_builtin_lora_maps_to_hf_target_suffixes_and_layers(tiny):
    handle = unipeft.attach(tiny.model("llama"), "lora", layers=[-1])
    config = recipe_to_hf_config(handle.recipes["default"], handle, "default")
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["layers_to_transform"] == [1]
    assert (config["r"], config["lora_alpha"], config["rank_pattern"], config["alpha_pattern"]) == (8, 16, {}, {})


def test_hf_matching_rules():
    assert layer_index("model.layers.3.self_attn.q_proj", None) == 3
    assert layer_index("encoder.block.2.layer.0.SelfAttention.q", "block") == 2
    assert pattern_value({"v_proj": 2}, "model.layers.0.self_attn.v_proj", 8) == 2
    assert pattern_value({"v_proj": 2}, "model.layers.0.self_attn.q_proj", 8) == 8


def test_compress_targets_falls_back_to_full_names(tiny):
    model = tiny.model("bert")
    names = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.key"]
    fields = compress_targets(names, lambda f: hf_targets(f, model))
    assert sorted(hf_targets(fields, model)) == sorted(names)
    assert fields == {"target_modules": names}


def test_loaded_hf_adapter_saves_and_loads_as_a_unipeft_adapter(tmp_path, tiny):
    peft = pytest.importorskip("peft")
    base = tiny.model("bert")
    hf_model = peft.get_peft_model(tiny.model("bert"), peft.LoraConfig(r=4, target_modules=["query"], bias="all",
                                                                       modules_to_save=["classifier"]))
    with torch.no_grad():
        for p in hf_model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    hf_model.save_pretrained(tmp_path / "hf")
    handle = load_hf_adapter(base, tmp_path / "hf")
    batch = tiny.batch("bert")
    want = tiny.logits(base, batch)
    handle.save(tmp_path / "u")
    again = unipeft.load_adapter(tiny.model("bert"), tmp_path / "u")
    assert torch.equal(tiny.logits(again.model, batch), want)
    save_hf_adapter(again, tmp_path / "hf2")
    assert (tmp_path / "hf2" / "adapter_model.safetensors").is_file()


def test_hf_adapter_joins_existing_adapters_and_a_name_clash_keeps_them(tmp_path, tiny):
    peft = pytest.importorskip("peft")
    peft.get_peft_model(tiny.model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "hf")
    model = tiny.model("llama")
    handle = unipeft.attach(model, "ia3")
    assert load_hf_adapter(model, tmp_path / "hf", name="hf") is handle
    assert handle.active == ["default", "hf"]
    with pytest.raises(ValueError, match="already exists"):
        load_hf_adapter(model, tmp_path / "hf", name="hf")
    assert list(handle.recipes) == ["default", "hf"] and handle.active == ["default", "hf"]


def test_legacy_modules_to_save_keys_are_read(tmp_path, tiny):
    """peft < 0.14 saved a copied module as ``classifier.modules_to_save.weight``; 0.21 as ``classifier.weight``."""
    from safetensors.torch import load_file, save_file

    peft = pytest.importorskip("peft")
    hf_model = peft.get_peft_model(tiny.model("bert"), peft.LoraConfig(r=2, target_modules=["query"],
                                                                       modules_to_save=["classifier"]))
    with torch.no_grad():
        hf_model.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
    hf_model.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "adapter_model.safetensors"
    tensors = {k.replace("classifier.", "classifier.modules_to_save."): v for k, v in load_file(path).items()}
    save_file(tensors, path)
    model = tiny.model("bert")
    load_hf_adapter(model, tmp_path / "hf")
    batch = tiny.batch("bert")
    assert torch.allclose(tiny.logits(model, batch), tiny.logits(hf_model.eval(), batch), atol=1e-6)
