"""PiSSA and OLoRA inits of LoRA (unipeft.methods.lora_init) and the rsLoRA recipe: parity with HF peft's
``init_lora_weights="pissa"/"olora"`` and ``use_rslora``, the rewritten base and its exact restoration.

The shared invariants (identity at init, merge, detach, grads, save/load, training) run over the ``pissa``, ``olora``
and ``rslora`` recipes in tests/core/test_invariants.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

import unipeft
from unipeft.core.recipe import DeltaSpec, Recipe
from unipeft.methods.lora import LoRAConfig

TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"], "t5": ["q", "v"]}
INITS = ("pissa", "olora")


def _recipe(family: str, **form) -> Recipe:
    placement = {"modules": ("c_attn",)} if family == "gpt2" else \
        {"positions": ("attn.q", "attn.v", "xattn.q", "xattn.v") if family == "t5" else ("attn.q", "attn.v")}
    return Recipe(name="lora", family="reparameterized", deltas=(DeltaSpec(form=LoRAConfig(**form), **placement),))


def _pair(tiny, family: str, init: str, *, r: int = 4, alpha: float = 8.0, rslora: bool = False):
    """(unipeft handle, HF peft model, the untouched model) for the same base weights and the same init."""
    original = tiny.model(family)
    ours, theirs = copy.deepcopy(original), copy.deepcopy(original)
    peft = unipeft.attach(ours, _recipe(family, r=r, alpha=alpha, rslora=rslora, init=init))
    hf = get_peft_model(theirs, LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, init_lora_weights=init,
                                           target_modules=TARGETS.get(family, ["c_attn"]),
                                           fan_in_fan_out=family == "gpt2"))
    return peft, hf, original


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("family", ["bert", "llama", "t5"])
def test_factors_residual_and_outputs_match_hf_peft(tiny, family, init, rslora):
    peft, hf, original = _pair(tiny, family, init, rslora=rslora)
    batch = tiny.batch(family)
    for module, placed in peft.delta_modules():
        layer = hf.base_model.model.get_submodule(module)
        torch.testing.assert_close(placed.form.lora_A, layer.lora_A["default"].weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(placed.form.lora_B, layer.lora_B["default"].weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(peft.model.get_submodule(module).weight, layer.base_layer.weight, atol=1e-7, rtol=0)
        assert (placed.form.lora_B.abs().sum() > 0) and not torch.equal(
            peft.model.get_submodule(module).weight, original.get_submodule(module).weight)
    before = tiny.logits(original, batch)
    ours, theirs = tiny.logits(peft.model, batch), tiny.logits(hf, batch)
    torch.testing.assert_close(ours, before, atol=1e-5, rtol=0)  # the adapted model starts as the original
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_pissa_on_gpt2_conv1d_matches_hf_peft(tiny):
    """GPT-2's Conv1D stores (in, out); PiSSA works on the (out, in) view, as HF's fan_in_fan_out."""
    peft, hf, original = _pair(tiny, "gpt2", "pissa")
    batch = tiny.batch("gpt2")
    for module, placed in peft.delta_modules():
        layer = hf.base_model.model.get_submodule(module)
        torch.testing.assert_close(placed.form.lora_B, layer.lora_B["default"].weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(peft.model.get_submodule(module).weight, layer.base_layer.weight, atol=1e-7, rtol=0)
    torch.testing.assert_close(tiny.logits(peft.model, batch), tiny.logits(original, batch), atol=1e-5, rtol=0)
    torch.testing.assert_close(tiny.logits(peft.model, batch), tiny.logits(hf, batch), atol=1e-5, rtol=0)


def test_the_factors_are_the_papers(tiny):
    """PiSSA: s·B A is the best rank-r approximation (U_r S_r V_rᵀ); OLoRA: B has orthonormal columns."""
    for init in INITS:
        model = tiny.model("llama")
        weight = model.get_submodule("model.layers.0.self_attn.q_proj").weight.detach().clone()
        peft = unipeft.attach(model, init)
        form = dict(peft.delta_modules())["model.layers.0.self_attn.q_proj"].form
        approx = form.scaling * form.lora_B @ form.lora_A
        if init == "pissa":
            u, s, vh = torch.linalg.svd(weight)
            torch.testing.assert_close(approx, u[:, :8] @ torch.diag(s[:8]) @ vh[:8], atol=1e-5, rtol=0)
        else:
            torch.testing.assert_close(form.lora_B.T @ form.lora_B, torch.eye(8), atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", INITS)
def test_detach_restores_the_original_weights_bit_for_bit(tiny, init):
    model = tiny.model("llama")
    batch = tiny.batch("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    peft = unipeft.attach(model, init)
    optimizer = torch.optim.AdamW(peft.trainable_parameters(), lr=1e-2)
    for _ in range(2):
        tiny.loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    peft.detach()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("init", INITS)
def test_merge_detach_and_export(tiny, randomize, init):
    """detach() after a merge unmerges (the original weights up to rounding); detach(keep_merged=True) exports
    W + s·(B A − B₀ A₀), i.e. the adapted model, as HF's PiSSA/OLoRA conversion."""
    for keep in (False, True):
        model = tiny.model("bert")
        batch = tiny.batch("bert")
        state = {k: v.clone() for k, v in model.state_dict().items()}
        peft = unipeft.attach(model, init)
        randomize(peft, std=0.2)
        adapted = tiny.logits(model, batch)
        peft.merge()
        torch.testing.assert_close(tiny.logits(model, batch), adapted, atol=1e-5, rtol=0)
        peft.detach(keep_merged=keep)
        if keep:
            torch.testing.assert_close(tiny.logits(model, batch), adapted, atol=1e-5, rtol=0)
        else:
            for key, value in model.state_dict().items():
                torch.testing.assert_close(value, state[key], atol=1e-6, rtol=0)


