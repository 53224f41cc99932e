"""LoRA (and DoRA, rsLoRA, PiSSA/OLoRA) between HF peft's file format and unipeft, checked against HF peft itself:
an adapter made by one library and saved in HF's format computes the same outputs in the other."""

from __future__ import annotations

import pytest

from unipeft.core.recipe import DeltaSpec, Recipe
from unipeft.methods.lora import LoRAConfig

peft = pytest.importorskip("peft")


# ------------------------------------------------------------------------------------------ HF → unipeft
@pytest.mark.parametrize("family, config", [
    ("bert", dict(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"], bias="all",
                  layers_to_transform=[1])),
    ("bert", dict(r=4, lora_alpha=8, target_modules=["query", "value", "dense"], rank_pattern={"value": 2},
                  alpha_pattern={"bert.encoder.layer.0.attention.self.query": 3}, use_rslora=True,
                  bias="lora_only")),
    ("llama", dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])),
    ("llama", dict(r=4, target_modules=r".*\.(q_proj|v_proj)", exclude_modules=["model.layers.0.self_attn.q_proj"])),
    ("llama", dict(r=4, target_modules=["q_proj", "embed_tokens"], layers_to_transform=[0], layers_pattern="layers")),
    ("llama", dict(r=4, target_modules="all-linear")),
    ("llama", dict(r=4, target_modules=["q_proj", "v_proj"], use_dora=True)),
    ("gpt2", dict(r=4, target_modules=["c_attn", "c_fc", "wte"], fan_in_fan_out=True)),
    ("gpt2", dict(r=4, target_modules=["c_attn"], use_dora=True, fan_in_fan_out=True)),
    pytest.param("t5", dict(r=4, target_modules=["q", "v", "wo"]), marks=pytest.mark.slow),
])
def test_hf_lora_loads_with_the_same_outputs(hf_check, tiny, family, config):
    diff, handle = hf_check.hf_to_unipeft(tiny.model(family), peft.LoraConfig(**config), tiny.batch(family))
    assert diff <= hf_check.tol
    assert handle.active == ["default"]


@pytest.mark.parametrize("init", ["pissa", pytest.param("olora", marks=pytest.mark.slow)])
def test_hf_lora_with_base_rewriting_init_loads_with_the_same_outputs(hf_check, tiny, init):
    diff, handle = hf_check.hf_to_unipeft(tiny.model("llama"), peft.LoraConfig(
        r=4, target_modules=["q_proj", "o_proj"], init_lora_weights=init), tiny.batch("llama"))
    assert diff <= hf_check.tol
    assert {spec.form.init for spec in handle.recipes["default"].deltas} == {init}


def test_loaded_adapter_detaches_to_the_original_model(hf_check, tiny):
    model = tiny.model("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, handle = hf_check.hf_to_unipeft(model, peft.LoraConfig(r=4, target_modules=["query"],
                                                              modules_to_save=["classifier"]), tiny.batch("bert"))
    handle.detach()
    after = model.state_dict()
    assert before.keys() == after.keys() and all((before[k] == after[k]).all() for k in before)


# ------------------------------------------------------------------------------------------ unipeft → HF
def _recipe(*deltas: DeltaSpec) -> Recipe:
    return Recipe(name="test", family="reparameterized", deltas=deltas)


@pytest.mark.parametrize("recipe, family", [
    ("lora", "bert"), ("lora", "llama"), pytest.param("lora", "t5", marks=pytest.mark.slow), ("rslora", "bert"),
    ("dora", "bert"), pytest.param("dora", "llama", marks=pytest.mark.slow), ("pissa", "llama"),
    pytest.param("olora", "bert", marks=pytest.mark.slow),
])
def test_builtin_recipe_saves_for_hf_with_the_same_outputs(hf_check, tiny, recipe, family):
    diff, config = hf_check.unipeft_to_hf(tiny.model(family), recipe, tiny.batch(family))
    assert diff <= hf_check.tol
    assert config["peft_type"] == "LORA"


