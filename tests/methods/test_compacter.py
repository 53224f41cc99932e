"""Compacter (unipeft.methods.compacter): PHM adapters with rules A_i shared across layers and low-rank B_i.

The shared invariants of the shipped ``compacter`` recipe run in tests/core/test_invariants.py; here: the Kronecker
sum, the sharing (one trained and saved copy of A), the paper's closed-form parameter counts for Compacter,
Compacter++ and PHM-Adapter, save/load of the shared rules, and a real SST-2 batch.
"""

from __future__ import annotations


import pytest
import torch

import unipeft
from unipeft.core.recipe import DeltaSpec, Recipe
from unipeft.methods.compacter import CompacterConfig, PHMLinear

FAMILIES = ("bert", "gpt2", "llama", "t5")


def _recipe(positions=("attn", "ffn"), **form) -> Recipe:
    return Recipe(name="compacter", family="additive",
                  deltas=(DeltaSpec(form=CompacterConfig(**form), positions=positions, insertion="sequential"),))


def _adapter_count(d: int, m: int, r: int | None, n: int) -> int:
    """One adapter d → m → d: two PHM layers (r(d_in + d_out), or d_in·d_out/n for full B_i) plus their biases."""
    phm = (lambda a, b: r * (a + b)) if r is not None else (lambda a, b: a * b // n)
    return phm(d, m) + m + phm(m, d) + d


def test_phm_weight_is_a_sum_of_kronecker_products():
    torch.manual_seed(0)
    layer = PHMLinear(8, 12, n=4, rank=2, zero=False)
    rules = torch.randn(4, 4, 4)
    expected = sum(torch.kron(rules[i], layer.s[i] @ layer.t[i]) for i in range(4))
    torch.testing.assert_close(layer.weight(rules), expected)
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x, rules), x @ expected + layer.bias)


@pytest.mark.parametrize("family", FAMILIES)
def test_closed_form_counts(tiny, family):
    """Compacter: sites·(2r(d+m) + m + d) + n³ (the paper's 4L(d+k) + n³ with biases and r written out);
    Compacter++ only after the FFN; unshared rules cost n³ per site; full B_i is PHM-Adapter."""
    model = tiny.model(family)
    d, n = tiny.width, 4
    stacks = 2 if family == "t5" else 1
    both = 2 * tiny.layers * stacks  # adapters after attention and FFN
    cases = [  # (recipe, sites, per-site count, shared rules)
        (_recipe(), both, _adapter_count(d, 4, 1, n), n ** 3),
        (_recipe(("ffn",)), both // 2, _adapter_count(d, 4, 1, n), n ** 3),
        (_recipe(size=8, reduction_factor=None, rank=2), both, _adapter_count(d, 8, 2, n), n ** 3),
        (_recipe(size=8, reduction_factor=None, rank=None), both, _adapter_count(d, 8, None, n), n ** 3),
    ]
    for recipe, sites, per_site, rules in cases:
        peft = unipeft.attach(model, recipe)
        assert len(peft.records["default"]) == sites
        assert peft.summary().trainable == sites * per_site + rules
        peft.detach()
    peft = unipeft.attach(model, _recipe(shared=False))
    assert peft.summary().trainable == both * (_adapter_count(d, 4, 1, n) + n ** 3)


def test_paper_example_count():
    """The paper's formula on T5-base sizes: 4L(d + k) + n³ for L = 12, d = 768, k = 24 (reduction 32), n = 4."""
    config = CompacterConfig()
    m = config.bottleneck(768)
    assert m == 24
    assert 2 * 12 * (_adapter_count(768, m, 1, 4) - m - 768) + 4 ** 3 == 4 * 12 * (768 + 24) + 64


def test_rules_are_shared_trained_and_saved_once(tiny, randomize, tmp_path):
    model = tiny.model("llama")
    batch = tiny.batch("llama")
    peft = unipeft.attach(model, "compacter")
    forms = [p.form for _, p in peft.delta_modules()]
    owner = forms[0]
    assert all(f._shared[0] is owner.rules for f in forms[1:])
    rule_keys = [k for k in peft.adapter_state_dict("default") if k.endswith("rules.A")]
    assert len(rule_keys) == 1
    assert sum(1 for p in peft.trainable_parameters() if p is owner.rules.A) == 1
    randomize(peft)  # (at init W_up = 0, so A gets no gradient yet)
    tiny.loss(model, batch).backward()
    assert owner.rules.A.grad is not None and owner.rules.A.grad.abs().sum() > 0
    expected = tiny.logits(model, batch)
    folder = peft.save(str(tmp_path / "adapter"))
    fresh = tiny.model("llama")
    loaded = unipeft.load_adapter(fresh, folder)
    loaded_forms = [p.form for _, p in loaded.delta_modules()]
    assert torch.equal(loaded_forms[0].rules.A, owner.rules.A)
    assert all(f._shared[0] is loaded_forms[0].rules for f in loaded_forms[1:])
    assert torch.equal(tiny.logits(fresh, batch), expected)


def test_two_adapters_do_not_share_rules(tiny):
    recipe = unipeft.load_recipe("compacter")
    model = tiny.model("bert")
    peft = unipeft.attach(model, recipe, name="a")
    peft.add(recipe, name="b")
    a = next(p.form for _, p in peft.delta_modules("a"))
    b = next(p.form for _, p in peft.delta_modules("b"))
    assert a.rules is not b.rules


def test_compacter_pp_through_options(tiny):
    peft = unipeft.attach(tiny.model("bert"), "compacter", positions=["ffn"])
    assert {r.site.position for r in peft.records["default"]} == {"ffn"}


def test_errors(tiny):
    with pytest.raises(ValueError, match="size must be a positive multiple of n=4, got 6"):
        CompacterConfig(size=6, reduction_factor=None)
    with pytest.raises(ValueError, match="exactly one of compacter 'size' and 'reduction_factor'"):
        CompacterConfig(size=8)  # reduction_factor defaults to 32
    with pytest.raises(ValueError, match="rank must be >= 1"):
        CompacterConfig(rank=0)
    with pytest.raises(ValueError, match="input width 32 is not divisible by n=5"):
        unipeft.attach(tiny.model("bert"), _recipe(n=5))
    peft = unipeft.attach(tiny.model("bert"), "compacter")
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        peft.merge()


def test_real_sst2_batch_loss_goes_down(minilm_sst2):
    model, batch = minilm_sst2()
    model.eval()
    peft = unipeft.attach(model, "compacter")
    optimizer = torch.optim.AdamW(peft.trainable_parameters(), lr=3e-3)
    with torch.no_grad():
        first = model(**batch).loss.item()
    for _ in range(3):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    with torch.no_grad():
        assert model(**batch).loss.item() < first