def test_stacked_rewrites_compose(tiny):
    """A second PiSSA adapter factors the first one's residual; removing the first keeps the second consistent."""
    model = tiny.model("llama")
    batch = tiny.batch("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = tiny.logits(model, batch)
    peft = unipeft.attach(model, "pissa", name="a")
    peft.add("olora", name="b")
    peft.set_active("a", "b")
    torch.testing.assert_close(tiny.logits(model, batch), before, atol=1e-5, rtol=0)
    peft.remove("a")
    torch.testing.assert_close(tiny.logits(model, batch), before, atol=1e-5, rtol=0)  # b alone: still W x at init
    peft.detach()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], atol=1e-6, rtol=0)


def test_save_load_recomputes_the_same_residual(tiny, randomize, tmp_path):
    model = tiny.model("t5")
    batch = tiny.batch("t5")
    peft = unipeft.attach(model, "pissa")
    randomize(peft)
    expected = tiny.logits(model, batch)
    assert set(k.rsplit(".", 1)[-1] for k in peft.adapter_state_dict("default")) == {"lora_A", "lora_B"}
    loaded = unipeft.load_adapter(tiny.model("t5"), peft.save(str(tmp_path / "pissa")))
    assert torch.equal(tiny.logits(loaded.model, batch), expected)
    assert torch.equal(loaded.base_state_dict()["encoder.block.0.layer.0.SelfAttention.q.weight"],
                       peft.base_state_dict()["encoder.block.0.layer.0.SelfAttention.q.weight"])


def test_rslora_recipe_matches_hf_peft(tiny, randomize):
    """The rslora recipe is LoRA with scaling α/√r (HF's ``use_rslora=True``)."""
    recipe = unipeft.load_recipe("rslora")
    form = recipe.deltas[0].form
    assert form.rslora and form.scaling == pytest.approx(form.alpha / form.r ** 0.5)
    original = tiny.model("llama")
    ours, theirs = copy.deepcopy(original), copy.deepcopy(original)
    peft = unipeft.attach(ours, recipe)
    hf = get_peft_model(theirs, LoraConfig(r=form.r, lora_alpha=form.alpha, use_rslora=True,
                                           target_modules=TARGETS["llama"]))
    randomize(peft, std=0.3)
    with torch.no_grad():
        for module, placed in peft.delta_modules():
            layer = hf.base_model.model.get_submodule(module)
            layer.lora_A["default"].weight.copy_(placed.form.lora_A)
            layer.lora_B["default"].weight.copy_(placed.form.lora_B)
    batch = tiny.batch("llama")
    torch.testing.assert_close(tiny.logits(ours, batch), tiny.logits(hf, batch), atol=1e-5, rtol=0)
    assert peft.summary().trainable == hf.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("init", INITS)
def test_parameter_count_matches_hf_peft(tiny, init):
    peft, hf, _ = _pair(tiny, "llama", init, r=8)
    assert peft.summary().trainable == hf.get_nb_trainable_parameters()[0]


def test_fused_slice_is_exact_or_refused(tiny):
    """GPT-2's attn.q is a slice of c_attn: PiSSA needs the slice's rows (see test_dora's twin)."""
    from unipeft.core.delta import SiteShape

    model = tiny.model("gpt2")
    batch = tiny.batch("gpt2")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = tiny.logits(model, batch)
    if "out_slice" not in SiteShape.__dataclass_fields__:
        with pytest.raises(ValueError, match="fused projection"):
            unipeft.attach(model, "pissa")
        return
    peft = unipeft.attach(model, "pissa")
    torch.testing.assert_close(tiny.logits(model, batch), before, atol=1e-5, rtol=0)
    peft.detach()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_invalid_uses_are_refused(tiny):
    with pytest.raises(ValueError, match="unknown LoRA init 'svd'; valid: kaiming, gaussian, pissa, olora"):
        LoRAConfig(init="svd")
    with pytest.raises(ValueError, match="linear base module"):
        unipeft.attach(tiny.model("bert"), Recipe(name="x", family="reparameterized", deltas=(
            DeltaSpec(form=LoRAConfig(init="pissa"), positions=("embed",)),)))
    model = tiny.model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"needs r <= min\(out, in\) = 16"):
        unipeft.attach(model, "olora", r=20)
    for key, value in model.state_dict().items():  # a refused attach leaves the base untouched
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("recipe", ["pissa", "olora", "rslora"])
def test_real_sst2_batch_loss_goes_down(minilm_sst2, recipe, loss_change):
    model, batch = minilm_sst2()
    peft = unipeft.attach(model, recipe)
    assert loss_change(model, peft, batch) < 0
