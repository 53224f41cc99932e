"""``Peft.save_pretrained`` / ``unipeft.from_pretrained``: unipeft and HF peft formats, one or several adapters."""

from __future__ import annotations

import json

import pytest
import torch

import unipeft
from unipeft.persist.names import INDEX_NAME


def adapted(tiny, randomize, family: str = "llama", names: tuple[str, ...] = ("default",), recipe: str = "lora"):
    model = tiny.model(family)
    for index, name in enumerate(names):
        peft = unipeft.attach(model, recipe, name=name, r=4)
        randomize(peft, name, seed=index + 1)
    return model, peft


def test_one_adapter_round_trips_at_the_folder_root(tiny, randomize, tmp_path):
    model, peft = adapted(tiny, randomize)
    batch = tiny.batch("llama")
    (tmp_path / "tokenizer.json").write_text("{}")  # other files in the folder are kept
    peft.save_pretrained(str(tmp_path))
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                    "tokenizer.json"}
    loaded = unipeft.from_pretrained(tiny.model("llama"), tmp_path)
    assert loaded.active == ["default"]
    assert torch.equal(tiny.logits(loaded.model, batch), tiny.logits(model, batch))


def test_several_adapters_go_in_subfolders_with_an_index(tiny, randomize, tmp_path):
    model, peft = adapted(tiny, randomize, names=("a", "b", "c"))
    peft.set_active("a", "c")
    batch = tiny.batch("llama")
    peft.save_pretrained(str(tmp_path), ["a", "b", "c"])
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index == {"format": "unipeft", "adapters": ["a", "b", "c"], "active": ["a", "c"]}
    assert all((tmp_path / n / "adapter_model.safetensors").is_file() for n in "abc")

    loaded = unipeft.from_pretrained(tiny.model("llama"), tmp_path)
    assert list(loaded.recipes) == ["a", "b", "c"] and loaded.active == ["a", "c"]
    assert torch.equal(tiny.logits(loaded.model, batch), tiny.logits(model, batch))

    only_b = unipeft.from_pretrained(tiny.model("llama"), tmp_path, adapter_name="b")
    assert list(only_b.recipes) == ["b"] and only_b.active == ["b"]
    with pytest.raises(ValueError, match="no adapter 'z'; it has: a, b, c"):
        unipeft.from_pretrained(tiny.model("llama"), tmp_path, adapter_name="z")


def test_resaving_replaces_a_stale_layout(tiny, randomize, tmp_path):
    _, peft = adapted(tiny, randomize, names=("a", "b"))
    peft.save_pretrained(str(tmp_path), ["a"])
    peft.save_pretrained(str(tmp_path), ["a", "b"])  # the stale root adapter must not shadow the index
    assert not (tmp_path / "adapter_config.json").exists()
    assert list(unipeft.from_pretrained(tiny.model("llama"), tmp_path).recipes) == ["a", "b"]
    peft.save_pretrained(str(tmp_path), ["b"])  # and a stale index must not shadow the root adapter
    assert not (tmp_path / INDEX_NAME).exists()
    assert list(unipeft.from_pretrained(tiny.model("llama"), tmp_path).recipes) == ["b"]


def test_loading_several_is_all_or_nothing(tiny, randomize, tmp_path):
    _, peft = adapted(tiny, randomize, names=("a", "b"))
    peft.save_pretrained(str(tmp_path), ["a", "b"])
    weights = tmp_path / "b" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    fresh = tiny.model("llama")
    with pytest.raises(ValueError, match="truncated"):
        unipeft.from_pretrained(fresh, tmp_path)
    assert "_unipeft_handle" not in fresh.__dict__
    assert all(p.requires_grad for p in fresh.parameters())


def test_loaded_adapters_join_the_ones_already_there(tiny, randomize, tmp_path):
    _, peft = adapted(tiny, randomize, names=("saved",))
    peft.save_pretrained(str(tmp_path))
    model, here = adapted(tiny, randomize, names=("here",))
    unipeft.from_pretrained(model, tmp_path)
    assert list(here.recipes) == ["here", "saved"] and here.active == ["here", "saved"]


def test_hf_format_loads_in_hf_peft_and_back(tiny, randomize, tmp_path):
    peft_lib = pytest.importorskip("peft")
    model, peft = adapted(tiny, randomize)
    batch = tiny.batch("llama")
    peft.save_pretrained(str(tmp_path), format="hf")
    assert "peft_type" in json.loads((tmp_path / "adapter_config.json").read_text())
    theirs = peft_lib.PeftModel.from_pretrained(tiny.model("llama"), str(tmp_path))
    torch.testing.assert_close(tiny.logits(theirs, batch), tiny.logits(model, batch), rtol=1e-5, atol=1e-6)
    ours = unipeft.from_pretrained(tiny.model("llama"), tmp_path)  # the format is detected
    torch.testing.assert_close(tiny.logits(ours.model, batch), tiny.logits(model, batch), rtol=1e-5, atol=1e-6)


def test_errors_name_what_is_wrong(tiny, randomize, tmp_path):
    _, peft = adapted(tiny, randomize, names=("a",))
    with pytest.raises(ValueError, match="unknown format 'gguf'; valid: unipeft, hf"):
        peft.save_pretrained(str(tmp_path), format="gguf")
    with pytest.raises(ValueError, match="unknown adapter 'x'; existing adapters: a"):
        peft.save_pretrained(str(tmp_path), ["x"])
    peft.set_active()
    with pytest.raises(ValueError, match="none is active"):
        peft.save_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="holds no adapter"):
        unipeft.from_pretrained(tiny.model("llama"), tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="neither a unipeft nor an HF peft adapter config"):
        unipeft.from_pretrained(tiny.model("llama"), tmp_path)
