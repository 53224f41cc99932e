"""AdaLoRA (unipeft.methods.adalora): parity with HF peft's AdaLoraConfig (outputs, orthogonality loss, the rank
allocation schedule step by step), parameter counts, and the budget shrinking to target_r per site.

The shared invariants (identity at init, merge, detach, grads, save/load, training) run over the ``adalora`` recipe in
tests/core/test_invariants.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import AdaLoraConfig, get_peft_model

import unipeft
from unipeft.core.recipe import DeltaSpec, Recipe
from unipeft.methods.adalora import AdaLoRA, AdaLoRAConfig, RankAllocator, adalora_orth_loss

TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"], "t5": ["q", "v"]}
SCHEDULE = dict(init_r=6, target_r=2, tinit=2, tfinal=3, deltaT=2, beta1=0.8, beta2=0.9, orth_reg_weight=0.3)
TOTAL = 14


def _recipe(family: str = "bert", **form) -> Recipe:
    positions = ("attn.q", "attn.v", "xattn.q", "xattn.v") if family == "t5" else ("attn.q", "attn.v")  # HF's q, v
    return Recipe(name="adalora", family="reparameterized",
                  deltas=(DeltaSpec(form=AdaLoRAConfig(**form), positions=positions),))


def _pair(tiny, family: str, *, alpha: float = 8.0, **form):
    """(unipeft handle, HF peft model) on two copies of the same tiny model, with equal random P, Λ, Q."""
    ours = tiny.model(family)
    theirs = copy.deepcopy(ours)
    peft = unipeft.attach(ours, _recipe(family, alpha=alpha, **form))
    hf_form = {k: v for k, v in form.items()}
    hf = get_peft_model(theirs, AdaLoraConfig(lora_alpha=alpha, target_modules=TARGETS[family], total_step=TOTAL,
                                              **hf_form))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module, placed in peft.delta_modules():
            layer = hf.base_model.model.get_submodule(module)
            for name in ("lora_A", "lora_E", "lora_B"):
                ours_p, theirs_p = getattr(placed.form, name), getattr(layer, name)["default"]
                assert ours_p.shape == theirs_p.shape, name
                ours_p.normal_(0, 0.3, generator=g)
                theirs_p.copy_(ours_p)
    return peft, hf


@pytest.mark.parametrize("family", ["bert", "llama", "t5"])
def test_outputs_and_orthogonality_loss_match_hf_peft(tiny, family):
    peft, hf = _pair(tiny, family, **SCHEDULE)
    batch = tiny.batch(family)
    ours, theirs = tiny.logits(peft.model, batch), tiny.logits(hf, batch)
    assert (ours - tiny.logits(tiny.model(family), batch)).abs().max() > 1e-4
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    # HF's AdaLoraModel.forward adds orth_reg_weight · mean ‖·‖_F to outputs.loss; unipeft leaves it to the loop
    ours_loss = tiny.loss(peft.model, batch) + adalora_orth_loss(peft)
    assert adalora_orth_loss(peft).item() > 0.1
    torch.testing.assert_close(ours_loss, tiny.loss(hf.base_model, batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_parameter_count_matches_hf_peft(tiny, family):
    """Trainable counts agree; HF's total has one frozen ``ranknum`` parameter per site more."""
    peft, hf = _pair(tiny, family, init_r=12, target_r=8)
    trainable, total = hf.get_nb_trainable_parameters()
    sites = len(list(peft.delta_modules()))
    assert peft.summary().trainable == trainable
    assert peft.summary().total == total - sites


def test_rank_allocation_follows_hf_peft_step_by_step(tiny):
    """The same training run on both sides: after every step the masked singular values and the ranks agree."""
    peft, hf = _pair(tiny, "bert", **SCHEDULE)
    batch = tiny.batch("bert")
    params = {"ours": peft.trainable_parameters(), "hf": [p for p in hf.parameters() if p.requires_grad]}
    opt = {k: torch.optim.AdamW(v, lr=1e-2) for k, v in params.items()}
    for step in range(TOTAL):
        (tiny.loss(peft.model, batch) + adalora_orth_loss(peft)).backward()
        tiny.loss(hf.base_model, batch).backward()  # AdaLoraModel.forward: with the orthogonality term
        for o in opt.values():
            o.step()
        peft.on_step(step, TOTAL)
        hf.base_model.update_and_allocate(step)
        for o in opt.values():
            o.zero_grad()
        for module, placed in peft.delta_modules():
            layer = hf.base_model.model.get_submodule(module)
            theirs = layer.lora_E["default"]
            assert torch.equal(placed.form.lora_E == 0, theirs == 0), (step, module)
            torch.testing.assert_close(placed.form.lora_E, theirs, atol=1e-4, rtol=1e-3)
    pattern = hf.peft_config["default"].rank_pattern
    assert sum(sum(kept) for kept in pattern.values()) == 2 * len(pattern)  # the budget reached target_r per site
    for module, placed in peft.delta_modules():
        assert placed.form.rank_mask.tolist() == pattern[f"{module}.lora_E.default"], module


