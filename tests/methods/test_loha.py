"""LoHa (unipeft.methods.loha): parity with HF peft's LoHaConfig on Linear layers, parameter counts, merging.

The shared invariants (identity at init, merge, detach, grads, save/load, training) run over the ``loha`` recipe in
tests/core/test_invariants.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoHaConfig as HFLoHaConfig
from peft import get_peft_model

import unipeft
from unipeft.core.recipe import DeltaSpec, Recipe
from unipeft.methods.loha import LoHa, LoHaConfig

TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"], "t5": ["q", "v"]}
NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def _pair(tiny, family: str, *, r: int = 4, alpha: float = 6.0):
    """(unipeft handle, HF peft model) on two copies of the same tiny model, with equal random factors."""
    ours = tiny.model(family)
    theirs = copy.deepcopy(ours)
    recipe = Recipe(name="loha", family="reparameterized",
                    deltas=(DeltaSpec(form=LoHaConfig(r=r, alpha=alpha), positions=("attn.q", "attn.v")),))
    peft = unipeft.attach(ours, recipe)
    hf = get_peft_model(theirs, HFLoHaConfig(r=r, alpha=alpha, target_modules=TARGETS[family]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module, placed in peft.delta_modules():
            layer = hf.base_model.model.get_submodule(module)
            for name in NAMES:
                ours_p, theirs_p = getattr(placed.form, name), getattr(layer, name)["default"]
                assert ours_p.shape == theirs_p.shape, name
                ours_p.normal_(0, 0.5, generator=g)
                theirs_p.copy_(ours_p)
    return peft, hf


@pytest.mark.parametrize("family", ["bert", "llama", "t5"])
def test_outputs_match_hf_peft(tiny, family):
    peft, hf = _pair(tiny, family)
    batch = tiny.batch(family)
    ours, theirs = tiny.logits(peft.model, batch), tiny.logits(hf, batch)
    assert (ours - tiny.logits(tiny.model(family), batch)).abs().max() > 1e-4
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    for module, placed in peft.delta_modules():
        layer = hf.base_model.model.get_submodule(module)
        torch.testing.assert_close(placed.form.delta_weight(), layer.get_delta_weight("default"), atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_parameter_count_matches_hf_peft(tiny, family):
    peft, hf = _pair(tiny, family, r=8, alpha=8.0)
    trainable, total = hf.get_nb_trainable_parameters()
    assert peft.summary().trainable == trainable
    assert peft.summary().total == total


def test_init_is_the_identity_like_hf_peft(tiny):
    model = tiny.model("llama")
    batch = tiny.batch("llama")
    before = tiny.logits(model, batch)
    peft = unipeft.attach(model, "loha")
    assert torch.equal(tiny.logits(model, batch), before)
    form = next(p.form for _, p in peft.delta_modules())
    assert isinstance(form, LoHa)
    assert not form.hada_w2_b.any() and form.hada_w1_a.abs().sum() > 0 and form.hada_w2_a.abs().sum() > 0


def test_merge_matches_hf_peft_merge(tiny):
    peft, hf = _pair(tiny, "bert")
    batch = tiny.batch("bert")
    unmerged = tiny.logits(peft.model, batch)
    peft.merge()
    hf.merge_adapter()
    for module, _ in peft.delta_modules():
        torch.testing.assert_close(peft.model.get_submodule(module).weight,
                                   hf.base_model.model.get_submodule(module).base_layer.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(tiny.logits(peft.model, batch), unmerged, atol=1e-5, rtol=0)


def test_gpt2_conv1d_works(tiny):
    """HF peft's LoHa has no Conv1D layer; here the (out, in) view makes GPT-2's fused c_attn slices work."""
    model = tiny.model("gpt2")
    batch = tiny.batch("gpt2")
    before = tiny.logits(model, batch)
    peft = unipeft.attach(model, "loha")
    assert torch.equal(tiny.logits(model, batch), before)
    assert len(list(peft.delta_modules())) == 2 * tiny.layers


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="rank r must be >= 1, got 0"):
        LoHaConfig(r=0)


def test_real_sst2_batch_loss_goes_down(minilm_sst2, loss_change):
    model, batch = minilm_sst2()
    peft = unipeft.attach(model, "loha")
    assert loss_change(model, peft, batch) < 0
