"""Merging many adapters at once, and checked merges (``Peft.merge(check=True)``) on float bases."""

from __future__ import annotations

import math

import pytest
import torch

import unipeft
from unipeft.ops.safe_merge import MergeCheckError

#: Mergeable adapters of different forms (and so positions), stacked on one model; all merge on every family.
MANY = (("lora", {"r": 4}), ("ia3", {}), ("loha", {}), ("lora", {"r": 2, "alpha": 4.0}), ("lokr", {}),
        ("vera", {}))


def stack(tiny, randomize, family: str):
    model = tiny.model(family)
    peft = None
    for index, (recipe, options) in enumerate(MANY):
        peft = unipeft.attach(model, recipe, name=f"a{index}", **options)
    peft.set_active(*[f"a{i}" for i in range(len(MANY))])
    randomize(peft, std=0.05)
    return model, peft


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "t5"])
def test_many_active_adapters_merge_and_unmerge_together(tiny, randomize, family):
    model, peft = stack(tiny, randomize, family)
    batch = tiny.batch(family)
    stacked = tiny.logits(model, batch)
    base_before = {k: v.clone() for k, v in peft.base_state_dict().items()}

    peft.merge()  # every active adapter
    assert set(peft.merged) == set(peft.active) and len(peft.merged) == len(MANY)
    assert any(not torch.equal(v, base_before[k]) for k, v in peft.base_state_dict().items())
    torch.testing.assert_close(tiny.logits(model, batch), stacked, rtol=1e-4, atol=1e-5)

    peft.unmerge()
    assert peft.merged == []
    for key, tensor in peft.base_state_dict().items():
        torch.testing.assert_close(tensor, base_before[key], rtol=0, atol=1e-6, msg=key)
    torch.testing.assert_close(tiny.logits(model, batch), stacked, rtol=1e-4, atol=1e-5)


def test_checked_merge_reports_float_rounding_per_site(tiny, randomize):
    _, peft = stack(tiny, randomize, "llama")
    batch = {"input_ids": tiny.batch("llama")["input_ids"]}
    errors = peft.merge(check=True, probe=batch)
    sites = {m for n in peft.active for m, _ in peft.delta_modules(n)}
    assert set(errors) == sites | {"model"}
    assert max(errors.values()) < 1e-5
    assert len(peft.merged) == len(MANY)


def test_checked_merge_site_error_matches_a_direct_computation(tiny, randomize):
    model = tiny.model("llama")
    peft = unipeft.attach(model, "lora", r=4)
    randomize(peft)
    site = "model.layers.0.self_attn.q_proj"
    wrapped = model.get_submodule(site)
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))  # the probe's seed and shape
    with torch.no_grad():
        unmerged = wrapped(x)
    errors = peft.merge(check=True)
    with torch.no_grad():
        merged = wrapped(x)
    assert errors[site] == pytest.approx((merged - unmerged).abs().max().item(), abs=1e-9)


def test_a_broken_adapter_is_not_merged_and_the_base_is_restored_exactly(tiny, randomize):
    _, peft = stack(tiny, randomize, "bert")
    peft.merge("a0")  # merged before: stays merged
    base_before = {k: v.clone() for k, v in peft.base_state_dict().items()}
    with torch.no_grad():  # a NaN in an adapter would poison the weights it is merged into
        next(p for _, p in peft.delta_modules("a3")).form.lora_B[0, 0] = float("nan")
    with pytest.raises(MergeCheckError, match="merge was undone") as failed:
        peft.merge("a1", "a3", check=True)
    assert any(math.isnan(e) for e in failed.value.errors.values())  # NaN reported
    assert peft.merged == ["a0"]
    for key, tensor in peft.base_state_dict().items():
        assert torch.equal(tensor, base_before[key]), key


def test_an_inactive_adapter_is_checked_as_if_it_ran(tiny, randomize):
    model = tiny.model("gpt2")
    peft = unipeft.attach(model, "lora", name="on", r=4)
    peft.add("lora", "off", r=4)
    randomize(peft)
    batch = {"input_ids": tiny.batch("gpt2")["input_ids"]}
    peft.set_active("on", "off")
    both = tiny.logits(model, batch)
    peft.set_active("on")
    errors = peft.merge("off", check=True, probe=batch)
    assert errors["model"] < 1e-5 and peft.active == ["on"]
    torch.testing.assert_close(tiny.logits(model, batch), both, rtol=1e-4, atol=1e-5)


def test_tolerance_is_validated(tiny):
    peft = unipeft.attach(tiny.model("llama"), "lora")
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        peft.merge(check=True, tolerance=-1.0)
    assert peft.merged == []
