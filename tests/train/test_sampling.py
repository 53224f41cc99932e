"""Batch plans: every example once per epoch, deterministic, and less padding when grouped by length."""

from __future__ import annotations

import numpy as np
import pytest

from unipeft.train.sampling import epoch_plan


@pytest.mark.parametrize("group", [False, True])
def test_each_example_once_and_deterministic(group):
    lengths = np.random.default_rng(0).integers(3, 60, size=1000).tolist()
    plan = epoch_plan(lengths, 32, seed=1, epoch=0, group_by_length=group)
    assert sorted(np.concatenate(plan).tolist()) == list(range(1000))
    assert sum(len(b) < 32 for b in plan) == 1  # only one short batch
    again = epoch_plan(lengths, 32, seed=1, epoch=0, group_by_length=group)
    assert all((a == b).all() for a, b in zip(plan, again))
    other = epoch_plan(lengths, 32, seed=1, epoch=1, group_by_length=group)
    assert any(len(a) != len(b) or (a != b).any() for a, b in zip(plan, other))


def test_grouping_cuts_padding():
    lengths = np.random.default_rng(0).integers(3, 60, size=3200)
    padded = {g: sum(len(b) * lengths[b].max() for b in epoch_plan(lengths.tolist(), 32, seed=0, epoch=0,
                                                                    group_by_length=g)) for g in (False, True)}
    assert padded[True] < 0.7 * padded[False]
