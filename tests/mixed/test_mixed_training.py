"""Mixed batches for training (``peft.mixed_batch(names, train=True)``): one forward and backward through the base for
rows of several adapters, each adapter getting exactly the gradient of its own rows' loss, as if trained alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.mixed.test_mixed_batch import adapted

NAMES = ["lora", "ia3", "houlsby", "lora", "ia3", "houlsby", "lora"]
RECIPES = {"lora": "lora", "ia3": "ia3", "houlsby": "houlsby"}


def row_losses(model, ids: torch.Tensor) -> torch.Tensor:
    """(B,) summed next-token losses of each row."""
    logits = model(input_ids=ids).logits  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").sum(1)


def params(peft, name: str) -> list[torch.nn.Parameter]:
    return [p for _, placed in peft.delta_modules(name) for p in placed.parameters()]


def grads(peft, name: str) -> list[torch.Tensor]:
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params(peft, name)]


@pytest.fixture
def trainable(tiny, randomize):
    peft = adapted(tiny, randomize, "llama", RECIPES)
    peft.set_active(*RECIPES)  # every adapter trainable
    peft.model.train()
    return peft


def test_each_adapter_gets_the_gradient_of_its_own_rows(tiny, trainable):
    peft = trainable
    ids = tiny.batch("llama", size=len(NAMES), length=9)["input_ids"]
    weights = torch.linspace(0.5, 2.0, len(NAMES))  # rows weighted differently: each must reach its own adapter
    with peft.mixed_batch(NAMES, train=True):
        mixed_losses = row_losses(peft.model, ids)
    (mixed_losses * weights).sum().backward()
    mixed_grads = {name: grads(peft, name) for name in RECIPES}
    peft.model.zero_grad(set_to_none=True)

    for name in RECIPES:  # the reference: the adapter alone on its rows
        rows = [b for b, n in enumerate(NAMES) if n == name]
        peft.set_active(name)
        alone = row_losses(peft.model, ids[rows])
        (alone * weights[rows]).sum().backward()
        torch.testing.assert_close(mixed_losses[rows].detach(), alone.detach(), rtol=1e-5, atol=1e-5)
        expected = grads(peft, name)
        assert any(g.abs().max() > 0 for g in expected)
        for got, want in zip(mixed_grads[name], expected):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        peft.model.zero_grad(set_to_none=True)


def test_a_row_reaches_only_its_own_adapter(tiny, trainable):
    peft = trainable
    ids = tiny.batch("llama", size=3, length=6)["input_ids"]
    with peft.mixed_batch(["ia3", "lora", None], train=True):
        losses = row_losses(peft.model, ids)
    losses[1].backward()  # only the LoRA row
    assert all(g.abs().max() == 0 for g in grads(peft, "ia3") + grads(peft, "houlsby"))
    assert any(g.abs().max() > 0 for g in grads(peft, "lora"))


def test_inference_mixed_batches_stay_detached_and_refuse_training_mode(tiny, trainable):
    peft = trainable
    ids = tiny.batch("llama", size=2, length=5)["input_ids"]
    with pytest.raises(ValueError, match="mixed batches are for inference.*train=True"):
        with peft.mixed_batch(["lora", "ia3"]):
            pass
    peft.model.eval()
    with peft.mixed_batch(["lora", "ia3"]):
        out = row_losses(peft.model, ids)
    assert not out.requires_grad  # detached stacks: nothing of the adapters is in the graph


def test_dropout_is_refused_for_training(tiny, randomize):
    peft = adapted(tiny, randomize, "llama", {"a": "lora", "b": "lora"}, dropout=0.1)
    with pytest.raises(ValueError, match=r"adapter 'a' has dropout 0.1 .*train its adapters with dropout 0"):
        peft.mixed_batch(["a", "b"], train=True)
