"""Invariants every built-in recipe keeps on every model family with a position table.

(1) attaching leaves the outputs unchanged (every built-in recipe but the sequence-level ones starts at the
identity); (2) merged equals unmerged
for mergeable recipes, and the others refuse with a clear NotImplementedError and change nothing; (3) detach restores
the exact original state dict and module objects; (4) only delta parameters require grad; (5) save → load
round-trips exactly; (6) a few optimisation steps on a fixed batch lower the loss.
"""

from __future__ import annotations

import pytest
import torch

import unipeft
from unipeft.core.adapted import site_base
from unipeft.core.site import DeltaSite

#: Sequence-level recipes (prefix, prompt and the hybrids that contain them) are not the identity at init (a prompt even
#: lengthens the output); tests/core/test_sequence.py checks them with invariants adapted to that.
SEQUENCE_RECIPES = {name for name in unipeft.builtin_recipe_names()
                    if any(d.resolved_insertion == "sequence" for d in unipeft.load_recipe(name).deltas)}
RECIPES = [name for name in unipeft.builtin_recipe_names() if name not in SEQUENCE_RECIPES]
FAMILIES = ("bert", "gpt2", "llama", "t5")
#: Recipes that fold into the base weights on every family.
ALWAYS_MERGEABLE = {"lora", "ia3", "full"}
#: Recipes whose deltas are not linear in the weight (bottleneck adapters).
NEVER_MERGEABLE = {"houlsby", "pfeiffer", "parallel_adapter", "scaled_pa"}
#: Families whose every BitFit site (projections and norms) has a bias to merge into.
BIASED_FAMILIES = {"bert", "gpt2"}

cases = pytest.mark.parametrize("family", FAMILIES)
recipes = pytest.mark.parametrize("recipe", RECIPES)


def test_builtin_recipes_are_covered():
    """Every pinned recipe still ships (a renamed recipe must not silently drop out of these tests), and the
    sequence recipes left to test_sequence.py are the ones it covers."""
    assert ALWAYS_MERGEABLE | NEVER_MERGEABLE | {"bitfit"} <= set(RECIPES)
    assert {"prefix", "prompt"} <= SEQUENCE_RECIPES


def _expect_mergeable(recipe: str, family: str, peft: unipeft.Peft) -> bool:
    if recipe in ALWAYS_MERGEABLE:
        return True
    if recipe in NEVER_MERGEABLE:
        return False
    if recipe == "bitfit":
        return family in BIASED_FAMILIES
    # a recipe added later: trust the placements' own claim, which the merge itself then checks
    return all(p.insertion == "replace" or (p.mergeable and p.merge_problem(site_base(peft, m)) is None)
               for m, p in peft.delta_modules())


@recipes
@cases
def test_attach_leaves_outputs_unchanged(tiny, family, recipe):
    model = tiny.model(family)
    batch = tiny.batch(family)
    before = tiny.logits(model, batch)
    peft = unipeft.attach(model, recipe)
    assert peft.active == ["default"]
    torch.testing.assert_close(tiny.logits(model, batch), before, atol=1e-5, rtol=0)


@recipes
@cases
def test_merged_equals_unmerged(tiny, randomize, family, recipe):
    torch.manual_seed(0)  # the deltas' init draws from the global generator: the same values whatever ran before
    model = tiny.model(family)
    batch = tiny.batch(family)
    base = tiny.logits(model, batch)
    peft = unipeft.attach(model, recipe)
    randomize(peft, std=0.5)
    unmerged = tiny.logits(model, batch)
    if recipe != "full":
        assert (unmerged - base).abs().max() > 1e-4, "randomised deltas should change the output"
    weights = {k: v.clone() for k, v in peft.base_state_dict().items()}
    if _expect_mergeable(recipe, family, peft):
        peft.merge()
        assert peft.merged == (["default"] if peft.records["default"] else [])
        # float32 rounding grows with the logits' size: W + s·ΔW rounds every weight once, and through T5's 2 x 2
        # layers that reached 2.1e-5 of the largest logit for some draws of the deltas (rsLoRA, std 0.5)
        atol = 5e-5 * max(1.0, unmerged.abs().max().item())
        torch.testing.assert_close(tiny.logits(model, batch), unmerged, atol=atol, rtol=0)
        peft.unmerge()
        assert peft.merged == []
        torch.testing.assert_close(tiny.logits(model, batch), unmerged, atol=atol, rtol=0)
        for key, value in peft.base_state_dict().items():
            torch.testing.assert_close(value, weights[key], atol=1e-6, rtol=1e-5)
    else:
        with pytest.raises(NotImplementedError, match="cannot be merged"):
            peft.merge()
        assert peft.merged == []
        for key, value in peft.base_state_dict().items():  # a refused merge changes nothing
            assert torch.equal(value, weights[key]), key


