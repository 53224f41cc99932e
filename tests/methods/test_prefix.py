"""Prefix tuning and P-tuning v2 (unipeft.methods.prefix): the reparameterisation and what is saved, parity with
HF peft's PrefixTuningConfig, generation with a KV cache, cross-attention prefixes, parameter counts.

The shared invariants (init behaviour, merge refused, detach, grads, save/load, training) run over the ``prefix`` and
``ptuning_v2`` recipes on every family in tests/core/test_sequence.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PrefixTuningConfig, get_peft_model

import unipeft
from unipeft.core.recipe import DeltaSpec, Recipe, load_recipe
from unipeft.methods.prefix import Prefix, PrefixConfig


def _recipe(length: int = 3, reparam: int | None = None, positions=("attn",), **placement) -> Recipe:
    return Recipe(name="prefix", family="additive",
                  deltas=(DeltaSpec(form=PrefixConfig(length=length, reparam=reparam), positions=positions,
                                    insertion="sequence", **placement),))


def _forms(peft: unipeft.Peft) -> list[Prefix]:
    return [placed.form for _, placed in peft.delta_modules()]


# ------------------------------------------------------------------------------------------ reparameterisation
def test_reparameterised_state_dict_holds_only_the_prefix(tiny):
    model = tiny.model("llama")
    peft = unipeft.attach(model, _recipe(length=3, reparam=8))
    batch = tiny.batch("llama")
    before = tiny.logits(model, batch)
    state = peft.adapter_state_dict("default")
    assert sorted({k.split("::", 1)[1] for k in state}) == ["0.form.key", "0.form.value"]
    assert all(t.shape == (3, 16) for t in state.values())  # d_kv = 2 kv heads x 8 (grouped-query attention)
    assert torch.equal(tiny.logits(model, batch), before)  # folding the MLP's output changes nothing
    assert not any("trunk" in k or ".up." in k for k in model.state_dict())


def test_trunk_is_shared_and_the_mlp_reported_as_training_only(tiny):
    model = tiny.model("llama")
    peft = unipeft.attach(model, _recipe(length=3, reparam=8))
    forms = _forms(peft)
    assert len(forms) == 2 and forms[0].trunk is forms[1].trunk and forms[0].up is not forms[1].up
    summary = peft.summary()
    saved = 2 * 2 * 3 * 16  # blocks x (key, value) x l x d_kv
    trunk = 3 * 16 + 16 * 8 + 8
    ups = 2 * (8 * 32 + 32)
    assert summary.per_adapter["default"] == summary.per_form["Prefix"] == saved
    assert summary.training_only == trunk + ups
    assert summary.trainable == saved + trunk + ups  # the prefix tensors require grad, changed only by the fold
    assert "training-only" in str(summary)


def test_gradients_reach_only_the_mlp_with_reparam(tiny):
    model = tiny.model("llama")
    peft = unipeft.attach(model, _recipe(length=3, reparam=8))
    tiny.loss(model, tiny.batch("llama")).backward()
    for form in _forms(peft):
        assert form.key.grad is None and form.value.grad is None
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in form.training_only_parameters())


def test_loaded_prefix_is_exact_and_trains_on(tiny, tmp_path):
    model = tiny.model("gpt2")
    batch = tiny.batch("gpt2")
    peft = unipeft.attach(model, _recipe(length=4, reparam=16))
    optimizer = torch.optim.AdamW(peft.trainable_parameters(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        tiny.loss(model, batch).backward()
        optimizer.step()
    expected = tiny.logits(model, batch)
    folder = peft.save(str(tmp_path / "prefix"))
    fresh = tiny.model("gpt2")
    loaded = unipeft.load_adapter(fresh, folder)
    assert torch.equal(tiny.logits(fresh, batch), expected)
    tiny.loss(fresh, batch).backward()  # a fresh MLP continues on top of the loaded prefix
    assert all(p.grad is not None for f in _forms(loaded) for p in f.training_only_parameters())


def test_ptuning_v2_trains_the_prefix_directly(tiny):
    model = tiny.model("bert")
    peft = unipeft.attach(model, "ptuning_v2")
    recipe = load_recipe("ptuning_v2")
    assert recipe.deltas[0].form == PrefixConfig(length=20, reparam=None)
    summary = peft.summary()
    assert summary.training_only == 0
    assert summary.trainable == summary.per_adapter["default"] == 2 * 2 * 20 * 32


def test_config_validation():
    with pytest.raises(ValueError, match="length must be >= 1"):
        PrefixConfig(length=0)
    with pytest.raises(ValueError, match="reparam"):
        PrefixConfig(reparam=0)


# ------------------------------------------------------------------------------------------------ HF peft
def _hf_prefix_pair(model, length: int):
    """(unipeft handle, HF peft model) with the same prefix values; HF's are read from its pre-filled cache."""
    hf = get_peft_model(copy.deepcopy(model), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=length))
    peft = unipeft.attach(model, _recipe(length=length))
    with torch.no_grad():
        cache = hf.get_prompt(1)
        for layer, form in zip(cache.layers, _forms(peft)):
            form.key.copy_(layer.keys[0].transpose(0, 1).reshape(length, -1))  # (H_kv, l, d) -> (l, H_kv·d)
            form.value.copy_(layer.values[0].transpose(0, 1).reshape(length, -1))
    return peft, hf


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_same_prefix_gives_hf_peft_logits(tiny, family):
    """HF peft runs the prefix as a KV cache, so its tokens sit at positions l..l+T-1: with those position ids the
    logits are identical; with unipeft's default positions (0..T-1) they differ (a documented difference)."""
    length = 3
    model = tiny.model(family)
    batch = tiny.batch(family)
    mask = torch.ones_like(batch["input_ids"])
    mask[0, :2] = 0  # left padding
    peft, hf = _hf_prefix_pair(model, length)
    with torch.no_grad():
        theirs = hf(input_ids=batch["input_ids"], attention_mask=mask).logits
        positions = (torch.arange(batch["input_ids"].shape[1]) + length)[None]
        ours = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions).logits
        unshifted = model(input_ids=batch["input_ids"], attention_mask=mask).logits
    torch.testing.assert_close(ours[1], theirs[1], atol=1e-5, rtol=0)  # the unpadded row
    torch.testing.assert_close(ours[0, 2:], theirs[0, 2:], atol=1e-5, rtol=0)
    assert (unshifted - theirs).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_counts_match_hf_peft(tiny, family):
    """Saved prefix = HF peft's count without projection; the training-only MLP = HF peft's with projection."""
    model = tiny.model(family)
    plain = get_peft_model(copy.deepcopy(model), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    mlp = get_peft_model(copy.deepcopy(model), PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=8))
    summary = unipeft.attach(model, _recipe(length=3, reparam=8)).summary()
    assert summary.per_adapter["default"] == plain.get_nb_trainable_parameters()[0]
    assert summary.training_only == mlp.get_nb_trainable_parameters()[0]


