"""UniPELT (Mao et al. 2022): gated LoRA + gated prefix + gated sequential adapter as one recipe of existing forms.

The shared invariants run over the ``unipelt`` recipe on every family in tests/core/test_sequence.py.
"""

from __future__ import annotations

import pytest
import torch

import unipeft
from unipeft.core.compose import Gated
from unipeft.core.recipe import DeltaSpec, Recipe, load_recipe
from unipeft.methods.prefix import Prefix, PrefixConfig


def test_recipe_gates_every_submodule():
    recipe = load_recipe("unipelt")
    assert recipe.family == "hybrid"
    assert [d.form.type for d in recipe.deltas] == ["lora", "prefix", "bottleneck"]
    assert all(d.composition == "gated" for d in recipe.deltas)
    assert [d.resolved_insertion for d in recipe.deltas] == ["parallel", "sequence", "sequential"]


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_every_placement_has_its_own_gate(tiny, family):
    peft = unipeft.attach(tiny.model(family), "unipelt")
    placed = [p for _, p in peft.delta_modules()]
    assert placed and all(isinstance(p.compose, Gated) for p in placed)
    assert len({id(p.compose.gate) for p in placed}) == len(placed)
    assert all(p.compose.gate.in_features == tiny.width for p in placed)


def test_gates_learn(tiny, randomize):
    """Every gate gets a gradient once its delta is non-zero (LoRA's and the adapter's start at 0, the prefix's not)."""
    model = tiny.model("bert")
    peft = unipeft.attach(model, "unipelt")
    tiny.loss(model, tiny.batch("bert")).backward()
    prefix_gates = [p.compose.gate.weight.grad for _, p in peft.delta_modules() if isinstance(p.form, Prefix)]
    assert prefix_gates and all(g is not None and g.abs().sum() > 0 for g in prefix_gates)
    model.zero_grad()
    randomize(peft)
    tiny.loss(model, tiny.batch("bert")).backward()
    for _, placed in peft.delta_modules():
        assert placed.compose.gate.weight.grad is not None and placed.compose.gate.weight.grad.abs().sum() > 0


def _prefix_recipe(composition: str) -> Recipe:
    return Recipe(name="p", family="additive", deltas=(
        DeltaSpec(form=PrefixConfig(length=3, reparam=None), positions=("attn",), composition=composition),))


@pytest.mark.parametrize("bias, factor", [(30.0, 1.0), (0.0, 0.5)])
def test_prefix_gate_scales_keys_and_values(tiny, bias, factor):
    """g = mean_t σ(x_t W_g + b_g) scales P_k and P_v (Mao et al.'s code): g = 1 is the plain prefix, g = 1/2 the
    plain prefix with halved vectors."""
    batch = tiny.batch("llama")
    gated_model, plain_model = tiny.model("llama"), tiny.model("llama")
    gated = unipeft.attach(gated_model, _prefix_recipe("gated"))
    plain = unipeft.attach(plain_model, _prefix_recipe("add"))
    with torch.no_grad():
        for (_, g), (_, p) in zip(gated.delta_modules(), plain.delta_modules()):
            g.compose.gate.weight.zero_()
            g.compose.gate.bias.fill_(bias)
            p.form.key.copy_(g.form.key * factor)
            p.form.value.copy_(g.form.value * factor)
    torch.testing.assert_close(tiny.logits(gated_model, batch), tiny.logits(plain_model, batch), atol=1e-5, rtol=0)


def test_unipelt_counts_on_roberta_base():
    """LoRA r=8 on q, v + prefix l=10 + adapter r=48, each placement with a gate Linear(768, 1)."""
    from unipeft.models.configs import build_meta_model, known_config

    model = build_meta_model(known_config("roberta-base"), "classification")
    summary = unipeft.attach(model, "unipelt").summary()
    d, layers, gate = 768, 12, 768 + 1
    lora = layers * 2 * (2 * 8 * d + gate)
    prefix = layers * (2 * 10 * d + gate)
    adapter = layers * (d * 48 + 48 + 48 * d + d + gate)
    assert summary.per_adapter["default"] == lora + prefix + adapter == 1_410_672
