"""LoKr (unipeft.methods.lokr): HF peft's factorisation of dimensions, parity with HF peft's LoKrConfig on Linear
layers (factored and full Kronecker factors, decompose_both, decompose_factor, both inits), parameter counts.

The shared invariants (identity at init, merge, detach, grads, save/load, training) run over the ``lokr`` recipe in
tests/core/test_invariants.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoKrConfig as HFLoKrConfig
from peft import get_peft_model
from peft.tuners.lokr.layer import factorization as hf_factorization

import unipeft
from unipeft.core.recipe import DeltaSpec, Recipe
from unipeft.methods.lokr import LoKr, LoKrConfig, factorization

TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"], "t5": ["q", "v"]}
NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
#: r=1 factors W₂ (1 < max(b, d)/2 on width 32); r=8 keeps it full; decompose_both factors W₁ too.
VARIANTS = [dict(r=1, alpha=3.0), dict(r=8, alpha=4.0), dict(r=1, alpha=2.0, decompose_both=True, decompose_factor=8),
            dict(r=2, alpha=2.0, decompose_factor=4, init="lycoris")]


def test_factorization_matches_hf_peft():
    for dimension in range(1, 1025):
        for factor in (-1, 1, 2, 3, 4, 8, 16, 100):
            assert factorization(dimension, factor) == hf_factorization(dimension, factor), (dimension, factor)
    assert factorization(4096) == (64, 64) and factorization(11008) == (86, 128)


def _pair(tiny, family: str, **form):
    """(unipeft handle, HF peft model) on two copies of the same tiny model, with equal random factors."""
    ours = tiny.model(family)
    theirs = copy.deepcopy(ours)
    recipe = Recipe(name="lokr", family="reparameterized",
                    deltas=(DeltaSpec(form=LoKrConfig(**form), positions=("attn.q", "attn.v")),))
    peft = unipeft.attach(ours, recipe)
    hf_form = {("init_weights" if k == "init" else k): (v if k != "init" else "lycoris") for k, v in form.items()}
    hf = get_peft_model(theirs, HFLoKrConfig(target_modules=TARGETS[family], **hf_form))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module, placed in peft.delta_modules():
            layer = hf.base_model.model.get_submodule(module)
            ours_names = {n for n, _ in placed.form.named_parameters()}
            theirs_names = {n for n in NAMES if "default" in getattr(layer, n)}
            assert ours_names == theirs_names
            torch.testing.assert_close(placed.form.delta_weight(), layer.get_delta_weight("default"), atol=0, rtol=0)
            for name in ours_names:  # both zero at init: randomise
                ours_p, theirs_p = getattr(placed.form, name), getattr(layer, name)["default"]
                assert ours_p.shape == theirs_p.shape, name
                ours_p.normal_(0, 0.5, generator=g)
                theirs_p.copy_(ours_p)
    return peft, hf


@pytest.mark.parametrize("form", VARIANTS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
@pytest.mark.parametrize("family", ["bert", "llama", "t5"])
def test_outputs_match_hf_peft(tiny, family, form):
    peft, hf = _pair(tiny, family, **form)
    batch = tiny.batch(family)
    ours, theirs = tiny.logits(peft.model, batch), tiny.logits(hf, batch)
    assert (ours - tiny.logits(tiny.model(family), batch)).abs().max() > 1e-4
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    for module, placed in peft.delta_modules():
        layer = hf.base_model.model.get_submodule(module)
        torch.testing.assert_close(placed.form.delta_weight(), layer.get_delta_weight("default"), atol=1e-6, rtol=0)


@pytest.mark.parametrize("form", VARIANTS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_parameter_count_matches_hf_peft(tiny, form):
    peft, hf = _pair(tiny, "llama", **form)
    trainable, total = hf.get_nb_trainable_parameters()
    assert peft.summary().trainable == trainable
    assert peft.summary().total == total


@pytest.mark.parametrize("form", VARIANTS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_identity_at_init_and_merge(tiny, randomize, form):
    model = tiny.model("llama")
    batch = tiny.batch("llama")
    before = tiny.logits(model, batch)
    recipe = Recipe(name="lokr", family="reparameterized",
                    deltas=(DeltaSpec(form=LoKrConfig(**form), positions=("attn.q", "attn.v", "ffn.down")),))
    peft = unipeft.attach(model, recipe)
    assert torch.equal(tiny.logits(model, batch), before)
    assert all(isinstance(p.form, LoKr) for _, p in peft.delta_modules())
    randomize(peft, std=0.5)
    weights = {k: v.clone() for k, v in peft.base_state_dict().items()}
    unmerged = tiny.logits(model, batch)
    peft.merge()
    torch.testing.assert_close(tiny.logits(model, batch), unmerged, atol=1e-5, rtol=0)
    peft.unmerge()
    for key, value in peft.base_state_dict().items():
        torch.testing.assert_close(value, weights[key], atol=1e-6, rtol=0)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="rank r must be >= 1, got 0"):
        LoKrConfig(r=0)
    with pytest.raises(ValueError, match="decompose_factor must be -1 or a positive integer, got 0"):
        LoKrConfig(decompose_factor=0)
    with pytest.raises(ValueError, match="unknown LoKr init 'zeros'; valid: peft, lycoris"):
        LoKrConfig(init="zeros")


def test_real_sst2_batch_loss_goes_down(minilm_sst2, loss_change):
    model, batch = minilm_sst2()
    peft = unipeft.attach(model, "lokr")
    assert loss_change(model, peft, batch) < 0