def test_ranks_shrink_to_the_budget(tiny):
    model = tiny.model("llama")
    batch = tiny.batch("llama")
    peft = unipeft.attach(model, _recipe(**SCHEDULE))
    forms = [p.form for _, p in peft.delta_modules()]
    assert [f.rank for f in forms] == [6] * len(forms)
    allocator = forms[0].allocator
    assert all(f.allocator is allocator for f in forms) and allocator.budgets() == (6 * len(forms), 2 * len(forms))
    optimizer = torch.optim.AdamW(peft.trainable_parameters(), lr=1e-2)
    budgets = []
    for step in range(TOTAL):
        (tiny.loss(model, batch) + adalora_orth_loss(peft)).backward()
        optimizer.step()
        peft.on_step(step, TOTAL)
        optimizer.zero_grad()
        budgets.append(sum(f.rank for f in forms))
    assert budgets[:3] == [24, 24, 24]  # warm-up: t <= tinit
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))  # the cubic schedule only shrinks
    assert budgets[-1] == 2 * len(forms)  # target_r per site on average, however it is spread
    for f in forms:
        assert not f.lora_E[~f.rank_mask].any()  # masked singular values are exactly zero
    assert len({f.rank for f in forms}) >= 1 and max(f.rank for f in forms) <= 6


def test_masked_ranks_survive_save_and_load(tiny, tmp_path):
    model = tiny.model("bert")
    batch = tiny.batch("bert")
    peft = unipeft.attach(model, _recipe(**SCHEDULE))
    optimizer = torch.optim.AdamW(peft.trainable_parameters(), lr=1e-2)
    for step in range(TOTAL):
        tiny.loss(model, batch).backward()
        optimizer.step()
        peft.on_step(step, TOTAL)
        optimizer.zero_grad()
    expected = tiny.logits(model, batch)
    ranks = [p.form.rank for _, p in peft.delta_modules()]
    loaded = unipeft.load_adapter(tiny.model("bert"), peft.save(str(tmp_path / "adalora")))
    assert [p.form.rank for _, p in loaded.delta_modules()] == ranks
    assert torch.equal(tiny.logits(loaded.model, batch), expected)


def test_on_step_needs_the_gradients(tiny):
    model = tiny.model("bert")
    peft = unipeft.attach(model, _recipe(**SCHEDULE))
    tiny.loss(model, tiny.batch("bert")).backward()
    for p in peft.trainable_parameters():
        p.grad = None
    with pytest.raises(RuntimeError, match="before optimizer.zero_grad"):
        peft.on_step(0, TOTAL)
    with pytest.raises(ValueError, match="no budgeting phase"):
        peft.on_step(1, 4)


def test_each_adapter_gets_its_own_budget(tiny):
    model = tiny.model("bert")
    recipe = _recipe(**SCHEDULE)
    peft = unipeft.attach(model, recipe, name="a")
    peft.add(recipe, name="b")  # the same config object: still a new adapter, a new allocator
    a = {p.form.allocator for _, p in peft.delta_modules("a")}
    b = {p.form.allocator for _, p in peft.delta_modules("b")}
    assert len(a) == len(b) == 1 and a != b
    assert next(iter(a)).budgets() == (6 * 4, 2 * 4)
    assert not RankAllocator._open  # every allocator was closed by its sites' on_attach
    peft.remove("a")
    assert next(iter(b)).budgets() == (6 * 4, 2 * 4)
    assert adalora_orth_loss(peft, "b").item() > 0


def test_orth_loss_is_zero_without_adalora(tiny):
    peft = unipeft.attach(tiny.model("bert"), "lora")
    assert adalora_orth_loss(peft).item() == 0.0


def test_merge_and_unmerge(tiny, randomize):
    model = tiny.model("llama")
    batch = tiny.batch("llama")
    peft = unipeft.attach(model, "adalora")
    assert all(isinstance(p.form, AdaLoRA) for _, p in peft.delta_modules())
    randomize(peft, std=0.5)
    weights = {k: v.clone() for k, v in peft.base_state_dict().items()}
    unmerged = tiny.logits(model, batch)
    peft.merge()
    torch.testing.assert_close(tiny.logits(model, batch), unmerged, atol=1e-5, rtol=0)
    peft.on_step(5, 10)  # a merged adapter does not reallocate (it would break the unmerge)
    peft.unmerge()
    for key, value in peft.base_state_dict().items():
        torch.testing.assert_close(value, weights[key], atol=1e-6, rtol=0)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match=r"target_r must be in \[0, init_r=4\], got 5"):
        AdaLoRAConfig(init_r=4, target_r=5)
    with pytest.raises(ValueError, match="beta1 must be in"):
        AdaLoRAConfig(beta1=1.0)
    with pytest.raises(ValueError, match="deltaT >= 1"):
        AdaLoRAConfig(deltaT=0)
    with pytest.raises(ValueError, match="orth_reg_weight must be >= 0"):
        AdaLoRAConfig(orth_reg_weight=-1.0)


def test_real_sst2_batch_loss_goes_down(minilm_sst2, loss_change):
    model, batch = minilm_sst2()
    peft = unipeft.attach(model, "adalora")
    assert loss_change(model, peft, batch) < 0
