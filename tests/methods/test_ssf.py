"""SSF (unipeft.methods.ssf): γ ⊙ h + β after a module, folded into its weight and bias when merged.

The shared invariants of the shipped ``ssf`` recipe run in tests/core/test_invariants.py (it merges on BERT and
GPT-2, whose projections and norms have biases, and refuses on LLaMA and T5); here: the equation, the closed-form
count, the fold with and without a shift and with a scale s, the paper's init, and a real SST-2 batch.
"""

from __future__ import annotations


import pytest
import torch

import unipeft
from unipeft.core.adapted import site_base
from unipeft.core.modules import module_dims
from unipeft.core.recipe import DeltaSpec, Recipe
from unipeft.core.site import DeltaSite
from unipeft.methods.ssf import SSFConfig

FAMILIES = ("bert", "gpt2", "llama", "t5")
POSITIONS = ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.down", "norm")


def _recipe(positions=POSITIONS, *, composition: str = "add", scale: float = 1.0, **form) -> Recipe:
    return Recipe(name="ssf", family="additive", deltas=(
        DeltaSpec(form=SSFConfig(**form), positions=positions, insertion="sequential", composition=composition,
                  scale=scale),))


def test_site_computes_scale_and_shift(tiny, randomize):
    model = tiny.model("bert")
    query = model.bert.encoder.layer[0].attention.self.query
    peft = unipeft.attach(model, _recipe(("attn.q",)))
    randomize(peft)
    site = model.bert.encoder.layer[0].attention.self.query
    assert isinstance(site, DeltaSite) and site.base is query
    form = site.adapters["default"][0].form
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = form.scale * query(x) + form.shift
        torch.testing.assert_close(site(x), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_count_is_two_per_feature(tiny, family):
    """2·d_out per site (γ and β); with shift off, d_out."""
    model = tiny.model(family)
    for shift, per in ((True, 2), (False, 1)):
        peft = unipeft.attach(model, _recipe(shift=shift))
        widths = [r.site.out_slice[1] - r.site.out_slice[0] if r.site.out_slice else
                  module_dims(site_base(peft, r.site.module))[1] for r in peft.records["default"]]
        assert peft.summary().trainable == per * sum(widths)
        peft.detach()


@pytest.mark.parametrize("family", FAMILIES)
def test_scale_only_merges_on_every_family(tiny, randomize, family):
    """Without β, SSF is a per-feature scale and folds into any linear or norm (LLaMA and T5 have no biases)."""
    model = tiny.model(family)
    batch = tiny.batch(family)
    peft = unipeft.attach(model, _recipe(shift=False))
    randomize(peft, std=0.3)
    unmerged = tiny.logits(model, batch)
    weights = {k: v.clone() for k, v in peft.base_state_dict().items()}
    peft.merge()
    torch.testing.assert_close(tiny.logits(model, batch), unmerged, atol=1e-5, rtol=0)
    peft.unmerge()
    for key, value in peft.base_state_dict().items():
        torch.testing.assert_close(value, weights[key], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_shift_without_a_bias_refuses_to_merge(tiny, family):
    peft = unipeft.attach(tiny.model(family), _recipe())
    assert not any(p.mergeable for _, p in peft.delta_modules())
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        peft.merge()
    for module, placed in peft.delta_modules():
        assert "no bias to absorb" in placed.form.merge_problem(site_base(peft, module))


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_scaled_composition_folds_too(tiny, randomize, family):
    model = tiny.model(family)
    batch = tiny.batch(family)
    peft = unipeft.attach(model, _recipe(composition="scaled", scale=2.5))
    randomize(peft, std=0.3)
    unmerged = tiny.logits(model, batch)
    peft.merge()
    torch.testing.assert_close(tiny.logits(model, batch), unmerged, atol=1e-5, rtol=0)


def test_paper_init_and_identity_init(tiny):
    torch.manual_seed(0)
    model = tiny.model("bert")
    batch = tiny.batch("bert")
    before = tiny.logits(model, batch)
    peft = unipeft.attach(model, _recipe(init_std=0.02))
    gammas = torch.cat([p.form.scale.detach() for _, p in peft.delta_modules()])
    betas = torch.cat([p.form.shift.detach() for _, p in peft.delta_modules()])
    assert abs(gammas.mean() - 1) < 0.01 and 0.01 < gammas.std() < 0.03 and 0.01 < betas.std() < 0.03
    assert (tiny.logits(model, batch) - before).abs().max() > 1e-4
    peft.detach()
    peft = unipeft.attach(model, "ssf")
    assert all(torch.equal(p.form.scale, torch.ones_like(p.form.scale)) for _, p in peft.delta_modules())


def test_config_validation():
    with pytest.raises(ValueError, match="init_std must be >= 0, got -1"):
        SSFConfig(init_std=-1.0)
    with pytest.raises(ValueError, match="does not support insertion 'parallel'"):
        DeltaSpec(form=SSFConfig(), positions=("attn.q",), insertion="parallel")


def test_real_sst2_batch_loss_goes_down(minilm_sst2):
    model, batch = minilm_sst2()
    model.eval()
    peft = unipeft.attach(model, "ssf")
    optimizer = torch.optim.AdamW(peft.trainable_parameters(), lr=1e-2)
    with torch.no_grad():
        first = model(**batch).loss.item()
    for _ in range(3):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    with torch.no_grad():
        assert model(**batch).loss.item() < first
