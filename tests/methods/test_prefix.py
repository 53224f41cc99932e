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


def _recipe(length: int = 3, reparam: int | None = None, positions=("attn",), shift_positions: bool = True,
            **placement) -> Recipe:
    form = PrefixConfig(length=length, reparam=reparam, shift_positions=shift_positions)
    return Recipe(name="prefix", family="additive",
                  deltas=(DeltaSpec(form=form, positions=positions,
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


def _padded(tiny, family: str, side: str) -> dict[str, torch.Tensor]:
    batch = tiny.batch(family)
    mask = torch.ones_like(batch["input_ids"])
    if side == "left":
        mask[0, :2] = 0
    elif side == "right":
        mask[0, -2:] = 0
    return {"input_ids": batch["input_ids"], "attention_mask": mask}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("side", ["left", "right", "none"])
def test_same_prefix_gives_hf_peft_logits(tiny, family, side):
    """HF peft runs the prefix as a KV cache, so its real tokens sit at positions l..l+T-1 (and given position ids are
    shifted by l); unipeft numbers them the same way, so the logits agree on every real token, with either padding
    side, with and without explicit position ids. Rotary (llama) and learned (gpt2) positions."""
    length = 3
    model = tiny.model(family)
    inputs = _padded(tiny, family, side)
    real = inputs["attention_mask"].bool()
    peft, hf = _hf_prefix_pair(model, length)
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        theirs = hf(**inputs).logits
        ours = model(**inputs).logits
        theirs_at = hf(**inputs, position_ids=positions).logits
        ours_at = model(**inputs, position_ids=positions).logits
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_at[real], theirs_at[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_same_prefix_generates_as_hf_peft(tiny, family, side):
    """Greedy generation with a cache: the same tokens and scores as HF peft's (which prefills its cache)."""
    model = tiny.model(family)
    inputs = _padded(tiny, family, side)
    peft, hf = _hf_prefix_pair(model, 3)
    options = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False, "pad_token_id": 0,
               "output_scores": True, "return_dict_in_generate": True}
    with torch.no_grad():
        theirs = hf.generate(**inputs, **options)
        ours = model.generate(**inputs, **options)
    assert torch.equal(ours.sequences, theirs.sequences)
    torch.testing.assert_close(torch.stack(ours.scores), torch.stack(theirs.scores), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_unshifted_prefix_keeps_the_plain_positions(tiny, family):
    """shift_positions: false numbers the real tokens 0..T-1: it equals the shifted prefix given l + arange(T) only
    through explicit position ids, and differs from HF peft without them."""
    length = 3
    base, ids = tiny.model(family), tiny.batch(family)["input_ids"]
    shifted = unipeft.attach(copy.deepcopy(base), _recipe(length=length))
    plain = unipeft.attach(copy.deepcopy(base), _recipe(length=length, shift_positions=False))
    with torch.no_grad():
        for mine, other in zip(_forms(plain), _forms(shifted)):
            mine.key.copy_(other.key)
            mine.value.copy_(other.value)
        unshifted = plain.model(input_ids=ids).logits
        at_l = plain.model(input_ids=ids, position_ids=(torch.arange(ids.shape[1]) + length)[None]).logits
        want = shifted.model(input_ids=ids).logits
    torch.testing.assert_close(at_l, want, atol=1e-5, rtol=0)
    assert (unshifted - want).abs().max() > 1e-4


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
    tokenizer.padding_side = "left"
    inputs = tokenizer(["What is the capital of France?", "Hi"], return_tensors="pt", padding=True)
    real = inputs["attention_mask"].bool()
    peft, hf = _hf_prefix_pair(model, length)
    assert peft.summary().per_adapter["default"] == hf.get_nb_trainable_parameters()[0] == 30 * 2 * length * 192
    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    with torch.no_grad():
        theirs = hf(**inputs).logits
        ours = model(**inputs).logits
        assert torch.equal(model.generate(**inputs, **options), hf.generate(**inputs, **options))
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4)


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
