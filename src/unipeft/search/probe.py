"""Checking a point before training it: attach its recipe to the real base for a moment, count its trainable
parameters (and, for the ``time`` cost, time a few training steps of it alone), detach.

Attaching a delta is cheap (milliseconds: no data, no optimizer), so every sampled point is checked on the model it
will train on, with the same head copy as training adds (:func:`unipeft.train.loop.with_head`): the count is the
``trainable_params`` the run will report, and a combination the model cannot take (a position it lacks, a form at
an insertion it does not support) fails here, not in the middle of a wave.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

import unipeft
from unipeft.core.recipe import Recipe
from unipeft.models import load_model
from unipeft.train.config import TrainConfig
from unipeft.train.loop import model_kind, with_head
from unipeft.train.multi import adapter_parameters

PROBE = "_search_probe"


@dataclass(frozen=True)
class Measured:
    """What the probe found: trainable parameters (adapter + head copy), every parameter of the adapted model (base,
    adapter and head copy: the ``total`` training and ``unipeft bench`` report, as HF peft's
    ``print_trainable_parameters`` counts), and the seconds per training step alone (None unless timed)."""

    params: int
    total: int
    step_s: float | None = None

    @property
    def percent(self) -> float:
        """Trainable parameters as a percentage of the adapted model's (the ``trainable %`` training reports)."""
        return 100.0 * self.params / self.total


class Probe:
    """The base model of a search, loaded once, on which points are checked (see the module docstring).

    Args:
        config: a trial's training config (model, task, batch_size, max_length).
    """

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.task = config.task_spec()
        kind, labels = model_kind(self.task)
        self.model, self.tokenizer = load_model(config.model, kind=kind, num_labels=labels, seed=config.seed)

    def measure(self, recipe: Recipe, *, time_steps: int = 0) -> Measured:
        """Attach ``recipe`` (with the head copy), count its trainable parameters, optionally time ``time_steps``
        forward-backward steps on a random batch of ``batch_size`` × ``max_length`` tokens (after one untimed),
        and detach.

        Raises:
            ValueError: the model cannot take the recipe (the attach's message).
        """
        peft = unipeft.attach(self.model, with_head(recipe, self.task.kind), name=PROBE)
        try:
            params = sum(p.numel() for p in adapter_parameters(peft, PROBE))
            total = peft.summary().total
            step_s = self._time(peft, time_steps) if time_steps else None
        finally:
            peft.detach()
        return Measured(params=params, total=total, step_s=step_s)

    def _time(self, peft: unipeft.Peft, steps: int) -> float:
        c = self.config
        generator = torch.Generator().manual_seed(0)
        vocab = int(getattr(self.model.config, "vocab_size", 1000))
        ids = torch.randint(5, vocab, (c.batch_size, c.max_length), generator=generator)
        labels = torch.zeros(c.batch_size, dtype=torch.long if self.task.kind == "classification" else torch.float)
        params = adapter_parameters(peft, PROBE)
        for p in params:
            p.requires_grad_(True)
        self.model.train()
        times = []
        for i in range(steps + 1):
            began = time.perf_counter()
            out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
            out.loss.backward()
            times.append(time.perf_counter() - began)
            for p in params:
                p.grad = None
        self.model.eval()
        return statistics.median(times[1:])


__all__ = ["Probe", "Measured"]
