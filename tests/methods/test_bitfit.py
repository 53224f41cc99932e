"""BitFit (unipeft.methods.bitfit): h = W x + b + Δb, merged into b; same gradients as training b itself."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import unipeft
from unipeft.core.delta import SiteShape
from unipeft.methods.bitfit import BiasConfig


def test_formula_and_init():
    base = nn.Linear(4, 6)
    delta = BiasConfig().build(SiteShape(d_in=4, d_out=6, base=base))
    assert torch.equal(delta.bias, torch.zeros(6))
    with torch.no_grad():
        delta.bias.normal_()
    assert delta(torch.randn(3, 4)) is delta.bias  # the same vector for every token


def test_sites_of_the_recipe(tiny):
    model = tiny.model("bert")
    peft = unipeft.attach(model, "bitfit")
    layer0 = sorted(m.removeprefix("bert.encoder.layer.0.") for m, _ in peft.delta_modules()
                    if m.startswith("bert.encoder.layer.0."))
    assert layer0 == sorted(["attention.self.query", "attention.self.key", "attention.self.value",
                             "attention.output.dense", "intermediate.dense", "output.dense",
                             "attention.output.LayerNorm", "output.LayerNorm"])


def test_shift_on_a_projection_and_a_norm(tiny, randomize):
    model = tiny.model("bert")
    layer = model.bert.encoder.layer[0]
    query, norm = layer.attention.self.query, layer.output.LayerNorm
    peft = unipeft.attach(model, "bitfit")
    randomize(peft)
    db_q = layer.attention.self.query.adapters["default"][0].form.bias
    db_n = layer.output.LayerNorm.adapters["default"][0].form.bias
    x = torch.randn(2, 3, tiny.width)
    with torch.no_grad():
        torch.testing.assert_close(layer.attention.self.query(x), query(x) + db_q)
        torch.testing.assert_close(layer.output.LayerNorm(x), norm(x) + db_n)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_merge_adds_to_the_bias(tiny, randomize, family):
    model = tiny.model(family)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    batch = tiny.batch(family)
    peft = unipeft.attach(model, "bitfit")
    randomize(peft)
    adapted = tiny.logits(model, batch)
    deltas = {m: placed.form.bias.detach().clone() for m, placed in peft.delta_modules()}
    peft.merge()
    torch.testing.assert_close(tiny.logits(model, batch), adapted, atol=1e-5, rtol=0)
    merged = peft.base_state_dict()
    for key, value in merged.items():
        module, _, tensor = key.rpartition(".")
        if tensor != "bias" or module not in deltas:
            assert torch.equal(value, weights[key]), key  # weights, and biases without a delta, never change
    for module, delta in deltas.items():
        if not module.endswith("c_attn"):  # q, k, v of GPT-2 are three slices of one bias
            torch.testing.assert_close(merged[f"{module}.bias"], weights[f"{module}.bias"] + delta)


def test_gpt2_qkv_bias_slices(tiny, randomize):
    model = tiny.model("gpt2")
    d = tiny.width
    bias = model.transformer.h[0].attn.c_attn.bias.detach().clone()
    peft = unipeft.attach(model, "bitfit")
    randomize(peft)
    q, k, v = [p.form.bias.detach() for m, p in peft.delta_modules() if m == "transformer.h.0.attn.c_attn"]
    peft.merge()
    torch.testing.assert_close(model.transformer.h[0].attn.c_attn.bias, bias + torch.cat([q, k, v]))


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_no_bias_to_merge_into(tiny, family):
    """LLaMA and T5 projections and norms have no bias: BitFit's Δb still trains, but cannot be merged."""
    peft = unipeft.attach(tiny.model(family), "bitfit")
    assert peft.summary().trainable > 0
    with pytest.raises(NotImplementedError, match="cannot be merged: BiasDelta"):
        peft.merge()
    assert peft.merged == []


def test_same_gradients_as_training_the_bias(tiny):
    """At Δb = 0, ∂loss/∂Δb equals ∂loss/∂b of the un-adapted model: BitFit is training the biases."""
    batch = tiny.batch("bert")
    plain = tiny.model("bert")
    tiny.loss(plain, batch).backward()
    model = tiny.model("bert")
    peft = unipeft.attach(model, "bitfit")
    tiny.loss(model, batch).backward()
    for module, placed in peft.delta_modules():
        expected = plain.get_submodule(module).bias.grad
        torch.testing.assert_close(placed.form.bias.grad, expected, atol=1e-7, rtol=1e-5)
