"""(IA)³ (unipeft.methods.ia3): k' = l_k ⊙ k, v' = l_v ⊙ v, FFN W_down (l_ff ⊙ a); merging; parity with HF peft."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import unipeft
from unipeft.core.delta import SiteShape
from unipeft.methods.ia3 import IA3Config

peft_lib = pytest.importorskip("peft")


def test_vector_and_init():
    base = nn.Linear(5, 7)
    ia3 = IA3Config().build(SiteShape(d_in=5, d_out=7, base=base))
    assert torch.equal(ia3(), torch.ones(7))
    assert torch.equal(IA3Config(init=0.5).build(SiteShape(d_in=5, d_out=7, base=base))(), torch.full((7,), 0.5))
    assert [n for n, _ in ia3.named_parameters()] == ["ia3_l"]


def test_positions_and_insertions_of_the_recipe(tiny):
    peft = unipeft.attach(tiny.model("llama"), "ia3")
    placed = {(m.split(".", 3)[-1], p.insertion, p.form.ia3_l.numel()) for m, p in peft.delta_modules()}
    assert placed == {("self_attn.k_proj", "multiplicative", 16), ("self_attn.v_proj", "multiplicative", 16),
                      ("mlp.down_proj", "multiplicative_input", 64)}


def test_formula_on_llama(tiny):
    """Keys and values are scaled at their projection's output; the FFN's inner activation before down_proj."""
    model = tiny.model("llama")
    layer = model.model.layers[0]
    k, down = layer.self_attn.k_proj, layer.mlp.down_proj
    peft = unipeft.attach(model, "ia3")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, placed in peft.delta_modules():
            placed.form.ia3_l.copy_(torch.rand(placed.form.ia3_l.shape, generator=g) + 0.5)
    l_k = layer.self_attn.k_proj.adapters["default"][0].form.ia3_l
    l_ff = layer.mlp.down_proj.adapters["default"][0].form.ia3_l
    x, a = torch.randn(2, 3, 32), torch.randn(2, 3, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer.self_attn.k_proj(x), k(x) * l_k)
        torch.testing.assert_close(layer.mlp.down_proj(a), down(a * l_ff))


def test_merge_scales_rows_or_columns():
    """At an output: W ← diag(l) W, b ← l ⊙ b; at an input: W ← W diag(l). Unmerge divides back."""
    torch.manual_seed(0)
    for insertion, shape in (("multiplicative", (4,)), ("multiplicative_input", (3,))):
        base = nn.Linear(3, 4)
        weight, bias = base.weight.detach().clone(), base.bias.detach().clone()
        ia3 = IA3Config().build(SiteShape(d_in=3, d_out=shape[0], base=base))
        with torch.no_grad():
            ia3.ia3_l.copy_(torch.rand(shape) + 0.5)
            ia3.merge_(base.weight, base.bias, insertion=insertion, scale=1.0, sign=+1)
        l = ia3.ia3_l.detach()
        if insertion == "multiplicative":
            torch.testing.assert_close(base.weight, l[:, None] * weight)
            torch.testing.assert_close(base.bias, l * bias)
        else:
            torch.testing.assert_close(base.weight, weight * l[None, :])
            assert torch.equal(base.bias, bias)
        with torch.no_grad():
            ia3.merge_(base.weight, base.bias, insertion=insertion, scale=1.0, sign=-1)
        torch.testing.assert_close(base.weight, weight)
        torch.testing.assert_close(base.bias, bias)


def test_merge_on_gpt2_slices(tiny, randomize):
    """On GPT-2, l_k and l_v scale the k and v thirds of c_attn's output columns (and bias) only."""
    model = tiny.model("gpt2")
    d = tiny.width
    c_attn = model.transformer.h[0].attn.c_attn
    weight, bias = c_attn.weight.detach().clone(), c_attn.bias.detach().clone()
    peft = unipeft.attach(model, "ia3")
    randomize(peft)
    l_k, l_v = [p.form.ia3_l.detach() for m, p in peft.delta_modules() if m == "transformer.h.0.attn.c_attn"]
    peft.merge()
    torch.testing.assert_close(c_attn.weight, torch.cat([weight[:, :d], weight[:, d:2 * d] * l_k,
                                                         weight[:, 2 * d:] * l_v], dim=1))
    torch.testing.assert_close(c_attn.bias, torch.cat([bias[:d], bias[d:2 * d] * l_k, bias[2 * d:] * l_v]))


def copy_into_hf(ours: unipeft.Peft, theirs: nn.Module) -> int:
    count = 0
    with torch.no_grad():
        for module, placed in ours.delta_modules():
            vector = theirs.base_model.model.get_submodule(module).ia3_l["default"]  # (out, 1) or (1, in) for the FFN
            vector.copy_(placed.form.ia3_l.view_as(vector))
            count += 1
    return count


def _parity(model: nn.Module, batch: dict, hf_config, recipe="ia3") -> None:
    twin = copy.deepcopy(model)
    ours = unipeft.attach(model, recipe)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, placed in ours.delta_modules():
            placed.form.ia3_l.copy_(torch.rand(placed.form.ia3_l.shape, generator=g) + 0.5)
    theirs = peft_lib.get_peft_model(twin, hf_config).eval()
    assert copy_into_hf(ours, theirs) == sum(isinstance(m, peft_lib.tuners.ia3.IA3Layer) for m in theirs.modules())
    with torch.no_grad():
        ours_out, theirs_out = model(**batch).logits, theirs(**batch).logits
    assert (ours_out - theirs_out).abs().max() <= 1e-5


def test_parity_with_hf_peft_on_llama(tiny):
    batch = {"input_ids": tiny.batch("llama")["input_ids"]}
    _parity(tiny.model("llama"), batch, peft_lib.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                           feedforward_modules=["down_proj"]))


def test_parity_with_hf_peft_on_t5(tiny):
    """HF peft's suffixes k, v also match T5's cross-attention, which unipeft names xattn.k, xattn.v."""
    recipe = unipeft.Recipe.from_dict({"name": "ia3_t5", "family": "additive", "deltas": [
        {"form": {"type": "ia3"}, "positions": ["attn.k", "attn.v", "xattn.k", "xattn.v"],
         "insertion": "multiplicative"},
        {"form": {"type": "ia3"}, "positions": ["ffn.down"], "insertion": "multiplicative_input"}]})
    batch = {k: v for k, v in tiny.batch("t5").items() if k != "labels"}
    batch["decoder_input_ids"] = torch.randint(3, tiny.vocab, (2, 5), generator=torch.Generator().manual_seed(3))
    _parity(tiny.model("t5"), batch, peft_lib.IA3Config(target_modules=["k", "v", "wo"], feedforward_modules=["wo"]),
            recipe=recipe)
