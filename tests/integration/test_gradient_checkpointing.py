"""Gradient checkpointing on adapted models: the adapters' gradients equal the gradients without checkpointing.

With reentrant checkpointing a checkpointed block only back-propagates if one of its inputs requires grad, and the
frozen embeddings' output does not; transformers' ``gradient_checkpointing_enable`` handles that itself
(non-reentrant by default, and ``enable_input_require_grads`` for models fed ``input_ids``), so an adapted model needs
nothing more. These tests hold both modes to the non-checkpointed gradients for every kind of delta: weight deltas,
sub-layer (parallel adapter) deltas whose input is captured by a hook, prefixes inside attention and prompts at the
input.
"""

from __future__ import annotations

import pytest
import torch

import unipeft
from unipeft.data import collate

RECIPES = ("lora", "ia3", "houlsby", "parallel_adapter", "prefix", "prompt")


def gradients(model: torch.nn.Module, peft: unipeft.Peft, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout masks (checkpointing replays the RNG state in its recomputation)
    loss = model(**batch).loss
    loss.backward()
    ids = {id(p) for p in peft.trainable_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if id(p) in ids and p.grad is not None}
    return loss.item(), grads


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_checkpointed_gradients_equal_plain_gradients(tiny, randomize, family, recipe, reentrant):
    model = tiny.model(family)
    peft = unipeft.attach(model, recipe)
    randomize(peft, std=0.05)
    model.train()
    batch = tiny.batch(family)
    loss, plain = gradients(model, peft, batch)
    assert plain and all(g.abs().sum() > 0 for g in plain.values())

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert model.is_gradient_checkpointing
    checkpointed_loss, checkpointed = gradients(model, peft, batch)
    assert checkpointed_loss == pytest.approx(loss, abs=1e-6)
    assert set(checkpointed) == set(plain)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_minilm_trains_with_checkpointing_as_without(sst2_minilm):
    model, tokenizer, examples = sst2_minilm()
    peft = unipeft.attach(model, "lora")
    randomize_b = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, placed in peft.delta_modules():
            placed.form.lora_B.add_(torch.randn(placed.form.lora_B.shape, generator=randomize_b) * 0.01)
    model.train()
    batch = collate(examples[:8], tokenizer.pad_token_id)
    loss, plain = gradients(model, peft, batch)
    model.gradient_checkpointing_enable()  # the default: non-reentrant
    checkpointed_loss, checkpointed = gradients(model, peft, batch)
    assert checkpointed_loss == pytest.approx(loss, abs=1e-5)
    assert set(checkpointed) == set(plain) and len(plain) == 4 * 6  # A and B at q and v of 6 layers
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_enabling_before_attaching_works_too(tiny, randomize):
    model = tiny.model("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    peft = unipeft.attach(model, "lora", positions=["attn.q", "embed", "ffn.down"])
    randomize(peft, std=0.05)
    model.train()
    batch = tiny.batch("llama")
    _, checkpointed = gradients(model, peft, batch)
    model.gradient_checkpointing_disable()
    _, plain = gradients(model, peft, batch)
    assert set(checkpointed) == set(plain) and len(plain) == 2 * (1 + 2 + 2)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_trainer_with_gradient_checkpointing_takes_the_same_steps(tiny, tmp_path):
    from transformers import Trainer, TrainingArguments

    batch = tiny.batch("bert", size=8, length=6)
    examples = [{"input_ids": i.tolist(), "labels": int(y)} for i, y in zip(batch["input_ids"], batch["labels"])]
    finals = []
    for checkpointing in (False, True):
        model = tiny.model("bert")
        torch.manual_seed(0)  # the same LoRA init
        peft = unipeft.attach(model, "lora")
        args = TrainingArguments(output_dir=str(tmp_path / str(checkpointing)), max_steps=3,
                                 per_device_train_batch_size=4, learning_rate=1e-2, save_strategy="no", report_to=[],
                                 use_cpu=True, seed=0, remove_unused_columns=False, disable_tqdm=True,
                                 gradient_checkpointing=checkpointing)
        Trainer(model=model, args=args, train_dataset=examples, data_collator=lambda b: collate(b, 0)).train()
        assert model.is_gradient_checkpointing == checkpointing
        finals.append(peft.adapter_state_dict("default"))
    for key, tensor in finals[0].items():
        assert tensor.abs().sum() > 0
        torch.testing.assert_close(finals[1][key], tensor, rtol=1e-5, atol=1e-6, msg=key)
