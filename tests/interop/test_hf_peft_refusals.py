"""What one format can express and the other cannot is refused with a message naming it — never dropped."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import unipeft
from unipeft.core.recipe import DeltaSpec, Recipe
from unipeft.interop import hf_config_to_recipe, load_hf_adapter, save_hf_adapter
from unipeft.methods.lora import LoRAConfig

peft = pytest.importorskip("peft")


# ------------------------------------------------------------------------------------------ unipeft → HF
@pytest.mark.parametrize("recipe, words", [
    ("houlsby", ["bottleneck", "HF peft has no bottleneck"]),
    ("full", ["full fine-tuning"]),
    ("bitfit", ["only copy/bias"]),
])
def test_unrepresentable_recipes_are_refused_naming_why(tmp_path, tiny, recipe, words):
    handle = unipeft.attach(tiny.model("bert"), recipe)
    with pytest.raises(ValueError) as err:
        save_hf_adapter(handle, tmp_path / "out")
    assert all(w in str(err.value) for w in words), str(err.value)
    assert not (tmp_path / "out").exists()


def _lora(**kw) -> DeltaSpec:
    return DeltaSpec(form=LoRAConfig(r=2, **{k: v for k, v in kw.items() if k in ("dropout", "alpha")}),
                     **{k: v for k, v in kw.items() if k not in ("dropout", "alpha")})


@pytest.mark.parametrize("family, deltas, words", [
    ("bert", [_lora(positions=("attn.q",)), {"form": {"type": "ia3"}, "positions": ["attn.k"],
                                            "insertion": "multiplicative"}], ["combines", "IA3", "LORA"]),
    ("bert", [_lora(positions=("attn.q",), composition="gated")], ["gated", "attention.self.query"]),
    ("bert", [_lora(positions=("attn.q",), dropout=0.1), _lora(positions=("attn.v",))], ["dropout"]),
    ("llama", [_lora(positions=("attn.q",)), {"form": {"type": "bias"}, "positions": ["attn.q"]}],
     ["no base bias", "q_proj"]),
    ("bert", [_lora(modules=("classifier",)), {"form": {"type": "copy"}, "positions": ["head"],
                                                "insertion": "replace"}], ["inside a copied module"]),
    ("bert", [_lora(positions=("attn.q",)), {"form": {"type": "dora", "r": 2}, "positions": ["attn.v"]}],
     ["mixes LoRA and DoRA"]),
])
def test_unrepresentable_placements_are_refused_naming_them(tmp_path, tiny, family, deltas, words):
    specs = tuple(d if isinstance(d, DeltaSpec) else DeltaSpec.from_dict(d) for d in deltas)
    handle = unipeft.attach(tiny.model(family), Recipe(name="x", family="hybrid", deltas=specs))
    with pytest.raises(ValueError) as err:
        save_hf_adapter(handle, tmp_path / "out")
    assert all(w in str(err.value) for w in words), str(err.value)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ HF → unipeft
@pytest.mark.parametrize("option, value", [
    ("layer_replication", [[0, 1], [1, 2]]),
    ("lora_bias", True),
    ("use_qalora", True),
    ("trainable_token_indices", [1, 2]),
    ("init_lora_weights", "corda"),
    ("init_lora_weights", "pissa_niter_4"),
    ("target_parameters", ["mlp.experts.weight"]),
    ("bias", "vera_only"),
])
def test_unsupported_hf_options_are_refused_naming_the_option(tiny, option, value):
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], option: value}
    with pytest.raises(ValueError) as err:
        hf_config_to_recipe(config, tiny.model("llama"))
    assert option in str(err.value), str(err.value)


def test_unconverted_peft_types_are_refused_listing_the_supported_ones(tiny):
    with pytest.raises(NotImplementedError) as err:
        hf_config_to_recipe({"peft_type": "BOFT", "target_modules": ["q_proj"]}, tiny.model("llama"))
    assert "BOFT" in str(err.value) and "LORA" in str(err.value) and "IA3" in str(err.value)


def test_config_without_target_modules_is_refused(tiny):
    with pytest.raises(ValueError, match="target_modules"):
        hf_config_to_recipe({"peft_type": "LORA", "r": 4}, tiny.model("llama"))


@pytest.fixture
def hf_folder(tmp_path, tiny):
    """An HF LoRA adapter on the tiny LLaMA (q_proj, v_proj, r=4)."""
    model = peft.get_peft_model(tiny.model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def _rewrite(folder, edit) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize("edit, words", [
    (lambda t: t.update({"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 32)}),
     ["nothing", "up_proj.lora_A.weight"]),
    (lambda t: t.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"),
     ["no tensor", "layers.1.self_attn.v_proj.lora_B.weight"]),
    (lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(5, 32)}),
     ["shape (5, 32)", "(4, 32)"]),
    (lambda t: t.update({"base_model.model.model.embed_tokens.weight": torch.zeros(100, 32)}),
     ["changed base weight", "embed_tokens.weight"]),
])
def test_files_that_do_not_fit_are_refused_and_the_model_is_left_untouched(tiny, hf_folder, edit, words):
    _rewrite(hf_folder, edit)
    model = tiny.model("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError) as err:
        load_hf_adapter(model, hf_folder)
    assert all(w in str(err.value) for w in words), str(err.value)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    assert getattr(model, "_unipeft_handle", None) is None


def test_pickle_only_adapters_are_never_unpickled(tmp_path, tiny, hf_folder):
    (hf_folder / "adapter_model.safetensors").rename(hf_folder / "adapter_model.bin")
    with pytest.raises(ValueError, match="never unpickles"):
        load_hf_adapter(tiny.model("llama"), hf_folder)


def test_a_unipeft_folder_is_pointed_to_the_unipeft_loader(tmp_path, tiny):
    handle = unipeft.attach(tiny.model("llama"), "lora")
    handle.save(tmp_path / "u")
    with pytest.raises(ValueError, match="unipeft.load_adapter"):
        load_hf_adapter(tiny.model("llama"), tmp_path / "u")


def test_unsupported_option_in_a_saved_config_is_refused(tiny, hf_folder):
    config = json.loads((hf_folder / "adapter_config.json").read_text())
    config["layer_replication"] = [[0, 2]]
    (hf_folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="layer_replication"):
        load_hf_adapter(tiny.model("llama"), hf_folder)