@pytest.mark.slow
def test_smollm2_same_prefix_gives_hf_peft_logits():
    from unipeft.models import load_model

    model, tokenizer = load_model("smollm2-135m", kind="causal_lm")
    length = 5
    ids = tokenizer(["What is the capital of France?"], return_tensors="pt")["input_ids"]
    peft, hf = _hf_prefix_pair(model, length)
    assert peft.summary().per_adapter["default"] == hf.get_nb_trainable_parameters()[0] == 30 * 2 * length * 192
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits
        ours = model(input_ids=ids, position_ids=(torch.arange(ids.shape[1]) + length)[None]).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ generation
def _generate(model, ids, mask, use_cache: bool):
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                             pad_token_id=0, use_cache=use_cache, output_scores=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("family, positions", [("llama", ("attn",)), ("gpt2", ("attn",)), ("t5", ("attn", "xattn"))])
@pytest.mark.parametrize("reparam", [None, 8])
def test_generation_with_a_cache_equals_generation_without(tiny, family, positions, reparam):
    model = tiny.model(family)
    unipeft.attach(model, _recipe(length=3, reparam=reparam, positions=positions))
    ids = tiny.batch(family)["input_ids"]
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    cached, cached_scores = _generate(model, ids, mask, use_cache=True)
    plain, plain_scores = _generate(model, ids, mask, use_cache=False)
    assert torch.equal(cached, plain)
    torch.testing.assert_close(cached_scores, plain_scores, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------ encoder-decoder
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_cross_attention_prefixes(tiny, family):
    model = tiny.model(family)
    batch = tiny.batch(family)
    before = tiny.logits(model, batch)
    peft = unipeft.attach(model, _recipe(positions=("xattn",)))
    assert [r.site.position for r in peft.records["default"]] == ["xattn", "xattn"]
    assert all(r.site.stack == "decoder" for r in peft.records["default"])
    assert (tiny.logits(model, batch) - before).abs().max() > 1e-5


def test_he_et_al_placement_on_bart_has_36_blocks_of_bart_large():
    from unipeft.models.configs import build_meta_model, known_config

    model = build_meta_model(known_config("bart-large"), "seq2seq_lm")
    peft = unipeft.attach(model, _recipe(length=30, reparam=800, positions=("attn", "xattn")))
    assert len(peft.records["default"]) == 36
    assert peft.summary().per_adapter["default"] == 36 * 2 * 30 * 1024


# ------------------------------------------------------------------------------------------------ real model
@pytest.mark.slow
def test_minilm_prefix_learns_real_sst2_sentences(minilm_folder, sst2_rows):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = sst2_rows(16)
    tokenizer = AutoTokenizer.from_pretrained(minilm_folder)
    batch = tokenizer([r["sentence"] for r in rows], padding=True, return_tensors="pt")
    labels = torch.tensor([r["label"] for r in rows])
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_folder, num_labels=2)
    peft = unipeft.attach(model, "prefix")
    model.train()
    optimizer = torch.optim.AdamW(peft.trainable_parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert model(**batch, labels=labels).loss.item() < losses[0]