@recipes
@cases
def test_detach_restores_the_original_model(tiny, randomize, family, recipe):
    model = tiny.model(family)
    batch = tiny.batch(family)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = tiny.logits(model, batch)

    peft = unipeft.attach(model, recipe)
    randomize(peft)
    returned = peft.detach()

    assert returned is model
    after = model.state_dict()
    assert list(after) == list(state)
    for key, value in state.items():
        assert torch.equal(after[key], value), key
    assert dict(model.named_modules()).keys() == modules.keys()
    for name, module in model.named_modules():
        assert module is modules[name], name
        assert not isinstance(module, DeltaSite)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    with pytest.raises(ValueError, match="no unipeft adapters"):
        unipeft.handle(model)
    assert torch.equal(tiny.logits(model, batch), before)  # nothing else was left patched


@pytest.mark.parametrize("recipe", ["lora", "ia3", "bitfit"])
@cases
def test_detach_after_merge(tiny, randomize, family, recipe):
    """detach() unmerges first (weights back up to rounding); detach(keep_merged=True) keeps the merged weights."""
    for keep in (False, True):
        model = tiny.model(family)
        batch = tiny.batch(family)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        peft = unipeft.attach(model, recipe)
        randomize(peft)
        adapted = tiny.logits(model, batch)
        try:
            peft.merge()
        except NotImplementedError:
            assert recipe == "bitfit" and family not in BIASED_FAMILIES
            return
        peft.detach(keep_merged=keep)
        assert not any(isinstance(m, DeltaSite) for m in model.modules())
        after = model.state_dict()
        assert list(after) == list(state)
        if keep:
            torch.testing.assert_close(tiny.logits(model, batch), adapted, atol=1e-5, rtol=0)
        else:
            for key, value in state.items():
                torch.testing.assert_close(after[key], value, atol=1e-6, rtol=1e-5)


@recipes
@cases
def test_only_delta_parameters_train(tiny, family, recipe):
    model = tiny.model(family)
    peft = unipeft.attach(model, recipe)
    delta = {id(p): p for _, placed in peft.delta_modules() for p in placed.parameters()}
    base = list(peft.base_parameters())
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in peft.trainable_parameters()} == trainable
    if recipe == "full":
        assert not delta
        assert all(p.requires_grad for p in base)
        assert trainable == {id(p) for p in model.parameters()}
    else:
        assert delta, "a recipe with deltas places parameters"
        assert not any(p.requires_grad for p in base)
        assert trainable == set(delta)
    assert peft.summary().trainable == sum(p.numel() for p in {id(p): p for p in peft.trainable_parameters()}.values())

    peft.set_active()  # nothing active: no delta trains
    assert not any(p.requires_grad for p in delta.values())


@recipes
@cases
def test_save_load_round_trip(tiny, randomize, tmp_path, family, recipe):
    model = tiny.model(family)
    batch = tiny.batch(family)
    peft = unipeft.attach(model, recipe)
    randomize(peft)
    if recipe == "full":  # the trainable tensors are the base's own
        with torch.no_grad():
            for p in peft.trainable_parameters():
                p.add_(torch.randn_like(p) * 0.01)
    expected = tiny.logits(model, batch)
    saved = {k: v.clone() for k, v in peft.adapter_state_dict("default").items()}
    folder = peft.save(str(tmp_path / "adapter"))
    assert {p.name for p in folder.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}

    fresh = tiny.model(family)
    loaded = unipeft.load_adapter(fresh, folder)
    assert loaded.active == ["default"]
    assert loaded.recipes["default"] == peft.recipes["default"]
    state = loaded.adapter_state_dict("default")
    assert state.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(state[key], value), key
    assert torch.equal(tiny.logits(fresh, batch), expected)
    # the loaded adapter trains like an attached one
    assert {id(p) for p in loaded.trainable_parameters()} == {id(p) for p in fresh.parameters() if p.requires_grad}
    assert len(loaded.trainable_parameters()) == len(peft.trainable_parameters())


@recipes
@cases
def test_training_lowers_the_loss(tiny, family, recipe):
    model = tiny.model(family)
    batch = tiny.batch(family)
    peft = unipeft.attach(model, recipe)
    model.train()
    optimizer = torch.optim.AdamW(peft.trainable_parameters(), lr=1e-2 if recipe != "full" else 1e-3)
    losses = []
    for _ in range(3):  # the last loss is measured after two steps
        loss = tiny.loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # strictly lower (a random tiny BERT's logits are ~1e-2, so some recipes move its loss only by ~1e-5)
    assert losses[-1] < losses[0], f"{recipe} on {family}: losses {losses}"
