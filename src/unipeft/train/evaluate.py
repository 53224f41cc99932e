"""Evaluating a model on a task's encoded examples: the task's metrics, and the loss.

- classification: predictions are ``argmax(logits)``;
- regression: the prediction is ``logits[:, 0]``;
- causal_lm and generation: the mean cross-entropy over response tokens (labels != -100), and its perplexity
  (a generation task's BLEU/ROUGE come from :func:`unipeft.train.generation.evaluate_generation`), computed as
  training computes it (:func:`unipeft.train.lm_loss.causal_lm_loss_sum`: the LM head only at labelled positions,
  chunked over the vocabulary), so evaluation never holds a batch's (B, T, V) logits.

Examples are batched in order of length (the metrics do not depend on the order), so batches carry little padding.

Over several ranks (``ranks``, a :class:`unipeft.train.distributed.Strategy`), each rank evaluates every
``world_size``-th example of that order, all ranks run the same number of forward passes (a short share repeats a
stand-in batch whose outputs are dropped, so that sharded FSDP weights are gathered in step), and the per-example
outputs and loss sums are gathered to every rank, where the metrics are computed over the whole set: the same
numbers as one process, to the rounding of the summation order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from unipeft.data import TaskSpec, collate, compute_metrics, perplexity, predictions_from_logits
from unipeft.train.distributed import Strategy
from unipeft.train.lm_loss import DEFAULT_CHUNK, causal_lm_loss_sum, label_count


def _pad_id(model: nn.Module, pad_token_id: int | None) -> int:
    if pad_token_id is not None:
        return pad_token_id
    found = getattr(getattr(model, "config", None), "pad_token_id", None)
    return 0 if found is None else int(found)


def _on(batch: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The batch on the model's device."""
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


def shard_batches(order: Sequence[int], batch_size: int, ranks: Strategy) -> list[tuple[list[int], bool]]:
    """This rank's batches of the indices ``order``: every ``world_size``-th index from its rank on, in batches of
    ``batch_size``, padded with stand-in batches (``(batch, False)``: outputs to drop) to the count of the largest
    share, so that every rank runs the same number of forward passes."""
    share = [int(i) for i in order[ranks.rank::ranks.world_size]]
    most = -(-len(order[0::ranks.world_size]) // batch_size)  # rank 0's share is the largest
    batches = [(share[k:k + batch_size], True) for k in range(0, len(share), batch_size)]
    stand_in = [int(order[0])]
    return batches + [(stand_in, False)] * (most - len(batches))


def evaluate(model: nn.Module, task: TaskSpec, examples: Sequence[Mapping[str, Any]], batch_size: int, *,
             pad_token_id: int | None = None, ranks: Strategy | None = None) -> dict[str, float]:
    """Evaluate ``model`` on encoded ``examples`` of ``task`` in inference mode, then put it back in training mode
    if it was in it.

    Args:
        model: a transformers model with the head the task needs (adapters attached or not).
        task: the task (its kind and metrics).
        examples: examples from :func:`unipeft.data.encode`.
        batch_size: examples per forward pass.
        pad_token_id: the padding id (default: ``model.config.pad_token_id``, else 0).
        ranks: the ranks to share the work with (default: this process alone); every rank must call this, and every
            rank gets the same metrics.

    Returns:
        ``{metric: value}`` with the task's metrics and ``loss`` (the mean loss; for causal_lm per response token).

    Raises:
        ValueError: if ``examples`` is empty or ``batch_size < 1``.
    """
    if not examples:
        raise ValueError(f"no evaluation examples for task {task.name!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ranks = ranks or Strategy()
    pad = _pad_id(model, pad_token_id)
    order = np.argsort([len(e["input_ids"]) for e in examples], kind="stable")
    batches = shard_batches(order, batch_size, ranks)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if task.kind in ("causal_lm", "generation"):
                return _causal_lm(model, examples, batches, pad, ranks)
            return _labelled(model, task, examples, batches, pad, ranks)
    finally:
        model.train(was_training)


def _labelled(model: nn.Module, task: TaskSpec, examples: Sequence[Mapping[str, Any]],
              batches: list[tuple[list[int], bool]], pad: int, ranks: Strategy) -> dict[str, float]:
    mine: list[tuple[int, np.ndarray]] = []  # (example, its logits)
    loss_sum = 0.0
    for idx, real in batches:
        out = model(**_on(collate([examples[i] for i in idx], pad), model))
        if real:
            loss_sum += float(out.loss) * len(idx)
            mine += zip(idx, out.logits.float().cpu().numpy())  # (B, num_labels)
    outputs = dict(pair for part in ranks.gather(mine) for pair in part)
    order = sorted(outputs)
    predictions = predictions_from_logits(np.stack([outputs[i] for i in order]), task.kind)  # type: ignore[arg-type]
    metrics = compute_metrics(task.metrics, predictions, np.asarray([examples[i]["labels"] for i in order]))
    metrics["loss"] = sum(ranks.gather(loss_sum)) / len(examples)
    return metrics


def _causal_lm(model: nn.Module, examples: Sequence[Mapping[str, Any]], batches: list[tuple[list[int], bool]],
               pad: int, ranks: Strategy) -> dict[str, float]:
    total, count = 0.0, 0
    for idx, real in batches:
        batch = _on(collate([examples[i] for i in idx], pad), model)
        # the head only at labelled positions, chunked over the vocabulary: no (B, T, V) logits (training's loss)
        loss_sum = causal_lm_loss_sum(model, batch, chunk=DEFAULT_CHUNK)
        if real:
            total += float(loss_sum)
            count += label_count(batch["labels"])
    total, count = (sum(parts) for parts in zip(*ranks.gather((total, count))))
    mean = total / max(1, count)
    return {"perplexity": perplexity(mean) if math.isfinite(mean) else float("inf"), "loss": mean}


__all__ = ["evaluate"]
