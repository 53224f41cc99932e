"""Learning-rate schedules against transformers' own."""

from __future__ import annotations

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from unipeft.train.schedule import lr_factor, warmup_steps


@pytest.mark.parametrize("scheduler, reference", [("linear", get_linear_schedule_with_warmup),
                                                  ("cosine", get_cosine_schedule_with_warmup)])
def test_matches_transformers(scheduler, reference):
    total, warmup = 50, warmup_steps(50, 0.1)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = reference(optimizer, warmup, total)
    for step in range(total):
        assert lr_factor(step, total_steps=total, warmup=warmup, scheduler=scheduler) == pytest.approx(
            schedule.get_last_lr()[0], abs=1e-12)
        optimizer.step()
        schedule.step()


def test_constant_and_errors():
    assert [lr_factor(s, total_steps=10, warmup=2, scheduler="constant") for s in (0, 1, 2, 9)] == [0, 0.5, 1, 1]
    assert warmup_steps(600, 0.06) == 36
    with pytest.raises(ValueError, match="unknown scheduler 'step'; valid: linear, cosine, constant"):
        lr_factor(0, total_steps=10, warmup=0, scheduler="step")
