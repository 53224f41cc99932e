"""VeRA (unipeft.methods.vera): the shared frozen projections, parity with HF peft's VeRA, parameter counts.

The shared invariants (identity at init, merge, detach, grads, save/load, training) run over the ``vera`` recipe in
tests/core/test_invariants.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import VeraConfig, get_peft_model

import unipeft
from unipeft.core.recipe import DeltaSpec, Recipe
from unipeft.methods.vera import VeRA, VeRAConfig

TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"], "t5": ["q", "v"]}


def _recipe(r: int, **placement) -> Recipe:
    placement = placement or {"positions": ("attn.q", "attn.v")}
    return Recipe(name="vera", family="reparameterized",
                  deltas=(DeltaSpec(form=VeRAConfig(r=r, projection_prng_key=7), **placement),))


def _pair(tiny, family: str, r: int = 16, **placement):
    """(unipeft handle, HF peft model) on two copies of the same model, with equal random d and b."""
    ours = tiny.model(family)
    theirs = copy.deepcopy(ours)
    peft = unipeft.attach(ours, _recipe(r, **placement))
    hf = get_peft_model(theirs, VeraConfig(r=r, target_modules=TARGETS.get(family, ["c_attn"]),
                                           projection_prng_key=7, fan_in_fan_out=family == "gpt2"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module, placed in peft.delta_modules():
            form = placed.form
            layer = hf.base_model.model.get_submodule(module)
            assert torch.equal(layer.vera_lambda_d["default"], form.vera_lambda_d)  # d = 0.1, b = 0 on both sides
            assert torch.equal(layer.vera_lambda_b["default"], form.vera_lambda_b)
            form.vera_lambda_b.normal_(0, 1.0, generator=g)
            form.vera_lambda_d.normal_(0, 1.0, generator=g)
            layer.vera_lambda_b["default"].copy_(form.vera_lambda_b)
            layer.vera_lambda_d["default"].copy_(form.vera_lambda_d)
    return peft, hf


def _hf_slices(hf, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    layer = hf.base_model.model.get_submodule(module)
    return (layer.vera_A["default"][:, :layer.in_features], layer.vera_B["default"][:layer.out_features, :])


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_same_shapes_give_hf_peft_matrices_and_outputs(tiny, family):
    """All targeted sites share one shape here, so the regenerated projections are HF's bit for bit."""
    peft, hf = _pair(tiny, family)
    batch = tiny.batch(family)
    for module, placed in peft.delta_modules():
        hf_a, hf_b = _hf_slices(hf, module)
        assert torch.equal(placed.form.vera_A, hf_a)
        assert torch.equal(placed.form.vera_B, hf_b)
    ours, theirs = tiny.logits(peft.model, batch), tiny.logits(hf, batch)
    assert (ours - tiny.logits(tiny.model(family), batch)).abs().max() > 1e-4
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_gpt2_fused_module_matches_hf_peft(tiny):
    peft, hf = _pair(tiny, "gpt2", modules=("c_attn",))
    batch = tiny.batch("gpt2")
    for module, placed in peft.delta_modules():
        hf_a, hf_b = _hf_slices(hf, module)
        assert torch.equal(placed.form.vera_A, hf_a) and torch.equal(placed.form.vera_B, hf_b)
    torch.testing.assert_close(tiny.logits(peft.model, batch), tiny.logits(hf, batch), atol=1e-5, rtol=0)


def test_grouped_query_attention_matches_hf_peft_with_its_matrices(tiny):
    """LLaMA's v_proj is narrower than q_proj: HF slices one largest pair, unipeft draws a pair per shape. With HF's
    slices copied in, the outputs agree; q_proj (the largest shape) gets HF's matrices without copying."""
    peft, hf = _pair(tiny, "llama")
    batch = tiny.batch("llama")
    with torch.no_grad():
        for module, placed in peft.delta_modules():
            hf_a, hf_b = _hf_slices(hf, module)
            if module.endswith("q_proj"):
                assert torch.equal(placed.form.vera_A, hf_a) and torch.equal(placed.form.vera_B, hf_b)
            placed.form.vera_A = hf_a.clone()
            placed.form.vera_B = hf_b.clone()
    torch.testing.assert_close(tiny.logits(peft.model, batch), tiny.logits(hf, batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_parameter_count_matches_hf_peft(tiny, family):
    peft, hf = _pair(tiny, family, r=256)
    trainable, total = hf.get_nb_trainable_parameters()
    summary = peft.summary()
    assert summary.trainable == trainable == sum(256 + p.form.vera_lambda_b.numel() for _, p in peft.delta_modules())
    assert summary.total == total


def test_projections_are_shared_frozen_and_not_saved(tiny):
    model = tiny.model("bert")
    peft = unipeft.attach(model, "vera")
    forms = [p.form for _, p in peft.delta_modules()]
    assert all(isinstance(f, VeRA) for f in forms)
    assert len({id(f.vera_A) for f in forms}) == 1 and len({id(f.vera_B) for f in forms}) == 1  # one pair per shape
    assert not any(f.vera_A.requires_grad or f.vera_B.requires_grad for f in forms)
    trainable = {id(p) for p in peft.trainable_parameters()}
    assert id(forms[0].vera_A) not in trainable
    assert all(k.rsplit(".", 1)[-1] in ("vera_lambda_b", "vera_lambda_d") for k in peft.adapter_state_dict("default"))
    assert peft.summary().trainable == len(forms) * (256 + tiny.width)


def test_load_regenerates_the_projections_from_the_seed(tiny, tmp_path):
    model = tiny.model("llama")
    batch = tiny.batch("llama")
    peft = unipeft.attach(model, _recipe(32))
    with torch.no_grad():
        for _, placed in peft.delta_modules():
            placed.form.vera_lambda_b.normal_()
    expected = tiny.logits(model, batch)
    folder = peft.save(str(tmp_path / "vera"))
    peft.detach()
    del peft, model  # the shared matrices are released with their sites ...
    fresh = tiny.model("llama")
    loaded = unipeft.load_adapter(fresh, folder)  # ... and drawn again from the seed
    assert torch.equal(tiny.logits(fresh, batch), expected)
    assert len({id(p.form.vera_A) for _, p in loaded.delta_modules()}) == 2  # q (32→32) and v (32→16) shapes


def test_merge_and_unmerge(tiny):
    peft, _ = _pair(tiny, "llama")
    batch = tiny.batch("llama")
    before = {k: v.clone() for k, v in peft.base_state_dict().items()}
    unmerged = tiny.logits(peft.model, batch)
    peft.merge()
    torch.testing.assert_close(tiny.logits(peft.model, batch), unmerged, atol=1e-5, rtol=0)
    peft.unmerge()
    for key, value in peft.base_state_dict().items():
        torch.testing.assert_close(value, before[key], atol=1e-6, rtol=0)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="rank r must be >= 1, got 0"):
        VeRAConfig(r=0)
    with pytest.raises(ValueError, match="dropout"):
        VeRAConfig(dropout=-0.1)


def test_real_sst2_batch_loss_goes_down(minilm_sst2, loss_change):
    model, batch = minilm_sst2()
    peft = unipeft.attach(model, "vera")
    assert loss_change(model, peft, batch) < 0
