"""One optimizer step: the batch split into micro-batches, each micro-batch's loss weighted so that the gradients add
up to the gradient of the whole batch's mean loss, under autocast, with fp16's gradient scaler.

The mean is over the loss's units: examples for a labelled task, labelled tokens (after the shift) for a causal LM.
A micro-batch with n of the batch's N units contributes (its mean loss) · n / N, so accumulating over micro-batches
gives the one-batch update to rounding, whatever the split (and packed rows the unpacked ones: the same units).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from unipeft.data import IGNORE_INDEX, collate
from unipeft.peft import Peft
from unipeft.train.distributed import LossModule, Strategy
from unipeft.train.lm_loss import causal_lm_loss_sum
from unipeft.train.packing import pack
from unipeft.train.precision import autocast, grad_scaler


def check_compile(value: bool | str) -> None:
    """Raise ValueError unless ``value`` is a ``compile`` setting: a bool or one of torch's compile backends."""
    if isinstance(value, bool):
        return
    backends = torch._dynamo.list_backends(exclude_tags=())
    if not isinstance(value, str) or value not in backends:
        raise ValueError(f"compile must be true, false or a torch.compile backend ({', '.join(backends)}), "
                         f"got {value!r}")


def loss_units(example: Mapping[str, Any]) -> int:
    """What one example adds to the denominator of the batch's mean loss: 1 for a labelled example, its labelled
    tokens after the shift for a causal-LM example."""
    labels = example["labels"]
    if isinstance(labels, (list, tuple)):
        return sum(1 for y in labels[1:] if y != IGNORE_INDEX)
    return 1


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on ``device``."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@dataclass(kw_only=True)
class Stepper:
    """Runs optimizer steps for one run (see the module docstring).

    Attributes:
        peft: the adapted model's handle.
        device: where the model is.
        precision: ``fp32``, ``bf16`` or ``fp16``.
        causal: whether the task is a causal LM (the loss is taken over labelled tokens, the head only there).
        pad_id: the padding token.
        grad_accum_steps: micro-batches per step.
        packing: pack causal-LM micro-batches (:func:`unipeft.train.packing.pack`) into rows of ``capacity``.
        capacity: tokens per packed row.
        loss_chunk: vocabulary rows per chunk of the LM head (None: all at once).
        max_grad_norm: gradient clipping (None: none).
        strategy: one process, or DDP (:mod:`unipeft.train.distributed`): this rank's share of each batch, the
            loss weighted so that the ranks' averaged gradient is the global batch's.
        compile: ``torch.compile`` the loss module (the model's forward and the loss) with the default backend
            (``True``) or the one named; shapes are marked dynamic after the first recompilation (padded batches
            vary in length).
    """

    peft: Peft
    device: torch.device
    precision: str
    causal: bool
    pad_id: int
    grad_accum_steps: int = 1
    packing: bool = False
    capacity: int = 512
    loss_chunk: int | None = 8192
    max_grad_norm: float | None = None
    strategy: Strategy = dataclasses.field(default_factory=Strategy)
    compile: bool | str = False

    def __post_init__(self) -> None:
        self.scaler = grad_scaler(self.device, self.precision)
        self.rewrap()

    def rewrap(self) -> None:
        """(Re)build the module the loss runs through, after the trainable tensors were replaced."""
        module = LossModule(self.peft.model, self.loss_sum)
        if self.compile is not False:
            module.compile(**({} if self.compile is True else {"backend": self.compile}))
        self.module = self.strategy.wrap(module)

    def batch(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """The tensors of a micro-batch, on the device."""
        made = pack(examples, self.pad_id, self.capacity) if self.packing else collate(examples, self.pad_id)
        return to_device(made, self.device)

    def loss_sum(self, model: nn.Module, batch: Mapping[str, torch.Tensor], units: int) -> torch.Tensor:
        """The micro-batch's summed loss (its mean loss times its ``units``)."""
        if self.causal:
            return causal_lm_loss_sum(model, batch, chunk=self.loss_chunk)
        return model(**batch).loss * units

    def step(self, examples: Sequence[Mapping[str, Any]], optimizer: torch.optim.Optimizer, step: int,
             total: int) -> tuple[float, bool]:
        """Optimizer step ``step`` (1-based) of ``total`` on ``examples``; returns the batch's mean task loss and
        whether the trainable tensors were replaced (then the optimizer must be rebuilt). The forms' training
        contract: their regularisers join the loss once per step, and ``peft.on_step`` runs after the update, while
        the gradients are still there (AdaLoRA scores its singular values with them)."""
        units = [loss_units(e) for e in examples]
        total_units = max(1, sum(units))  # of the global batch: every rank divides by the same count
        mine, weight = self.strategy.share(list(range(len(examples))))
        parts = [p for p in np.array_split(np.asarray(mine), self.grad_accum_steps) if len(p)]
        loss_value = 0.0
        for k, part in enumerate(parts):
            micro = [examples[int(i)] for i in part]
            n = sum(units[int(i)] for i in part)
            with self.strategy.no_sync(self.module, last=k == len(parts) - 1):
                with autocast(self.device, self.precision):
                    loss = self.module(self.batch(micro), n) / total_units
                    objective = loss * weight + self.peft.loss_term() if k == 0 else loss * weight
                self.scaler.scale(objective).backward()
            loss_value += float(loss.detach()) if weight else 0.0
        loss_value = self.strategy.sum(loss_value)
        self.strategy.reduce_gradients([p for g in optimizer.param_groups for p in g["params"]])
        if self.max_grad_norm is not None:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                           self.max_grad_norm)
        self.scaler.step(optimizer)
        self.scaler.update()
        replaced = self.peft.on_step(step, total)
        optimizer.zero_grad(set_to_none=True)
        return loss_value, replaced


__all__ = ["Stepper", "loss_units", "to_device"]