def test_gpt2_slices_become_one_whole_module_lora(hf_check, tiny):
    """GPT-2's attn.q and attn.v are slices of the fused c_attn: HF gets one LoRA of rank 2r on c_attn."""
    diff, config = hf_check.unipeft_to_hf(tiny.model("gpt2"), "lora", tiny.batch("gpt2"), r=4)
    assert diff <= hf_check.tol
    assert config["target_modules"] == ["c_attn"] and config["r"] == 8 and config["fan_in_fan_out"] is True


def test_mixed_ranks_layers_scaled_composition_and_embeddings(hf_check, tiny):
    recipe = _recipe(
        DeltaSpec(form=LoRAConfig(r=4, alpha=8.0), positions=("attn.q", "attn.v")),
        DeltaSpec(form=LoRAConfig(r=2, alpha=4.0, rslora=True), positions=("ffn.up",), layers=(-1,)),
        DeltaSpec(form=LoRAConfig(r=2, alpha=2.0), positions=("attn.o",), composition="scaled", scale=3.0),
        DeltaSpec(form=LoRAConfig(r=3, alpha=6.0), positions=("embed",)),
        DeltaSpec(form=LoRAConfig(r=2, alpha=2.0), positions=("attn.q",), layers=(0,)),  # a second LoRA on q
    )
    diff, config = hf_check.unipeft_to_hf(tiny.model("llama"), recipe, tiny.batch("llama"))
    assert diff <= hf_check.tol
    assert config["rank_pattern"] and config["alpha_pattern"]


def test_layers_become_layers_to_transform(hf_check, tiny):
    diff, config = hf_check.unipeft_to_hf(tiny.model("bert"), "lora", tiny.batch("bert"), layers=[-1])
    assert diff <= hf_check.tol
    assert config["target_modules"] == ["query", "value"] and config["layers_to_transform"] == [1]


def test_lora_with_head_copy_and_bitfit_biases(hf_check, tiny):
    recipe = Recipe.from_dict({"name": "lora_head_bias", "family": "hybrid", "deltas": [
        {"form": {"type": "lora", "r": 4, "alpha": 8.0}, "positions": ["attn.q", "attn.v"]},
        {"form": {"type": "copy"}, "positions": ["head"], "insertion": "replace"},
        {"form": {"type": "bias"}, "positions": ["attn.q", "attn.v"]},
    ]})
    diff, config = hf_check.unipeft_to_hf(tiny.model("bert"), recipe, tiny.batch("bert"))
    assert diff <= hf_check.tol
    assert config["modules_to_save"] == ["classifier"] and config["bias"] == "lora_only"
    recipe = Recipe.from_dict({**recipe.to_dict(), "deltas": [*recipe.to_dict()["deltas"][:2],
                                                            {"form": {"type": "bias"}, "positions": ["ffn.up"]}]})
    diff, config = hf_check.unipeft_to_hf(tiny.model("bert"), recipe, tiny.batch("bert"))
    assert diff <= hf_check.tol
    assert config["bias"] == "all"


def test_round_trip_hf_unipeft_hf_keeps_the_config_and_tensors(tmp_path, tiny):
    """HF → unipeft → HF gives back the same target modules, ranks and tensors."""
    import copy

    from safetensors.torch import load_file

    from unipeft.interop import load_hf_adapter, save_hf_adapter

    model = tiny.model("bert")
    hf_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], rank_pattern={"value": 2}, modules_to_save=["classifier"]))
    hf_model.save_pretrained(tmp_path / "a")
    save_hf_adapter(load_hf_adapter(model, tmp_path / "a"), tmp_path / "b")
    first, second = load_file(tmp_path / "a" / "adapter_model.safetensors"), \
        load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    assert all((first[k] == second[k]).all() for k in first)
