"""What some methods need from the training loop, gathered in one place (each is a no-op for other methods).

- every form: ``peft.on_step(step, total)`` after each optimizer step (AdaLoRA reallocates its rank budget there);
- FishMask: choose its entries by Fisher information on a few training batches before the optimizer is built
  (:func:`unipeft.methods.sparse.prepare`);
- diff pruning: prune at ``prune_at`` of training, after which the trainable tensors are new and the optimizer must be
  rebuilt (:func:`unipeft.methods.sparse.on_step`);
- AdaLoRA: its orthogonality regulariser is added to the training loss (:func:`adalora_orth_loss`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

from unipeft.core.adapted import Peft
from unipeft.methods import sparse
from unipeft.methods.adalora import AdaLoRA, adalora_orth_loss

log = logging.getLogger(__name__)

#: Training batches FishMask scores the Fisher information on.
FISHER_BATCHES = 8


class MethodHooks:
    """The trainer hooks of the adapters attached to ``peft``."""

    def __init__(self, peft: Peft) -> None:
        self.peft = peft
        self.adalora = any(isinstance(p.form, AdaLoRA) for _, p in peft.delta_modules())

    def before_training(self, batches: Callable[[], Iterable[Any]]) -> None:
        """Let FishMask choose its entries on the first :data:`FISHER_BATCHES` of ``batches()`` (if it has not)."""
        if sparse.needs_prepare(self.peft):
            chosen = sparse.prepare(self.peft, batches())
            log.info("FishMask chose %d entries on %d batches", sum(chosen.values()), FISHER_BATCHES)

    def loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The training loss plus the methods' regularisers."""
        return loss + adalora_orth_loss(self.peft) if self.adalora else loss

    def after_step(self, step: int, total_steps: int) -> bool:
        """Run the per-step hooks after optimizer step ``step`` (1-based); True if the optimizer must be rebuilt."""
        self.peft.on_step(step, total_steps)
        return sparse.on_step(self.peft, step, total_steps)


__all__ = ["MethodHooks", "FISHER_BATCHES"]
