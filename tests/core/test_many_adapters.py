"""Many adapters on one base (Peft.load, adapters, set_active/deactivate, remove, swap), checked against a plain copy of
the base whose weights get the LoRA updates W + (α/r)·B A added by hand."""

from __future__ import annotations

import copy

import pytest
import torch

import unipeft
from unipeft.core.site import DeltaSite

Q, V = "model.layers.{}.self_attn.q_proj", "model.layers.{}.self_attn.v_proj"


def by_hand(base: torch.nn.Module, *adapters: dict[str, torch.Tensor], scaling: float = 2.0) -> torch.nn.Module:
    """A copy of ``base`` with s·B A of every given adapter state (keys as in Peft.adapter_state_dict) added."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        for state in adapters:
            for key in [k for k in state if k.endswith("lora_A")]:
                module = key.split("::")[0]
                model.get_submodule(module).weight += scaling * state[key.replace("lora_A", "lora_B")] @ state[key]
    return model


@pytest.fixture
def two(tiny, randomize, tmp_path):
    """The tiny LLaMA with LoRA adapters 'a' and 'b' (different random weights); 'b' saved to tmp_path/b."""
    base = tiny.model("llama")
    model = copy.deepcopy(base)
    peft = unipeft.attach(model, "lora", name="a")
    peft.add("lora", "b")
    randomize(peft, "a", seed=1)
    randomize(peft, "b", seed=2)
    peft.save(str(tmp_path / "b"), "b")
    return base, peft


def state(peft: unipeft.Peft, name: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in peft.adapter_state_dict(name).items()}


def test_load_under_a_new_name_keeps_the_base(two, tiny, tmp_path):
    base, peft = two
    weights = {n: p for n, p in peft.model.named_parameters() if ".adapters." not in n}
    peft.load(str(tmp_path / "b"), "b2")
    assert list(peft.recipes) == ["a", "b", "b2"] and peft.active == ["a"]  # loaded inactive
    assert all(weights[n] is p for n, p in peft.model.named_parameters() if ".adapters." not in n)
    batch = tiny.batch("llama")
    peft.set_active("b2")
    expected = tiny.logits(by_hand(base, state(peft, "b")), batch)
    assert torch.allclose(tiny.logits(peft.model, batch), expected, atol=1e-5)
    peft.load(str(tmp_path / "b"), "b3", activate=True)
    assert peft.active == ["b2", "b3"]


def test_list_adapters(two):
    _, peft = two
    per_site = 8 * (32 + 32) + 8 * (32 + 16)  # r·(d_in + d_out) at q (32→32) and v (32→16, grouped KV)
    peft.merge("a")
    infos = {i.name: i for i in peft.adapters()}
    assert list(infos) == ["a", "b"]
    a, b = infos["a"], infos["b"]
    assert (a.method, a.forms, a.sites) == ("lora", ("lora",), 4)
    assert a.parameters == b.parameters == 2 * per_site
    assert (a.active, a.merged, a.trainable) == (True, True, 2 * per_site)
    assert (b.active, b.merged, b.trainable) == (False, False, 0)
    assert "inactive" in str(b) and "active, merged" in str(a)


def test_stacked_adapters_sum_their_deltas(two, tiny):
    base, peft = two
    batch = tiny.batch("llama")
    peft.set_active("a", "b")
    expected = tiny.logits(by_hand(base, state(peft, "a"), state(peft, "b")), batch)
    assert torch.allclose(tiny.logits(peft.model, batch), expected, atol=1e-5)
    peft.deactivate("a")
    assert peft.active == ["b"]
    assert torch.allclose(tiny.logits(peft.model, batch), tiny.logits(by_hand(base, state(peft, "b")), batch),
                          atol=1e-5)
    peft.deactivate()
    assert peft.active == []
    assert torch.equal(tiny.logits(peft.model, batch), tiny.logits(base, batch))
    with pytest.raises(ValueError, match="unknown adapter 'c'; existing adapters: a, b"):
        peft.deactivate("c")


def test_remove_one_then_the_last(two, tiny):
    base, peft = two
    batch = tiny.batch("llama")
    peft.set_active("a", "b")
    b = state(peft, "b")
    peft.remove("a")
    assert list(peft.recipes) == ["b"] and peft.active == ["b"]
    assert torch.allclose(tiny.logits(peft.model, batch), tiny.logits(by_hand(base, b), batch), atol=1e-5)
    peft.remove("b")
    assert not any(isinstance(m, DeltaSite) for m in peft.model.modules())
    assert torch.equal(tiny.logits(peft.model, batch), tiny.logits(base, batch))


@pytest.mark.parametrize("merged", [False, True])
def test_hot_swap_replaces_weights_in_place(two, tiny, tmp_path, merged):
    base, peft = two
    batch = tiny.batch("llama")
    params = [p for _, placed in peft.delta_modules("a") for p in placed.parameters()]
    pointers = {k: v.data_ptr() for k, v in peft.adapter_state_dict("a").items()}
    if merged:
        peft.merge("a")
    peft.swap("a", str(tmp_path / "b"))
    now = peft.adapter_state_dict("a")
    after = [p for _, placed in peft.delta_modules("a") for p in placed.parameters()]
    assert len(after) == len(params) and all(x is y for x, y in zip(after, params))  # not re-created
    assert {k: v.data_ptr() for k, v in now.items()} == pointers  # and written in place
    b = state(peft, "b")
    assert all(torch.equal(now[k], b[k]) for k in b)
    assert peft.active == ["a"] and peft.merged == (["a"] if merged else [])
    assert all(p.requires_grad for p in params)
    assert torch.allclose(tiny.logits(peft.model, batch), tiny.logits(by_hand(base, b), batch), atol=1e-5)
    peft.unmerge()
    assert torch.allclose(tiny.logits(peft.model, batch), tiny.logits(by_hand(base, b), batch), atol=1e-5)


def test_hot_swap_refuses_another_structure(two, tmp_path):
    _, peft = two
    peft.add("lora", "wide", r=4)
    peft.save(str(tmp_path / "wide"), "wide")
    before = state(peft, "a")
    with pytest.raises(ValueError, match=r"cannot hot-swap adapter 'a'.*the deltas differ.*'r': 4"):
        peft.swap("a", str(tmp_path / "wide"))
    assert all(torch.equal(v, before[k]) for k, v in peft.adapter_state_dict("a").items())
    with pytest.raises(ValueError, match="unknown adapter 'zz'"):
        peft.swap("zz", str(tmp_path / "wide"))
