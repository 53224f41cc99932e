"""Greedy generation from prompts, and scoring a generation task on its generations (BLEU, ROUGE-L).

The prompts are tokenised as in training (:func:`unipeft.data.prompt_token_ids`: the tokenizer's prefix, e.g. BOS,
then the prompt), left-padded into batches of similar length, and decoded greedily with the model's own
``generate`` and its KV cache (sequence-level deltas such as prefixes and prompts work with the cache). A hypothesis
is the generated text up to its first line break, stripped: every reference here is one line.

Over several ranks the prompts are shared as the evaluation's examples are (:func:`unipeft.train.evaluate.
shard_batches`), ``generate`` runs with ``synced_gpus`` (every rank keeps stepping until all are done, as sharded
weights need), and the texts are gathered to every rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from unipeft.data import TaskSpec, prompt_text, prompt_token_ids, text_metrics
from unipeft.data.textmetrics import TEXT_METRICS
from unipeft.train.distributed import Strategy
from unipeft.train.evaluate import shard_batches


def prompt_groups(rows: Sequence[Mapping[str, Any]], task: TaskSpec) -> list[tuple[str, list[str]]]:
    """``(prompt, references)`` per distinct prompt, in first-seen order: rows with the same prompt are one segment
    whose references are all their responses (E2E's several texts per meaning representation).

    Raises:
        ValueError: a row lacks a field of the template or the response field.
    """
    assert task.response_field is not None
    groups: dict[str, list[str]] = {}
    for i, row in enumerate(rows):
        if task.response_field not in row:
            raise ValueError(f"row {i} has no field {task.response_field!r}; its fields: {', '.join(row)}")
        groups.setdefault(prompt_text(row, task, i), []).append(str(row[task.response_field]))
    return list(groups.items())


def first_line(text: str) -> str:
    """The text up to its first line break, stripped."""
    return text.strip().split("\n", 1)[0].strip()


def generate(model: nn.Module, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int,
             batch_size: int, ranks: Strategy | None = None) -> list[str]:
    """Greedy continuations of ``prompts`` (the generated text only, special tokens removed), in their order.

    Prompts are batched by length and left-padded; the model is put in eval mode and back in training mode
    afterwards if it was in it. With ``ranks``, every rank must call this with the same prompts; each generates its
    share and all get every text.

    Raises:
        ValueError: ``batch_size`` or ``max_new_tokens`` below 1, or a tokenizer without a pad token.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    pad = tokenizer.pad_token_id
    if pad is None:
        raise ValueError("the tokenizer has no pad token; unipeft.models.load_model sets one")
    encoded = [prompt_token_ids(p, tokenizer) for p in prompts]
    ranks = ranks or Strategy()
    order = np.argsort([len(ids) for ids in encoded], kind="stable")
    mine: dict[int, str] = {}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for idx, real in shard_batches(order, batch_size, ranks):
                longest = max(len(encoded[i]) for i in idx)
                ids = torch.tensor([[pad] * (longest - len(encoded[i])) + encoded[i] for i in idx],
                                   device=device)  # (B, T)
                mask = torch.tensor([[0] * (longest - len(encoded[i])) + [1] * len(encoded[i]) for i in idx],
                                    device=device)
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     do_sample=False, num_beams=1, pad_token_id=pad,
                                     synced_gpus=ranks.world_size > 1)  # (B, T + new)
                for row, i in enumerate(idx):
                    if real:
                        mine[i] = tokenizer.decode(out[row, longest:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    texts = {i: text for part in ranks.gather(mine) for i, text in part.items()}
    return [texts[i] for i in range(len(prompts))]


def evaluate_generation(model: nn.Module, tokenizer: Any, task: TaskSpec, rows: Sequence[Mapping[str, Any]],
                        batch_size: int,
                        ranks: Strategy | None = None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Generate greedily for every distinct prompt of ``rows`` (shared over ``ranks``) and score the task's text
    metrics.

    Returns:
        ``({metric: value}, generations)`` with the task's text metrics (``bleu``, ``rouge_l``, 0-100) and, per
        segment, ``{"prompt", "output", "references"}`` (``output`` is the scored first line).

    Raises:
        ValueError: no rows, or a missing field.
    """
    groups = prompt_groups(rows, task)
    if not groups:
        raise ValueError(f"no evaluation rows for task {task.name!r}")
    prompts = [p for p, _ in groups]
    texts = generate(model, tokenizer, prompts, max_new_tokens=task.max_new_tokens, batch_size=batch_size,
                     ranks=ranks)
    hypotheses = [first_line(t) for t in texts]
    references = [refs for _, refs in groups]
    metrics = text_metrics([m for m in task.metrics if m in TEXT_METRICS], hypotheses, references)
    generations = [{"prompt": p, "output": h, "references": r} for p, h, r in zip(prompts, hypotheses, references)]
    return metrics, generations


__all__ = ["generate", "evaluate_generation", "prompt_groups", "first_line"]
