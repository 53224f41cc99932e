"""``AdapterTrainer`` keeps the forms' training contract that a plain ``Trainer`` skips: AdaLoRA's regulariser and
rank allocation, FishMask's choice of entries before the optimizer exists, diff pruning's new tensors in the
optimizer. Each test fails on a trainer that does not call ``peft.prepare`` / ``peft.loss_term`` / ``peft.on_step``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import unipeft
from unipeft.data import collate
from unipeft.integrations import AdapterTrainer
from unipeft.methods.adalora import AdaLoRA, adalora_orth_loss
from unipeft.methods.sparse import SparseDelta

from tests.integration.test_trainer import args, tiny_examples


def _trainer(tiny, tmp_path, method: str, steps: int, **options):
    model = tiny.model("bert")
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    peft = unipeft.attach(model, method, **options)
    trainer = AdapterTrainer(model=model, args=args(tmp_path, max_steps=steps, per_device_train_batch_size=4,
                                                    learning_rate=1e-2),
                             train_dataset=tiny_examples(tiny), data_collator=lambda batch: collate(batch, 0))
    return peft, trainer


def _forms(peft: unipeft.Peft, kind: type) -> list:
    return [p.form for _, p in peft.delta_modules() if isinstance(p.form, kind)]


def _optimizer_params(trainer) -> set[int]:
    return {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}


def test_adalora_ranks_are_pruned_to_the_budget(tiny, tmp_path):
    peft, trainer = _trainer(tiny, tmp_path, "adalora", 6, init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1)
    sites = _forms(peft, AdaLoRA)
    trainer.train()
    assert sum(site.rank for site in sites) == 2 * len(sites)  # the final budget: target_r x sites
    assert all(site.rank < 4 for site in sites) or len({site.rank for site in sites}) > 1


def test_adalora_orthogonality_term_joins_the_training_loss(tiny, tmp_path):
    peft, trainer = _trainer(tiny, tmp_path, "adalora", 1, init_r=4, target_r=2, orth_reg_weight=0.5)
    batch = collate(tiny_examples(tiny)[:4], 0)
    peft.model.train()
    with torch.no_grad():
        got = trainer.compute_loss(peft.model, batch)
        want = peft.model(**batch).loss + adalora_orth_loss(peft)
        assert adalora_orth_loss(peft).item() > 0.1
        torch.testing.assert_close(got, want)
        peft.model.eval()
        assert torch.equal(trainer.compute_loss(peft.model, batch), peft.model(**batch).loss)  # not in evaluation


def test_fishmask_chooses_its_entries_before_the_optimizer_is_built(tiny, tmp_path):
    peft, trainer = _trainer(tiny, tmp_path, "fishmask", 3)
    forms = _forms(peft, SparseDelta)
    random_masks = [f.indices.clone() for f in forms]
    assert peft.needs_prepare()
    trainer.train()
    assert forms and all(f.chosen == "fisher" for f in forms) and not peft.needs_prepare()
    assert any(not torch.equal(f.indices, r) for f, r in zip(forms, random_masks))
    assert sum(f.values.numel() for f in forms) > 0
    assert all(f.values.numel() == 0 or f.values.abs().sum() > 0 for f in forms)  # the optimizer trained them
    assert _optimizer_params(trainer) == {id(p) for p in peft.trainable_parameters()}


def test_diff_pruning_hands_the_kept_entries_to_the_optimizer(tiny, tmp_path):
    peft, trainer = _trainer(tiny, tmp_path, "diff_pruning", 4, prune_at=0.5)
    forms = _forms(peft, SparseDelta)
    assert all(f.indices is None for f in forms)
    trainer.train()
    assert forms and all(f.indices is not None and f.chosen == "magnitude" for f in forms)
    assert _optimizer_params(trainer) == {id(p) for p in peft.trainable_parameters()}
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert all(f.values in inner.state for f in forms)  # stepped after the swap (AdamW made their state)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_the_term_counts_once_per_optimizer_step(tiny, tmp_path, accumulation):
    """With gradient accumulation the regulariser's gradient is the same as without: once per optimizer step."""
    grads = {}
    peft, trainer = _trainer(tiny, tmp_path, "adalora", 1, init_r=4, target_r=2, orth_reg_weight=0.5)
    trainer.args.gradient_accumulation_steps = accumulation
    trainer.current_gradient_accumulation_steps = accumulation
    batch = collate(tiny_examples(tiny)[:4], 0)
    peft.model.train()
    site = _forms(peft, AdaLoRA)[0]
    reference = adalora_orth_loss(peft)
    reference.backward()
    want = site.lora_A.grad.clone()
    peft.model.zero_grad()
    for _ in range(accumulation):
        loss = trainer.compute_loss(peft.model, batch) - peft.model(**batch).loss
        (loss / accumulation if not trainer._loss_scaled_for_accumulation(None) else loss).backward()
    grads[accumulation] = site.lora_A.grad
    torch.testing.assert_close(grads[accumulation], want)


@pytest.mark.parametrize("method, options", [("fishmask", {}), ("diff_pruning", {"prune_at": 0.5}),
                                             ("adalora", {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1})])
def test_the_documented_plain_loop(tiny, method, options):
    """docs/integration.md's plain PyTorch loop, as written there."""
    from unipeft.core.delta import PREPARE_BATCHES

    model = tiny.model("bert")
    peft = unipeft.attach(model, method, **options)
    examples = tiny_examples(tiny)
    batches = [collate(examples[i * 4:(i + 1) * 4], 0) for i in range(4)]
    if peft.needs_prepare():
        peft.prepare(batches[:PREPARE_BATCHES])
    optimizer = torch.optim.AdamW(peft.trainable_parameters(), lr=5e-3)
    model.train()
    for step, batch in enumerate(batches, start=1):
        loss = model(**batch).loss + peft.loss_term()
        loss.backward()
        optimizer.step()
        if peft.on_step(step, len(batches)):
            optimizer = torch.optim.AdamW(peft.trainable_parameters(), lr=5e-3)
        optimizer.zero_grad()
    if method == "adalora":
        sites = _forms(peft, AdaLoRA)
        assert sum(s.rank for s in sites) == 2 * len(sites)
    else:
        forms = _forms(peft, SparseDelta)
        assert all(f.chosen == ("fisher" if method == "fishmask" else "magnitude") for f in forms)
        assert any(f.values.abs().sum() > 0 for f in forms)
