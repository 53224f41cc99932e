"""Training a unipeft-adapted model with transformers' ``Trainer`` and in a plain PyTorch loop.

The real run: MiniLM on 16 SST-2 training examples (unipeft's task and data code), a few steps; the loss on those
examples must fall, only adapter parameters may change, and the base must stay bit for bit the same.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

import unipeft
from unipeft.core.recipe import load_recipe
from unipeft.data import collate
from unipeft.integrations import AdapterTrainer
from unipeft.train.loop import with_head


def args(output_dir: Path, **overrides) -> TrainingArguments:
    options = dict(output_dir=str(output_dir), max_steps=8, per_device_train_batch_size=8, learning_rate=5e-3,
                   lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                   seed=0, remove_unused_columns=False, disable_tqdm=True)
    return TrainingArguments(**(options | overrides))


def mean_loss(model: torch.nn.Module, examples: list[dict], pad_token_id: int) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = model(**collate(examples, pad_token_id)).loss.item()
    model.train(was_training)
    return loss


def snapshot(peft: unipeft.Peft) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return ({k: v.clone() for k, v in peft.base_state_dict().items()},
            {k: v.clone() for k, v in peft.adapter_state_dict("default").items()})


def assert_only_adapter_changed(peft: unipeft.Peft, before: tuple[dict, dict]) -> None:
    base, adapter = before
    for key, tensor in peft.base_state_dict().items():
        assert torch.equal(tensor, base[key]), f"base weight {key} changed"
    changed = [k for k, v in peft.adapter_state_dict("default").items() if not torch.equal(v, adapter[k])]
    assert any(k.endswith("lora_B") for k in changed) and any(".form.module." in k for k in changed), changed


def attach_sst2(model: torch.nn.Module) -> unipeft.Peft:
    """LoRA plus a trainable copy of the new classification head (as ``unipeft train`` does)."""
    return unipeft.attach(model, with_head(load_recipe("lora"), "classification"))


def test_trainer_trains_minilm_on_sst2(sst2_minilm, tmp_path):
    model, tokenizer, examples = sst2_minilm()
    peft = attach_sst2(model)
    before = snapshot(peft)
    loss_before = mean_loss(model, examples, tokenizer.pad_token_id)
    trainer = Trainer(model=model, args=args(tmp_path), train_dataset=examples,
                      data_collator=lambda batch: collate(batch, tokenizer.pad_token_id))
    trainer.train()
    loss_after = mean_loss(model, examples, tokenizer.pad_token_id)
    assert loss_after < loss_before - 0.02, (loss_before, loss_after)
    assert_only_adapter_changed(peft, before)
    optimizer_params = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimizer_params == {id(p) for p in peft.trainable_parameters()}

    # A plain Trainer saves the whole adapted model under its wrapped names: it does not crash, it resumes the same
    # adapted model, but it is the size of the base (AdapterTrainer below saves the adapter only).
    trainer.save_model(str(tmp_path / "plain"))
    saved = load_file(str(tmp_path / "plain" / "model.safetensors"))
    assert any(".base.weight" in k for k in saved) and any(".adapters.default." in k for k in saved)
    assert set(saved) == set(model.state_dict())


def test_plain_pytorch_loop_trains_minilm_on_sst2(sst2_minilm):
    model, tokenizer, examples = sst2_minilm()
    peft = attach_sst2(model)
    before = snapshot(peft)
    loss_before = mean_loss(model, examples, tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(peft.trainable_parameters(), lr=5e-3)
    model.train()
    for step in range(8):
        batch = collate(examples[(step % 2) * 8:(step % 2) * 8 + 8], tokenizer.pad_token_id)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert mean_loss(model, examples, tokenizer.pad_token_id) < loss_before - 0.02
    assert_only_adapter_changed(peft, before)


def tiny_examples(tiny, n: int = 16) -> list[dict]:
    batch = tiny.batch("bert", size=n, length=6)
    return [{"input_ids": ids.tolist(), "labels": int(label)} for ids, label in zip(batch["input_ids"],
                                                                                      batch["labels"])]


def test_adapter_trainer_checkpoints_the_adapter_only_and_resumes(tiny, tmp_path):
    examples = tiny_examples(tiny)
    collator = lambda batch: collate(batch, 0)
    model = tiny.model("bert")
    attach_sst2(model)
    trainer = AdapterTrainer(model=model, args=args(tmp_path / "run", max_steps=4, save_strategy="steps",
                                                    save_steps=2, learning_rate=1e-2),
                             train_dataset=examples, data_collator=collator)
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / "adapter_config.json").is_file()
    assert not (checkpoint / "model.safetensors").exists()
    assert (checkpoint / "optimizer.pt").is_file()  # the Trainer's own state is still there, for resuming

    trainer.save_model(str(tmp_path / "final"))
    batch = collate(examples[:4], 0)
    reloaded = unipeft.from_pretrained(tiny.model("bert"), tmp_path / "final").model
    torch.testing.assert_close(tiny.logits(reloaded, batch), tiny.logits(model, batch), rtol=0, atol=0)

    resumed_model = tiny.model("bert")
    resumed = attach_sst2(resumed_model)
    AdapterTrainer(model=resumed_model, args=args(tmp_path / "run", max_steps=4, save_strategy="no",
                                                  learning_rate=1e-2),
                   train_dataset=examples, data_collator=collator).train(resume_from_checkpoint=str(checkpoint))
    for key, tensor in unipeft.handle(model).adapter_state_dict("default").items():
        torch.testing.assert_close(resumed.adapter_state_dict("default")[key], tensor, rtol=1e-5, atol=1e-6,
                                   msg=key)


def test_adapter_trainer_trains_a_4bit_base(tiny_llama_path, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_compute_dtype=torch.float32)
    model = transformers.LlamaForCausalLM.from_pretrained(tiny_llama_path, quantization_config=quantization,
                                                          device_map="cpu", dtype=torch.float32)
    peft = unipeft.attach(model, "lora", r=4)
    ids = torch.randint(3, 100, (8, 12), generator=torch.Generator().manual_seed(0))
    examples = [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]
    with pytest.raises(ValueError, match="purely quantized"):  # transformers only knows HF peft's adapters
        Trainer(model=model, args=args(tmp_path), train_dataset=examples)
    before = {k: v.clone() for k, v in peft.base_state_dict().items()}
    loss_before = mean_loss(model, examples, 0)  # an evaluation first: bitsandbytes' AVX512 repacking trigger
    AdapterTrainer(model=model, args=args(tmp_path, learning_rate=1e-2, max_steps=20), train_dataset=examples,
                   data_collator=lambda batch: collate(batch, 0)).train()
    loss_after = mean_loss(model, examples, 0)
    assert loss_after < loss_before - 0.2, (loss_before, loss_after)  # measured: 4.63 -> 4.25
    assert "_hf_peft_config_loaded" not in model.__dict__
    for key, tensor in peft.base_state_dict().items():
        assert torch.equal(tensor, before[key]), key


def test_adapter_trainer_needs_adapters(tiny, tmp_path):
    with pytest.raises(ValueError, match="no unipeft adapters"):
        AdapterTrainer(model=tiny.model("bert"), args=args(tmp_path))


def test_adapter_trainer_loads_the_best_adapter_at_the_end(tiny, tmp_path):
    examples = tiny_examples(tiny)
    model = tiny.model("bert")
    peft = attach_sst2(model)
    trainer = AdapterTrainer(
        model=model, args=args(tmp_path, max_steps=6, save_strategy="steps", save_steps=2, eval_strategy="steps",
                               eval_steps=2, load_best_model_at_end=True, metric_for_best_model="loss",
                               greater_is_better=True, learning_rate=5e-2),  # "best" = the first: not the last state
        train_dataset=examples, eval_dataset=examples[:8], data_collator=lambda batch: collate(batch, 0))
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name == "checkpoint-2"
    saved = load_file(str(best / "adapter_model.safetensors"))
    last = load_file(str(best.parent / "checkpoint-6" / "adapter_model.safetensors"))
    assert any(not torch.equal(saved[k], last[k]) for k in saved)
    assert saved.keys() == peft.adapter_state_dict("default").keys()
    for key, tensor in peft.adapter_state_dict("default").items():
        assert torch.equal(tensor, saved[key]), key
