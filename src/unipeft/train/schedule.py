"""Learning-rate schedules: linear warm-up, then linear or cosine decay to zero, or a constant rate.

The rate is a pure function of the step, so resuming a run needs only the step number, and a run whose step budget
changes on resume simply follows the new schedule from where it is. The conventions are those of transformers'
``get_linear_schedule_with_warmup`` and ``get_cosine_schedule_with_warmup`` (the first warm-up step has rate 0).
"""

from __future__ import annotations

import math


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """The number of warm-up steps: ``ceil(warmup_ratio · total_steps)``, as transformers' ``TrainingArguments``."""
    return math.ceil(warmup_ratio * total_steps)


def lr_factor(step: int, *, total_steps: int, warmup: int, scheduler: str) -> float:
    """The multiplier of the peak learning rate for optimizer step ``step`` (0-based).

    Args:
        step: the index of the step about to be taken.
        total_steps: the steps of the whole run.
        warmup: warm-up steps (the factor rises linearly from 0 to 1 over them).
        scheduler: ``linear`` (decay to 0 at ``total_steps``), ``cosine`` (half a cosine to 0) or ``constant``.

    Raises:
        ValueError: for an unknown scheduler.
    """
    if scheduler not in ("linear", "cosine", "constant"):
        raise ValueError(f"unknown scheduler {scheduler!r}; valid: linear, cosine, constant")
    if step < warmup:
        return step / max(1, warmup)
    if scheduler == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    if scheduler == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


__all__ = ["lr_factor", "warmup_steps"]
