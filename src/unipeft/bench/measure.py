"""Measurements of one trained run: inference latency (unmerged and merged), adapter size, memory peaks.

Latency is the median wall time of a forward pass over one fixed batch (the first ``batch_size`` evaluation
examples, padded to the longest), after ``warmup`` untimed passes, in inference mode. Merging folds the adapter into
the base weights (``Peft.merge``); methods whose deltas are not linear in a weight (prefixes, prompts, non-linear
adapters) cannot merge, and their merged latency is None. The largest difference between merged and unmerged
outputs on that batch is recorded as a check that merging kept the function.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unipeft.peft import Peft
from unipeft.data import collate

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Latency:
    """Inference latency of one batch.

    Attributes:
        batch_size: examples in the batch.
        tokens: real (unpadded) tokens in the batch.
        unmerged_ms: median forward time with the adapter as separate modules.
        merged_ms: the same after ``merge()``, or None when the adapter cannot merge.
        merge_max_abs_diff: the largest |merged − unmerged| output difference, or None.
        merge_error: why the adapter could not merge, or None.
    """

    batch_size: int
    tokens: int
    unmerged_ms: float
    merged_ms: float | None
    merge_max_abs_diff: float | None
    merge_error: str | None


def time_forward(model: nn.Module, batch: Mapping[str, torch.Tensor], *, warmup: int, repeats: int) -> tuple[float, torch.Tensor]:
    """The median time of ``model(**batch)`` in milliseconds over ``repeats`` timed passes, and its logits."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.eval()
    with torch.inference_mode():
        out = model(**inputs).logits
        for _ in range(max(0, warmup - 1)):
            model(**inputs)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(**inputs)
            times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times), out.float()


def measure_latency(peft: Peft, examples: Sequence[Mapping[str, Any]], pad_token_id: int, *, batch_size: int,
                    warmup: int, repeats: int) -> Latency:
    """Latency of ``peft.model`` on the first ``batch_size`` encoded ``examples``, unmerged then merged; the adapter
    is unmerged again afterwards.

    Raises:
        ValueError: no examples.
    """
    if not examples:
        raise ValueError("no examples to measure latency on")
    batch = collate(list(examples[:batch_size]), pad_token_id)
    model = peft.model
    unmerged, reference = time_forward(model, batch, warmup=warmup, repeats=repeats)
    merged_ms = diff = error = None
    try:
        peft.merge()
    except NotImplementedError as err:
        error = str(err).split(" — ")[0]
    else:
        try:
            merged_ms, out = time_forward(model, batch, warmup=warmup, repeats=repeats)
            mask = batch["attention_mask"].bool()
            if out.dim() == 3:  # (B, T, V): compare real positions only
                diff = float((out - reference)[mask].abs().max())
            else:
                diff = float((out - reference).abs().max())
        finally:
            peft.unmerge()
    return Latency(batch_size=len(batch["input_ids"]), tokens=int(batch["attention_mask"].sum()),
                   unmerged_ms=unmerged, merged_ms=merged_ms, merge_max_abs_diff=diff, merge_error=error)


def folder_bytes(path: str | os.PathLike[str]) -> int:
    """The total size of the files in a folder (recursively)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def safetensors_numel(path: str | os.PathLike[str]) -> int:
    """The number of tensor elements stored in a safetensors file (read from its header, no tensor is loaded)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            n = 1
            for dim in f.get_slice(key).get_shape():
                n *= dim
            total += n
    return total


def cuda_peak_mib() -> float | None:
    """``torch.cuda.max_memory_allocated()`` in MiB when this process used CUDA, else None."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return None


__all__ = ["Latency", "measure_latency", "time_forward", "folder_bytes", "safetensors_numel", "cuda_peak_mib"]
