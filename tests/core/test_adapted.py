"""State-dict names of an adapted model (unipeft.core.adapted.Peft): the base's own names come back exactly, also
when the model has modules of its own called ``base`` or ``adapters`` (the names unipeft's sites use)."""

from __future__ import annotations

import torch
from torch import nn

import unipeft
from unipeft.core.recipe import DeltaSpec, Recipe
from unipeft.methods.lora import LoRAConfig


class Block(nn.Module):
    """Submodules called ``base`` and ``adapters``, each with linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        self.adapters = nn.ModuleDict({"out": nn.Linear(4, 2)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapters["out"](self.base(x))


def Named() -> nn.Module:
    """A model whose own ``base``/``adapters`` modules sit below the root (``block.base.1.weight``, ...)."""
    return nn.ModuleDict({"block": Block()})


def _lora(*modules: str) -> Recipe:
    return Recipe(name="t", family="reparameterized", deltas=(DeltaSpec(form=LoRAConfig(r=2), modules=list(modules)),))


def test_base_state_dict_keeps_the_models_own_names():
    torch.manual_seed(0)
    model = Named()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    peft = unipeft.attach(model, _lora("block.base.0", "block.adapters.out"))
    assert "block.base.0.base.weight" in model.state_dict()  # the site wraps base.0 under the model's own "base"
    state = peft.base_state_dict()
    assert list(state) == list(original)
    assert all(torch.equal(state[k], original[k]) for k in original)
    assert peft.original_key("block.base.0.adapters.default.0.form.lora_A") is None
    assert peft.original_key("block.adapters.out.base.weight") == "block.adapters.out.weight"
    assert peft.original_key("block.base.1.weight") == "block.base.1.weight"  # not a site: untouched


def test_full_fine_tuning_saves_the_models_own_names():
    torch.manual_seed(0)
    model = Named()
    peft = unipeft.attach(model, "full")
    state = peft.adapter_state_dict("default")
    assert {k for k in state} == {f"base::{k}" for k in Named().state_dict()}
