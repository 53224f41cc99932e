"""Saving and loading adapters (unipeft.persist.io): the folder format, clear errors for every bad input, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import unipeft
from unipeft.persist import io
from unipeft.core.site import DeltaSite

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@pytest.fixture
def saved(tiny, randomize, tmp_path) -> Path:
    """A LoRA adapter of the tiny LLaMA (seed 0), with random weights, saved to ``tmp_path/adapter``."""
    model = tiny.model("llama")
    peft = unipeft.attach(model, "lora")
    randomize(peft)
    return peft.save(str(tmp_path / "adapter"))


def assert_untouched(model: torch.nn.Module) -> None:
    """A failed load leaves no trace: no handle, no wrapper, nothing frozen."""
    with pytest.raises(ValueError, match="no unipeft adapters"):
        unipeft.handle(model)
    assert not any(isinstance(m, DeltaSite) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_folder_contents(saved, tiny):
    assert sorted(p.name for p in saved.iterdir()) == [CONFIG, WEIGHTS]
    config = json.loads((saved / CONFIG).read_text())
    assert config["format"] == "unipeft-adapter" and config["adapter_name"] == "default"
    assert config["recipe"] == unipeft.load_recipe("lora").to_dict()
    assert config["base"]["model_type"] == "llama" and config["base"]["hidden_size"] == tiny.width
    assert [s["module"] for s in config["sites"]] == [  # position by position, layer by layer
        f"model.layers.{i}.self_attn.{p}_proj" for p in ("q", "v") for i in range(2)]
    assert config["weights"]["bytes"] == (saved / WEIGHTS).stat().st_size
    tensors = load_file(str(saved / WEIGHTS))
    assert set(tensors) == {f"model.layers.{i}.self_attn.{p}_proj::0.form.lora_{ab}"
                            for i in range(2) for p in ("q", "v") for ab in ("A", "B")}


def test_missing_folder(tiny, tmp_path):
    model = tiny.model("llama")
    with pytest.raises(FileNotFoundError, match="adapter folder .*nowhere does not exist"):
        unipeft.load_adapter(model, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
        unipeft.load_adapter(model, tmp_path / "empty")
    assert_untouched(model)


def test_missing_weights(saved, tiny):
    (saved / WEIGHTS).unlink()
    model = tiny.model("llama")
    with pytest.raises(FileNotFoundError, match="adapter weights .*adapter_model.safetensors are missing"):
        unipeft.load_adapter(model, saved)
    assert_untouched(model)


def test_truncated_weights(saved, tiny):
    data = (saved / WEIGHTS).read_bytes()
    (saved / WEIGHTS).write_bytes(data[: len(data) // 2])
    model = tiny.model("llama")
    with pytest.raises(ValueError, match=rf"has {len(data) // 2} bytes but {len(data)} were saved: .*truncated"):
        unipeft.load_adapter(model, saved)
    assert_untouched(model)


def test_corrupted_weights(saved, tiny):
    data = bytearray((saved / WEIGHTS).read_bytes())
    data[-5] ^= 0xFF  # same size, one byte of a tensor flipped
    (saved / WEIGHTS).write_bytes(bytes(data))
    model = tiny.model("llama")
    with pytest.raises(ValueError, match="does not match the checksum .*corrupted"):
        unipeft.load_adapter(model, saved)
    assert_untouched(model)


def test_invalid_config(saved, tiny):
    (saved / CONFIG).write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="is not valid JSON"):
        unipeft.load_adapter(tiny.model("llama"), saved)


def test_different_base_model(saved, tiny):
    config = tiny.config("llama")
    config.hidden_size, config.intermediate_size = 48, 96
    import transformers

    other = transformers.LlamaForCausalLM(config)
    with pytest.raises(ValueError, match=r"different base model \(.*hidden_size: adapter 32 vs model 48"):
        unipeft.load_adapter(other, saved)
    assert_untouched(other)
    with pytest.raises(ValueError, match=r"different base model \(family: adapter 'llama' vs model 'bert'"):
        unipeft.load_adapter(tiny.model("bert"), saved)


def test_hf_peft_folder_is_refused_with_a_clear_message(tiny, tmp_path):
    peft_lib = pytest.importorskip("peft")
    hf = peft_lib.get_peft_model(tiny.model("llama"), peft_lib.LoraConfig(r=4, target_modules=["q_proj"]))
    hf.save_pretrained(str(tmp_path / "hf"))
    model = tiny.model("llama")
    with pytest.raises(ValueError, match="is not a unipeft adapter config .*Hugging Face peft adapter"):
        unipeft.load_adapter(model, tmp_path / "hf")
    assert_untouched(model)


def test_weights_that_do_not_fit_roll_back(saved, tiny):
    """A config edited to r=4 passes the file checks, then fails on the tensor shapes: the half-attached adapter is
    removed again."""
    config = json.loads((saved / CONFIG).read_text())
    config["recipe"]["deltas"][0]["form"]["r"] = 4
    (saved / CONFIG).write_text(json.dumps(config), encoding="utf-8")
    model = tiny.model("llama")
    modules = dict(model.named_modules())
    with pytest.raises(ValueError, match=r"saved shape \(8, 32\) but the model needs \(4, 32\)"):
        unipeft.load_adapter(model, saved)
    assert_untouched(model)
    assert all(m is modules[n] for n, m in model.named_modules())


def test_unexpected_tensors_are_refused(saved, tiny):
    tensors = load_file(str(saved / WEIGHTS))
    tensors["model.layers.0.self_attn.k_proj::0.form.lora_A"] = torch.zeros(8, 32)
    save_file(tensors, str(saved / WEIGHTS), metadata={"format": "unipeft-adapter"})
    config = json.loads((saved / CONFIG).read_text())
    config["weights"].update(bytes=(saved / WEIGHTS).stat().st_size, sha256=io._sha256(saved / WEIGHTS))
    (saved / CONFIG).write_text(json.dumps(config), encoding="utf-8")
    model = tiny.model("llama")
    with pytest.raises(ValueError, match=r"does not fit this model: missing tensors \[\], unexpected tensors "
                                         r"\['model.layers.0.self_attn.k_proj::0.form.lora_A'\]"):
        unipeft.load_adapter(model, saved)
    assert_untouched(model)


def test_sites_that_do_not_match_are_refused(saved, tiny):
    config = json.loads((saved / CONFIG).read_text())
    config["sites"][0]["base_shape"] = [64, 32]
    (saved / CONFIG).write_text(json.dumps(config), encoding="utf-8")
    model = tiny.model("llama")
    with pytest.raises(ValueError, match="the adapter's sites do not match this model"):
        unipeft.load_adapter(model, saved)
    assert_untouched(model)


def test_load_next_to_an_existing_adapter(saved, tiny):
    model = tiny.model("llama")
    batch = tiny.batch("llama")
    peft = unipeft.attach(model, "ia3", name="mine")
    loaded = unipeft.load_adapter(model, saved, name="theirs")
    assert loaded is peft
    assert list(peft.recipes) == ["mine", "theirs"] and peft.active == ["mine", "theirs"]
    reference = tiny.model("llama")
    unipeft.load_adapter(reference, saved)
    torch.testing.assert_close(tiny.logits(model, batch), tiny.logits(reference, batch))  # ia3 is still the identity
    with pytest.raises(ValueError, match="adapter 'theirs' already exists"):
        unipeft.load_adapter(model, saved, name="theirs")


def test_load_without_activating(saved, tiny):
    model = tiny.model("llama")
    peft = unipeft.load_adapter(model, saved, activate=False)
    assert peft.active == [] and not peft.trainable_parameters()


def test_save_needs_a_name_when_several_are_active(tiny, tmp_path):
    peft = unipeft.attach(tiny.model("llama"), "lora")
    peft.add("ia3", name="second")
    peft.set_active("default", "second")
    with pytest.raises(ValueError, match="give the adapter to save; active adapters: default, second"):
        peft.save(str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()
    assert (peft.save(str(tmp_path / "x"), "second") / CONFIG).is_file()


# ------------------------------------------------------------------------------------------------ atomic write
def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_failed_save_keeps_the_previous_adapter(saved, tiny, randomize, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    model = tiny.model("llama")
    peft = unipeft.attach(model, "lora")
    randomize(peft, seed=7)

    def broken_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        peft.save(str(saved))
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert leftovers(saved.parent) == []
    unipeft.load_adapter(tiny.model("llama"), saved)  # still loads

    with pytest.raises(OSError, match="disk full"):  # a first save that fails leaves nothing behind
        peft.save(str(saved.parent / "new"))
    assert not (saved.parent / "new").exists() and leftovers(saved.parent) == []


def test_saving_over_an_adapter_replaces_it(saved, tiny, randomize):
    model = tiny.model("llama")
    batch = tiny.batch("llama")
    peft = unipeft.attach(model, "lora")
    randomize(peft, seed=7)
    peft.save(str(saved))
    assert leftovers(saved.parent) == []
    fresh = tiny.model("llama")
    unipeft.load_adapter(fresh, saved)
    assert torch.equal(tiny.logits(fresh, batch), tiny.logits(model, batch))


# ------------------------------------------------------------------------------------------------ saving while merged
def _save_merged_and_reload(tiny, randomize, tmp_path, recipe: str) -> float:
    model = tiny.model("llama")
    batch = tiny.batch("llama")
    peft = unipeft.attach(model, recipe)
    randomize(peft)
    adapted = tiny.logits(model, batch)
    peft.merge()
    peft.save(str(tmp_path / "merged"))
    fresh = tiny.model("llama")
    unipeft.load_adapter(fresh, tmp_path / "merged")
    return (tiny.logits(fresh, batch) - adapted).abs().max().item()


def test_saving_a_merged_lora_saves_its_deltas(tiny, randomize, tmp_path):
    assert _save_merged_and_reload(tiny, randomize, tmp_path, "lora") == 0.0


def test_saving_a_merged_copy_saves_the_trained_copy(tiny, randomize, tmp_path):
    """Merging a ``copy`` delta swaps its tensors with the base's: saving must still write the trained copy."""
    assert _save_merged_and_reload(tiny, randomize, tmp_path, "last_k") == 0.0
