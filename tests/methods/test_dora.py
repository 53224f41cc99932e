"""DoRA (unipeft.methods.dora): parity with HF peft's ``use_dora=True``, parameter counts, merging, validation.

The shared invariants (identity at init, merge, detach, grads, save/load, training) run over the ``dora`` recipe in
tests/core/test_invariants.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

import unipeft
from unipeft.core.recipe import DeltaSpec, Recipe
from unipeft.methods.dora import DoRA, DoRAConfig

#: (family, HF target_modules, unipeft placement) — GPT-2's fused c_attn is targeted whole on both sides.
PLACES = {
    "bert": (["query", "value"], {"positions": ("attn.q", "attn.v")}),
    "llama": (["q_proj", "v_proj"], {"positions": ("attn.q", "attn.v")}),
    "gpt2": (["c_attn"], {"modules": ("c_attn",)}),
    "t5": (["q", "v"], {"positions": ("attn.q", "attn.v", "xattn.q", "xattn.v")}),
}


def _recipe(family: str, **form) -> Recipe:
    return Recipe(name="dora", family="reparameterized",
                  deltas=(DeltaSpec(form=DoRAConfig(**form), **PLACES[family][1]),))


def _pair(tiny, family: str, *, r: int = 4, alpha: float = 8.0, rslora: bool = False):
    """(unipeft handle, HF peft model) on two copies of the same tiny model, with equal random A, B and m."""
    ours = tiny.model(family)
    theirs = copy.deepcopy(ours)
    peft = unipeft.attach(ours, _recipe(family, r=r, alpha=alpha, rslora=rslora))
    hf = get_peft_model(theirs, LoraConfig(r=r, lora_alpha=alpha, target_modules=PLACES[family][0], use_dora=True,
                                           use_rslora=rslora, fan_in_fan_out=family == "gpt2"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module, placed in peft.delta_modules():
            form = placed.form
            layer = hf.base_model.model.get_submodule(module)
            torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight, form.magnitude,
                                       atol=0, rtol=0)  # the same init m = ‖W‖_c
            form.lora_B.normal_(0, 1.0, generator=g)
            form.magnitude.mul_(1 + 0.5 * torch.randn(form.magnitude.shape, generator=g))
            layer.lora_A["default"].weight.copy_(form.lora_A)
            layer.lora_B["default"].weight.copy_(form.lora_B)
            layer.lora_magnitude_vector["default"].weight.copy_(form.magnitude)
    return peft, hf


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2", "t5"])
def test_outputs_match_hf_peft(tiny, family):
    peft, hf = _pair(tiny, family)
    batch = tiny.batch(family)
    base = tiny.logits(tiny.model(family), batch)
    ours, theirs = tiny.logits(peft.model, batch), tiny.logits(hf, batch)
    assert (ours - base).abs().max() > 1e-4
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_gradients_match_hf_peft(tiny):
    """The norm is a constant in the backward pass on both sides, so the gradients agree too."""
    peft, hf = _pair(tiny, "bert", rslora=True)
    batch = tiny.batch("bert")
    tiny.loss(peft.model, batch).backward()
    tiny.loss(hf, batch).backward()
    for module, placed in peft.delta_modules():
        layer = hf.base_model.model.get_submodule(module)
        torch.testing.assert_close(placed.form.magnitude.grad, layer.lora_magnitude_vector["default"].weight.grad,
                                   atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(placed.form.lora_A.grad, layer.lora_A["default"].weight.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_parameter_count_matches_hf_peft(tiny, family):
    peft, hf = _pair(tiny, family, r=8)
    trainable, total = hf.get_nb_trainable_parameters()
    summary = peft.summary()
    assert summary.trainable == trainable
    assert summary.total == total


def test_merge_folds_the_hf_weight_and_unmerges(tiny):
    peft, hf = _pair(tiny, "llama")
    batch = tiny.batch("llama")
    before = {k: v.clone() for k, v in peft.base_state_dict().items()}
    unmerged = tiny.logits(peft.model, batch)
    peft.merge()
    hf.merge_adapter()
    for module, _ in peft.delta_modules():
        torch.testing.assert_close(peft.model.get_submodule(module).weight,
                                   hf.base_model.model.get_submodule(module).base_layer.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(tiny.logits(peft.model, batch), unmerged, atol=1e-5, rtol=0)
    peft.unmerge()
    for key, value in peft.base_state_dict().items():
        torch.testing.assert_close(value, before[key], atol=1e-6, rtol=0)


def test_merge_with_a_scaled_composition(tiny):
    """h + c·Δ folds too: W ← W + c·((f−1)W + f·sBA), and unmerging divides back."""
    model = tiny.model("bert")
    batch = tiny.batch("bert")
    recipe = Recipe(name="dora", family="reparameterized", deltas=(
        DeltaSpec(form=DoRAConfig(r=4), positions=("attn.q",), composition="scaled", scale=0.5),))
    peft = unipeft.attach(model, recipe)
    with torch.no_grad():
        for _, placed in peft.delta_modules():
            placed.form.lora_B.normal_(0, 0.3)
            placed.form.magnitude.mul_(1.5)
    before = {k: v.clone() for k, v in peft.base_state_dict().items()}
    unmerged = tiny.logits(model, batch)
    peft.merge()
    torch.testing.assert_close(tiny.logits(model, batch), unmerged, atol=1e-5, rtol=0)
    peft.unmerge()
    for key, value in peft.base_state_dict().items():
        torch.testing.assert_close(value, before[key], atol=1e-6, rtol=0)


def test_identity_at_init_and_trainable_parameters(tiny):
    model = tiny.model("bert")
    batch = tiny.batch("bert")
    before = tiny.logits(model, batch)
    peft = unipeft.attach(model, "dora")
    assert torch.equal(tiny.logits(model, batch), before)  # f = m/‖W‖ = 1 exactly and B = 0
    forms = [p.form for _, p in peft.delta_modules()]
    assert all(isinstance(f, DoRA) for f in forms)
    assert {n for n, _ in forms[0].named_parameters()} == {"lora_A", "lora_B", "magnitude"}
    assert not any(k.startswith("site") for k in forms[0].state_dict())  # the base is referenced, not owned


def test_fused_slice_is_exact_or_refused(tiny):
    """GPT-2's attn.q is a slice of c_attn: DoRA needs the slice's rows. Until the core passes the slice on
    (SiteShape.out_slice) the placement is refused with a clear message; with it, DoRA is exact at init."""
    from unipeft.core.delta import SiteShape

    model = tiny.model("gpt2")
    batch = tiny.batch("gpt2")
    before = tiny.logits(model, batch)
    if "out_slice" not in SiteShape.__dataclass_fields__:
        with pytest.raises(ValueError, match="fused projection"):
            unipeft.attach(model, "dora")
        return
    unipeft.attach(model, "dora")
    torch.testing.assert_close(tiny.logits(model, batch), before, atol=1e-6, rtol=0)


def test_embedding_and_bad_config_are_refused(tiny):
    with pytest.raises(ValueError, match="linear base module"):
        unipeft.attach(tiny.model("bert"), Recipe(name="x", family="reparameterized",
                                                  deltas=(DeltaSpec(form=DoRAConfig(), positions=("embed",)),)))
    with pytest.raises(ValueError, match="rank r must be >= 1, got 0"):
        DoRAConfig(r=0)
    with pytest.raises(ValueError, match="dropout"):
        DoRAConfig(dropout=1.0)


def test_real_sst2_batch_loss_goes_down(minilm_sst2, loss_change):
    model, batch = minilm_sst2()
    peft = unipeft.attach(model, "dora")
    assert loss_change(model, peft, batch) < 0


@pytest.mark.parametrize("order", [("lora", "dora"), ("dora", "lora")])
def test_stacked_with_lora_and_merged_together_equals_the_stacked_model(tiny, order):
    """DoRA reads its site's base weight; merged after another adapter folded into the same weight it used to read
    W + ΔW_other instead of W (6e-4 off). Merging in either order must give the stacked model to rounding."""
    model = tiny.model("llama")
    peft = unipeft.attach(model, _recipe("llama", r=4, alpha=8.0), name="dora")
    peft.add(Recipe(name="lora", family="reparameterized", deltas=(DeltaSpec(
        form=unipeft.load_recipe("lora").deltas[0].form, positions=("attn.q", "attn.v")),)), "lora")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, placed in peft.delta_modules():
            for name, p in placed.named_parameters():
                p.add_(torch.randn(p.shape, generator=g) * (0.3 if "magnitude" not in name else 0.1))
    peft.set_active(*order)
    batch = tiny.batch("llama")
    base_state = {k: v.clone() for k, v in peft.base_state_dict().items()}
    stacked = tiny.logits(model, batch)
    peft.merge(*order)
    torch.testing.assert_close(tiny.logits(model, batch), stacked, rtol=1e-5, atol=1e-5)
    peft.unmerge(order[0])  # the other stays merged, the stack still the same
    torch.testing.assert_close(tiny.logits(model, batch), stacked, rtol=1e-5, atol=1e-5)
    peft.unmerge()
    for key, tensor in peft.base_state_dict().items():
        torch.testing.assert_close(tensor, base_state[key], rtol=1e-5, atol=1e-6)
