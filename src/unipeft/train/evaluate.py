"""Evaluating a model on a task's encoded examples: the task's metrics, and the loss.

- classification: predictions are ``argmax(logits)``;
- regression: the prediction is ``logits[:, 0]``;
- causal_lm and generation: the mean cross-entropy over response tokens (labels != -100), and its perplexity
  (a generation task's BLEU/ROUGE come from :func:`unipeft.train.generation.evaluate_generation`).

Examples are batched in order of length (the metrics do not depend on the order), so batches carry little padding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unipeft.data import IGNORE_INDEX, TaskSpec, collate, compute_metrics, perplexity, predictions_from_logits


def _pad_id(model: nn.Module, pad_token_id: int | None) -> int:
    if pad_token_id is not None:
        return pad_token_id
    found = getattr(getattr(model, "config", None), "pad_token_id", None)
    return 0 if found is None else int(found)


def _on(batch: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The batch on the model's device."""
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


def evaluate(model: nn.Module, task: TaskSpec, examples: Sequence[Mapping[str, Any]], batch_size: int, *,
             pad_token_id: int | None = None) -> dict[str, float]:
    """Evaluate ``model`` on encoded ``examples`` of ``task`` in inference mode, then put it back in training mode
    if it was in it.

    Args:
        model: a transformers model with the head the task needs (adapters attached or not).
        task: the task (its kind and metrics).
        examples: examples from :func:`unipeft.data.encode`.
        batch_size: examples per forward pass.
        pad_token_id: the padding id (default: ``model.config.pad_token_id``, else 0).

    Returns:
        ``{metric: value}`` with the task's metrics and ``loss`` (the mean loss; for causal_lm per response token).

    Raises:
        ValueError: if ``examples`` is empty or ``batch_size < 1``.
    """
    if not examples:
        raise ValueError(f"no evaluation examples for task {task.name!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pad = _pad_id(model, pad_token_id)
    order = np.argsort([len(e["input_ids"]) for e in examples], kind="stable")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if task.kind in ("causal_lm", "generation"):
                return _causal_lm(model, examples, order, batch_size, pad)
            return _labelled(model, task, examples, order, batch_size, pad)
    finally:
        model.train(was_training)


def _labelled(model: nn.Module, task: TaskSpec, examples: Sequence[Mapping[str, Any]], order: np.ndarray,
              batch_size: int, pad: int) -> dict[str, float]:
    outputs: list[np.ndarray] = [np.empty(0)] * len(examples)
    labels: list[float] = [0.0] * len(examples)
    loss_sum = 0.0
    for start in range(0, len(order), batch_size):
        idx = [int(i) for i in order[start:start + batch_size]]
        batch = _on(collate([examples[i] for i in idx], pad), model)
        out = model(**batch)
        loss_sum += float(out.loss) * len(idx)
        logits = out.logits.float().cpu().numpy()  # (B, num_labels)
        for row, i in enumerate(idx):
            outputs[i] = logits[row]
            labels[i] = examples[i]["labels"]
    predictions = predictions_from_logits(np.stack(outputs), task.kind)  # type: ignore[arg-type]
    metrics = compute_metrics(task.metrics, predictions, np.asarray(labels))
    metrics["loss"] = loss_sum / len(examples)
    return metrics


def _causal_lm(model: nn.Module, examples: Sequence[Mapping[str, Any]], order: np.ndarray, batch_size: int,
               pad: int) -> dict[str, float]:
    total, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = _on(collate([examples[int(i)] for i in order[start:start + batch_size]], pad), model)
        labels = batch.pop("labels")  # (B, T)
        logits = model(**batch).logits  # (B, T, V)
        shifted = labels[:, 1:]  # token t is predicted at position t-1
        total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), shifted.flatten(),
                                       ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((shifted != IGNORE_INDEX).sum())
    mean = total / max(1, count)
    return {"perplexity": perplexity(mean) if math.isfinite(mean) else float("inf"), "loss": mean}


__all__ = ["evaluate"]
