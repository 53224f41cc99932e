"""Pruning a multi-objective search with Optuna's pruners.

Optuna's pruners judge a trial by its intermediate values, which only single-objective studies hold
(``Trial.report`` refuses multi-objective ones). So each search trial has a *shadow* trial in a second,
single-objective study of the same storage (``<study>:metric``, maximised), to which its intermediate metric values
are reported; the pruner (successive halving — Jamieson & Talwalkar 2016 / ASHA, Li et al. 2020 —, Hyperband or
the median rule) decides on that study, with the rungs it keeps there. The shadow study also keeps each trial's
learning curve for inspection (``optuna-dashboard sqlite:///study.db``).
"""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from unipeft.search.config import Budget


def make_pruner(name: str, budget: Budget) -> optuna.pruners.BasePruner:
    """The Optuna pruner ``name`` for ``budget`` (its first rung at the first evaluation, η = reduction_factor)."""
    first = budget.eval_every or budget.steps
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=budget.reduction_factor)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=first, max_resource=budget.steps,
                                              reduction_factor=budget.reduction_factor)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=budget.parallel, n_warmup_steps=0)
    return optuna.pruners.NopPruner()


class ShadowPruner:
    """The single-objective shadow study that prunes the search's trials (see the module docstring)."""

    def __init__(self, storage: str, study_name: str, pruner: optuna.pruners.BasePruner) -> None:
        self.study = optuna.create_study(storage=storage, study_name=f"{study_name}:metric", direction="maximize",
                                         pruner=pruner, load_if_exists=True)
        for stale in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            self.study.tell(stale.number, state=TrialState.FAIL)  # left running by an interrupted search

    def start(self, number: int) -> optuna.Trial:
        """A shadow trial for search trial ``number``."""
        shadow = self.study.ask()
        shadow.set_user_attr("search_trial", number)
        return shadow

    @staticmethod
    def report(shadow: optuna.Trial, value: float, step: int) -> bool:
        """Report an intermediate value; whether the pruner stops the trial here."""
        shadow.report(value, step)
        return shadow.should_prune()

    def finish(self, shadow: optuna.Trial, value: float | None) -> None:
        """Close the shadow trial: complete with the final value, or pruned (``value`` None)."""
        if value is None:
            self.study.tell(shadow, state=TrialState.PRUNED)
        else:
            self.study.tell(shadow, value)


__all__ = ["make_pruner", "ShadowPruner"]
