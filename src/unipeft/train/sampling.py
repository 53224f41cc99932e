"""The order of training batches: a seeded random order per epoch, optionally grouped by length.

Every epoch's plan is a pure function of ``(lengths, batch_size, seed, epoch)``, so a resumed run rebuilds the same
plan and skips the batches it has already seen.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from unipeft.data import batch_order

#: With grouping, examples are sorted by length within windows of this many batches (transformers uses 50 too).
MEGA_BATCHES = 50


def epoch_plan(lengths: Sequence[int], batch_size: int, *, seed: int, epoch: int,
               group_by_length: bool = False) -> list[np.ndarray]:
    """The batches of one epoch, as arrays of example indices.

    Without grouping: the seeded permutation of :func:`unipeft.data.batch_order` cut into consecutive batches. With
    grouping: that permutation is cut into windows of ``MEGA_BATCHES · batch_size`` examples, each window is sorted by
    length (longest first) and cut into batches, and the batches are then shuffled with the same seed, so each batch
    holds examples of similar length (little padding) while the batch order stays random.

    Args:
        lengths: the token count of each example.
        batch_size: examples per batch (the last batch may be smaller).
        seed: the run's seed.
        epoch: the epoch number, mixed into the seed.
        group_by_length: group examples of similar length.

    Raises:
        ValueError: if ``batch_size < 1``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = batch_order(len(lengths), shuffle=True, seed=seed, epoch=epoch)
    if not group_by_length:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    sizes = np.asarray(lengths)
    window = MEGA_BATCHES * batch_size
    plan: list[np.ndarray] = []
    for start in range(0, len(order), window):
        chunk = order[start:start + window]
        chunk = chunk[np.argsort(-sizes[chunk], kind="stable")]
        plan.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    shuffle = np.random.default_rng([seed, epoch, 1]).permutation(len(plan))
    return [plan[i] for i in shuffle]


__all__ = ["epoch_plan", "MEGA_BATCHES"]
