"""Packing causal-LM examples: several examples per row, each with its own positions and attention.

A batch of examples of different lengths padded to its longest row spends compute on padding. Packing puts several
examples in one row, first-fit by decreasing length into rows of ``capacity`` tokens, and numbers each example's
positions from 0 (``position_ids``), with no ``attention_mask``: transformers then reads the example boundaries from
the resets of ``position_ids`` and attends block-diagonally and causally within each example, so that no example
sees another (the same convention as flash-attention's varlen packing and TRL's ``padding_free``). The first label of
every example is ignored, since the token before it belongs to another example, exactly as the shift ignores it when
the example has a row of its own: the packed loss is the unpacked loss, to rounding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from unipeft.data import IGNORE_INDEX


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices into ``lengths`` grouped into rows of at most ``capacity`` tokens, first fit by decreasing length (an
    example longer than ``capacity`` gets a row of its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def pack(examples: Sequence[Mapping[str, Any]], pad_token_id: int, capacity: int) -> dict[str, torch.Tensor]:
    """Causal-LM ``examples`` (``input_ids`` and ``labels`` lists) packed into rows: ``input_ids``, ``labels`` and
    ``position_ids`` of shape (R, T), with T the longest packed row. Padding at a row's end is a segment of its own
    (positions from 0, labels ignored).

    Raises:
        ValueError: for no examples, or examples without token-level labels.
    """
    if not examples:
        raise ValueError("cannot pack an empty batch")
    if not all(isinstance(e.get("labels"), (list, tuple)) for e in examples):
        raise ValueError("packing needs causal-LM examples with token-level labels (task kind causal_lm or "
                         "generation)")
    lengths = [len(e["input_ids"]) for e in examples]
    rows = pack_rows(lengths, capacity)
    width = max(sum(lengths[i] for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = lengths[i]
            ids[r, at:at + n] = torch.tensor(examples[i]["input_ids"])
            labels[r, at:at + n] = torch.tensor(examples[i]["labels"])
            labels[r, at] = IGNORE_INDEX  # predicted from another example's last token
            positions[r, at:at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


__all__ = ["pack", "pack_rows"]
