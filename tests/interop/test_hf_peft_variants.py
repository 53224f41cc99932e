"""VeRA, LoHa, LoKr and AdaLoRA between HF peft's file format and unipeft, checked against HF peft itself."""

from __future__ import annotations

import copy

import pytest
import torch

import unipeft
from unipeft.interop import load_hf_adapter, save_hf_adapter

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("family, config", [
    ("bert", peft.LoHaConfig(r=4, alpha=8, target_modules=["query", "value"], rank_pattern={"value": 2})),
    ("llama", peft.LoHaConfig(r=4, target_modules=["q_proj", "down_proj"])),
    ("llama", peft.LoKrConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "up_proj"])),
    ("bert", peft.LoKrConfig(r=2, target_modules=["query", "dense"], decompose_both=True, decompose_factor=4,
                             layers_to_transform=[0])),
    ("bert", peft.VeraConfig(r=8, target_modules=["query", "value"], modules_to_save=["classifier"])),
    ("llama", peft.VeraConfig(r=8, target_modules=["q_proj", "v_proj"], save_projection=False)),
    ("llama", peft.AdaLoraConfig(init_r=6, target_r=3, total_step=10, target_modules=["q_proj", "v_proj"])),
    ("bert", peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=64, total_step=10, target_modules=["query", "dense"],
                                bias="lora_only")),
])
def test_hf_variant_loads_with_the_same_outputs(hf_check, tiny, family, config):
    diff, _ = hf_check.hf_to_unipeft(tiny.model(family), config, tiny.batch(family))
    assert diff <= hf_check.tol


@pytest.mark.parametrize("recipe, options, family", [
    ("loha", {}, "bert"), ("lokr", {}, "llama"), ("vera", {"r": 16}, "bert"), ("adalora", {}, "llama"),
])
def test_builtin_variant_saves_for_hf_with_the_same_outputs(hf_check, tiny, recipe, options, family):
    diff, config = hf_check.unipeft_to_hf(tiny.model(family), recipe, tiny.batch(family), **options)
    assert diff <= hf_check.tol
    assert config["peft_type"] == recipe.upper()


def test_adalora_pruned_ranks_round_trip_through_hf(tmp_path, tiny):
    """After HF's rank reallocation the file holds only the kept triplets and a rank_pattern; unipeft scatters them
    back with its rank_mask, and writes them the same way."""
    model = tiny.model("llama")
    batch = tiny.batch("llama")
    hf_model = peft.get_peft_model(copy.deepcopy(model), peft.AdaLoraConfig(
        init_r=6, target_r=2, total_step=6, tinit=1, tfinal=1, target_modules=["q_proj", "v_proj"]))
    optimizer = torch.optim.SGD([p for p in hf_model.parameters() if p.requires_grad], lr=0.5)
    for step in range(6):
        hf_model(**batch).loss.backward()
        optimizer.step()
        hf_model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    hf_model.eval()
    hf_model.save_pretrained(tmp_path / "hf")
    with torch.no_grad():
        want = hf_model(input_ids=batch["input_ids"]).logits
    handle = load_hf_adapter(model, tmp_path / "hf")
    masks = [p.form.rank_mask for _, p in handle.delta_modules()]
    assert any(not m.all() for m in masks)
    with torch.no_grad():
        assert (model(input_ids=batch["input_ids"]).logits - want).abs().max() <= 1e-5
    save_hf_adapter(handle, tmp_path / "back")
    again = peft.PeftModel.from_pretrained(tiny.model("llama"), tmp_path / "back").eval()
    with torch.no_grad():
        assert (again(input_ids=batch["input_ids"]).logits - want).abs().max() <= 1e-5


def test_vera_with_different_input_widths_is_refused_naming_the_shapes(tmp_path, tiny):
    """HF slices one VeRA pair drawn at the largest shape; unipeft draws per shape: q (in 32) and down (in 64)."""
    hf_model = peft.get_peft_model(tiny.model("llama"), peft.VeraConfig(r=8, target_modules=["q_proj", "down_proj"]))
    hf_model.save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match=r"shared random matrices differ.*\(in, out\)"):
        load_hf_adapter(tiny.model("llama"), tmp_path / "hf")
    handle = unipeft.attach(tiny.model("llama"), "vera", r=8, positions=["attn.q", "ffn.down"])
    with pytest.raises(ValueError, match="shared random matrices differ"):
        save_hf_adapter(handle, tmp_path / "out")


@pytest.mark.parametrize("option", ["rank_dropout", "module_dropout"])
def test_lycoris_training_dropouts_are_refused_naming_the_option(tmp_path, tiny, option):
    hf_model = peft.get_peft_model(tiny.model("llama"), peft.LoHaConfig(r=2, target_modules=["q_proj"],
                                                                        **{option: 0.1}))
    hf_model.save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match=f"{option}=0.1.*training-time dropout"):
        load_hf_adapter(tiny.model("llama"), tmp_path / "hf")
