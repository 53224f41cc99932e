"""LayerNorm tuning (the ``ln_tuning`` recipe: a trainable copy of every layer norm, Zhao et al. 2023).

The recipe needs no new form: ``copy`` at ``norm`` trains exactly the norms' own weights and biases, in their own
parameterisation (as the paper and HF peft's LN tuning), restores on detach (the base norms are never written) and
merges by swapping. The shared invariants run in tests/core/test_invariants.py; here: the count equals the norms'
parameters and HF peft's, the outputs equal HF peft's on the same weights, merge/save/detach, a real SST-2 batch.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LNTuningConfig, get_peft_model

import unipeft
from unipeft.core.adapted import site_base
from unipeft.core.site import DeltaSite

FAMILIES = ("bert", "gpt2", "llama", "t5")
HF_TARGETS = {"bert": ["output.LayerNorm"], "gpt2": ["ln_1", "ln_2"],
              "llama": ["input_layernorm", "post_attention_layernorm"], "t5": ["layer_norm"]}


def _norm_params(model: torch.nn.Module, family: str) -> int:
    """Parameters of the per-layer norms, counted from the model itself."""
    return sum(p.numel() for name, module in model.named_modules()
               if any(name.endswith("." + t) for t in HF_TARGETS[family]) for p in module.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_count_equals_the_norms_and_hf_peft(tiny, family):
    model = tiny.model(family)
    expected = _norm_params(model, family)
    hf = get_peft_model(copy.deepcopy(model), LNTuningConfig(target_modules=HF_TARGETS[family]))
    peft = unipeft.attach(model, "ln_tuning")
    assert peft.summary().trainable == expected == hf.get_nb_trainable_parameters()[0]
    assert {type(site_base(peft, m)).__name__ for m, _ in peft.delta_modules()} <= {
        "LayerNorm", "LlamaRMSNorm", "T5LayerNorm"}


@pytest.mark.parametrize("family", FAMILIES)
def test_same_outputs_as_hf_peft_on_the_same_weights(tiny, randomize, family):
    model = tiny.model(family)
    hf = get_peft_model(copy.deepcopy(model), LNTuningConfig(target_modules=HF_TARGETS[family]))
    peft = unipeft.attach(model, "ln_tuning")
    randomize(peft, std=0.2)
    with torch.no_grad():
        for module, placed in peft.delta_modules():
            theirs = hf.base_model.model.get_submodule(module).ln_tuning_layers["default"]
            theirs.load_state_dict(placed.form.module.state_dict())
    batch = tiny.batch(family)
    ours = tiny.logits(model, batch)
    assert (ours - tiny.logits(tiny.model(family), batch)).abs().max() > 1e-4
    torch.testing.assert_close(ours, tiny.logits(hf, batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_merge_swaps_and_detach_restores(tiny, randomize, tmp_path, family):
    model = tiny.model(family)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    batch = tiny.batch(family)
    peft = unipeft.attach(model, "ln_tuning")
    randomize(peft, std=0.2)
    adapted = tiny.logits(model, batch)
    state = peft.adapter_state_dict("default")
    assert all(".form.module." in k for k in state) and len(state) == len(list(peft.trainable_parameters()))
    peft.merge()
    assert torch.equal(tiny.logits(model, batch), adapted)
    peft.unmerge()
    folder = peft.save(str(tmp_path / "ln"))
    fresh = tiny.model(family)
    unipeft.load_adapter(fresh, folder)
    assert torch.equal(tiny.logits(fresh, batch), adapted)
    peft.detach()
    assert not any(isinstance(m, DeltaSite) for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key]), key


def test_real_sst2_batch_loss_goes_down(minilm_sst2):
    model, batch = minilm_sst2()
    model.eval()
    peft = unipeft.attach(model, "ln_tuning")
    assert peft.summary().trainable == 6 * 2 * 2 * 384  # 6 layers, 2 LayerNorms, weight and bias
    optimizer = torch.optim.AdamW(peft.trainable_parameters(), lr=1e-2)
    with torch.no_grad():
        first = model(**batch).loss.item()
    for _ in range(3):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    with torch.no_grad():
        assert model(**batch).loss.item() < first
