"""Last-k-layers tuning (the ``last_k`` recipe: a trainable copy of every module of the last k layers).

The ``layer`` position resolves to each module with its own parameters inside a layer; ``copy`` replaces each by a
trainable copy, so the whole layer trains while the base stays untouched (detach restores it exactly; merging swaps).
The shared invariants run in tests/core/test_invariants.py; here: the count equals the last k layers' parameters,
only those layers are saved, training equals plain PyTorch fine-tuning of those layers, and a real SST-2 batch.
"""

from __future__ import annotations

import copy

import pytest
import torch

import unipeft
from unipeft.core.site import DeltaSite

FAMILIES = ("bert", "gpt2", "llama", "t5")
STACKS = {"bert": ["bert.encoder.layer"], "gpt2": ["transformer.h"], "llama": ["model.layers"],
          "t5": ["encoder.block", "decoder.block"]}


def _last_layers(model: torch.nn.Module, family: str, k: int) -> list[str]:
    """Names of the last k layer modules of every stack."""
    out = []
    for stack in STACKS[family]:
        layers = model.get_submodule(stack)
        out += [f"{stack}.{i}" for i in range(len(layers) - k, len(layers))]
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("k", [1, 2])
def test_count_and_saved_tensors_are_the_last_k_layers(tiny, family, k):
    model = tiny.model(family)
    layers = _last_layers(model, family, k)
    expected = sum(p.numel() for name in layers for p in model.get_submodule(name).parameters())
    peft = unipeft.attach(model, "last_k", layers=list(range(-k, 0)))
    assert peft.summary().trainable == expected
    assert all(any(m.startswith(name + ".") for name in layers) for m, _ in peft.delta_modules())
    saved = peft.adapter_state_dict("default")
    assert sum(t.numel() for t in saved.values()) == expected
    assert all(any(key.startswith(name + ".") for name in layers) for key in saved)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_equals_plain_fine_tuning_of_those_layers(tiny, family):
    ours = tiny.model(family)
    reference = copy.deepcopy(ours)
    for p in reference.parameters():
        p.requires_grad_(False)
    for name in _last_layers(reference, family, 1):
        for p in reference.get_submodule(name).parameters():
            p.requires_grad_(True)
    peft = unipeft.attach(ours, "last_k", layers=[-1])
    batch = tiny.batch(family)
    runs = []
    for model, params in ((ours, peft.trainable_parameters()),
                          (reference, [p for p in reference.parameters() if p.requires_grad])):
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        losses = []
        for _ in range(3):
            optimizer.zero_grad()
            loss = tiny.loss(model, batch)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        runs.append((losses, tiny.logits(model, batch)))
    assert runs[0][0] == pytest.approx(runs[1][0], abs=1e-5)
    torch.testing.assert_close(runs[0][1], runs[1][1], atol=1e-5, rtol=0)
    assert runs[0][0][-1] < runs[0][0][0]


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_merge_swaps_and_detach_restores(tiny, randomize, tmp_path, family):
    model = tiny.model(family)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    batch = tiny.batch(family)
    peft = unipeft.attach(model, "last_k", layers=[-1])
    randomize(peft, std=0.05)
    adapted = tiny.logits(model, batch)
    peft.merge()
    assert torch.equal(tiny.logits(model, batch), adapted)
    peft.unmerge()  # (a merged copy holds the swapped-out base weights: save unmerged)
    folder = peft.save(str(tmp_path / "last"))
    fresh = tiny.model(family)
    unipeft.load_adapter(fresh, folder)
    assert torch.equal(tiny.logits(fresh, batch), adapted)
    peft.detach()
    assert not any(isinstance(m, DeltaSite) for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key]), key


def test_layer_position_errors(tiny):
    with pytest.raises(ValueError, match="layer 5 is out of range"):
        unipeft.attach(tiny.model("bert"), "last_k", layers=[5])


def test_real_sst2_batch_loss_goes_down(minilm_sst2):
    model, batch = minilm_sst2()
    model.eval()
    expected = sum(p.numel() for i in (4, 5) for p in model.bert.encoder.layer[i].parameters())
    peft = unipeft.attach(model, "last_k")
    assert peft.summary().trainable == expected
    optimizer = torch.optim.AdamW(peft.trainable_parameters(), lr=1e-4)
    with torch.no_grad():
        first = model(**batch).loss.item()
    for _ in range(3):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    with torch.no_grad():
        assert model(**batch).loss.item() < first
