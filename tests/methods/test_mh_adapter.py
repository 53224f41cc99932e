"""Multi-head parallel adapter (unipeft.methods.mh_adapter): per-head bottlenecks at the attention sub-layer.

The shared invariants of the shipped ``mh_pa`` recipe run in tests/core/test_invariants.py; here: the per-head
equation, one head = He et al.'s parallel adapter (the ``bottleneck`` form) on the same weights, the closed-form
count 2·d·r + N_h·r + d per site, the errors, and a real SST-2 batch.
"""

from __future__ import annotations

import copy

import pytest
import torch

import unipeft
from unipeft.core.recipe import DeltaSpec, Recipe
from unipeft.methods.bottleneck import BottleneckConfig
from unipeft.methods.mh_adapter import MHAdapterConfig

FAMILIES = ("bert", "gpt2", "llama", "t5")


def _recipe(**form) -> Recipe:
    return Recipe(name="mh_pa", family="additive",
                  deltas=(DeltaSpec(form=MHAdapterConfig(**form), positions=("attn",), insertion="parallel"),))


def test_each_head_has_its_own_bottleneck(tiny, randomize):
    peft = unipeft.attach(tiny.model("bert"), _recipe(heads=4, size=3, activation="relu"))
    randomize(peft)
    _, placed = next(iter(peft.delta_modules()))
    form = placed.form
    z = torch.randn(2, 5, 32)
    expected = []
    for i in range(4):  # head i: its 8 input features -> 3 -> its 8 output features
        x_i = z[..., 8 * i:8 * (i + 1)]
        mid = torch.relu(x_i @ form.down[i] + form.down_bias[i])
        expected.append(mid @ form.up[i])
    expected = torch.cat(expected, dim=-1) + form.up_bias
    torch.testing.assert_close(form(z), expected)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_one_head_is_the_parallel_adapter(tiny, randomize, family):
    ours = tiny.model(family)
    reference = copy.deepcopy(ours)
    peft = unipeft.attach(ours, _recipe(heads=1, size=6))
    randomize(peft)
    pa = unipeft.attach(reference, Recipe(name="pa", family="additive", deltas=(
        DeltaSpec(form=BottleneckConfig(size=6, activation="relu"), positions=("attn",), insertion="parallel"),)))
    with torch.no_grad():
        for (_, mh), (_, bn) in zip(peft.delta_modules(), pa.delta_modules()):
            bn.form.down.weight.copy_(mh.form.down[0].T)
            bn.form.down.bias.copy_(mh.form.down_bias[0])
            bn.form.up.weight.copy_(mh.form.up[0].T)
            bn.form.up.bias.copy_(mh.form.up_bias)
    batch = tiny.batch(family)
    assert peft.summary().trainable == pa.summary().trainable
    torch.testing.assert_close(tiny.logits(ours, batch), tiny.logits(reference, batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("heads,size", [(4, 8), (2, 5)])
def test_parameter_count_closed_form(tiny, family, heads, size):
    """Per site 2·d·r + N_h·r + d: the same 2·d·r as one parallel adapter of size r, plus biases."""
    peft = unipeft.attach(tiny.model(family), _recipe(heads=heads, size=size))
    sites = len(peft.records["default"])
    assert sites == {"t5": 4}.get(family, 2)  # one self-attention per layer (T5: encoder and decoder)
    d = tiny.width
    assert peft.summary().trainable == sites * (2 * d * size + heads * size + d)


def test_starts_at_the_identity_and_learns(tiny):
    model = tiny.model("gpt2")
    batch = tiny.batch("gpt2")
    before = tiny.logits(model, batch)
    peft = unipeft.attach(model, "mh_pa")
    torch.testing.assert_close(tiny.logits(model, batch), before, atol=0, rtol=0)
    tiny.loss(model, batch).backward()
    assert all(p.form.up.grad.abs().sum() > 0 for _, p in peft.delta_modules())


def test_errors(tiny):
    with pytest.raises(ValueError, match="heads must be >= 1, got 0"):
        MHAdapterConfig(heads=0)
    with pytest.raises(ValueError, match="unknown activation 'swish'; valid: relu"):
        MHAdapterConfig(activation="swish")
    with pytest.raises(ValueError, match="input width 32 is not divisible by heads=3"):
        unipeft.attach(tiny.model("bert"), _recipe(heads=3))
    peft = unipeft.attach(tiny.model("bert"), "mh_pa")
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        peft.merge()


def test_real_sst2_batch_loss_goes_down(minilm_sst2):
    model, batch = minilm_sst2()
    model.eval()
    peft = unipeft.attach(model, "mh_pa")
    optimizer = torch.optim.AdamW(peft.trainable_parameters(), lr=1e-3)
    with torch.no_grad():
        first = model(**batch).loss.item()
    for _ in range(3):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    with torch.no_grad():
        assert model(**batch).loss.item() < first
