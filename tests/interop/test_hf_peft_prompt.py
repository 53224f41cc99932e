"""Prompt tuning and prefix tuning between HF peft's file format and unipeft, checked against HF peft itself.

HF peft runs a prefix as a KV cache, so its real tokens sit at positions l..l+T-1; unipeft numbers them the same way
(unipeft.sequence.shift), so both sides get the same inputs: a file written by either behaves the same in both."""

from __future__ import annotations

import copy

import pytest
import torch

import unipeft
from unipeft.interop import load_hf_adapter, save_hf_adapter

peft = pytest.importorskip("peft")

TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def _randomize(model) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_hf_prompt_learning_round_trips_with_the_same_outputs(tmp_path, tiny, family, kind):
    length = 3
    config = (peft.PromptTuningConfig if kind == "prompt" else peft.PrefixTuningConfig)(
        task_type=TASKS[family], num_virtual_tokens=length)
    base, ids = tiny.model(family), tiny.batch(family)["input_ids"]
    hf_model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    _randomize(hf_model)
    want = _logits(hf_model, ids)
    hf_model.save_pretrained(tmp_path / "hf")
    handle = load_hf_adapter(copy.deepcopy(base), tmp_path / "hf")
    got = _logits(handle.model, ids)
    assert got.shape == want.shape and (got - want).abs().max() <= 1e-5
    save_hf_adapter(handle, tmp_path / "back")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "back").eval()
    assert (_logits(again, ids) - want).abs().max() <= 1e-5


def test_reparameterised_prefix_saves_its_folded_values(tmp_path, tiny):
    """unipeft's training-time MLP (reparam) is folded into the saved prefix; HF gets prefix_projection: false."""
    import json

    base, ids = tiny.model("llama"), tiny.batch("llama")["input_ids"]
    handle = unipeft.attach(copy.deepcopy(base), "prefix", length=2, reparam=16)
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.3)
    want = _logits(handle.model, ids)
    save_hf_adapter(handle, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["prefix_projection"] is False
    hf_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out").eval()
    assert (_logits(hf_model, ids) - want).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_hf_prefix_on_padded_batches_and_generate_behaves_as_in_hf(tmp_path, tiny, family, side):
    """A prefix saved by HF peft: the same logits on every real token of a padded batch, and the same greedy
    generation, as HF peft itself (rotary and learned positions); and again after the round trip back to HF."""
    base, ids = tiny.model(family), tiny.batch(family)["input_ids"]
    mask = torch.ones_like(ids)
    mask[0, :2] = 0 if side == "left" else 1
    mask[0, -2:] = 0 if side == "right" else 1
    hf_model = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    _randomize(hf_model)
    hf_model.save_pretrained(tmp_path / "hf")
    handle = load_hf_adapter(copy.deepcopy(base), tmp_path / "hf")
    save_hf_adapter(handle, tmp_path / "back")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "back").eval()
    options = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        want = _logits(hf_model, ids, attention_mask=mask)
        want_tokens = hf_model.generate(input_ids=ids, attention_mask=mask, **options)
        for model in (handle.model, again):
            got = _logits(model, ids, attention_mask=mask)
            torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-5, rtol=0)
            assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **options), want_tokens)


@pytest.mark.parametrize("options, words", [
    ({"shift_positions": False}, ["shift_positions", "0..T-1"]),
    ({"layers": [-1]}, ["prefixes layers [1]", "every one"]),
    ({"positions": ["attn"], "composition": "gated"}, ["gated"]),
])
def test_partial_or_gated_prefixes_are_refused(tmp_path, tiny, options, words):
    handle = unipeft.attach(tiny.model("llama"), "prefix", length=2, reparam=None, **options)
    with pytest.raises(ValueError) as err:
        save_hf_adapter(handle, tmp_path / "out")
    assert all(w in str(err.value) for w in words), str(err.value)


def test_encoder_decoder_prompts_are_refused(tmp_path, tiny):
    hf_model = peft.get_peft_model(tiny.model("t5"), peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM",
                                                                             num_virtual_tokens=2))
    hf_model.save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match="encoder-decoder"):
        load_hf_adapter(tiny.model("t5"), tmp_path / "hf")
