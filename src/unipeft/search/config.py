"""A search config: the space, the constraint, the objectives, the budget, and the training keys every trial shares.

From YAML (``configs/search_sst2.yaml``)::

    train: {model: minilm, task: sst2, batch_size: 16, max_length: 64, eval_limit: 872}   # TrainConfig keys
    space: {...}                                       # see unipeft.search.space
    constraints: {max_percent: 0.5}                    # or max_params: 100000
    objectives: {metric: accuracy, cost: params}       # maximise the metric, minimise params (or time)
    budget: {steps: 150, eval_every: 50, trials: 24, parallel: 4}
    sampler: tpe                                       # tpe (multi-objective TPE), nsga2, random
    pruner: successive_halving                         # successive_halving, hyperband, median, none
    seed: 0
    output_dir: runs/search_sst2

Overrides use dotted keys: ``budget.trials=8 train.task=cola output_dir=runs/search_cola``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args


from unipeft.search.space import SearchSpace, check_keys, space_from_dict
from unipeft.train.config import TrainConfig, set_override, train_config_from_dict
from unipeft.util.files import read_mapping

Sampler = Literal["tpe", "nsga2", "random"]
Pruner = Literal["successive_halving", "hyperband", "median", "none"]
Cost = Literal["params", "time"]
SAMPLERS: tuple[str, ...] = get_args(Sampler)
PRUNERS: tuple[str, ...] = get_args(Pruner)
COSTS: tuple[str, ...] = get_args(Cost)
#: TrainConfig keys the search sets per trial (from the space and the budget).
TRIAL_KEYS = ("method", "method_options", "lr", "max_steps", "eval_every", "output_dir", "save_every", "epochs")


def _positive_int(where: str, value: Any, nullable: bool = False) -> None:
    if value is None and nullable:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where} must be a positive integer{' or null' if nullable else ''}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class Constraints:
    """What a trial may cost; a point over it is marked infeasible without training.

    Attributes:
        max_params: the most trainable parameters (the adapter and the head copy), or None.
        max_percent: the most trainable parameters as a percentage of the adapted model's (base + adapter + head
            copy, the ``trainable %`` that training and ``unipeft bench`` report), or None.
    """

    max_params: int | None = None
    max_percent: float | None = None

    def __post_init__(self) -> None:
        _positive_int("constraints.max_params", self.max_params, nullable=True)
        if self.max_percent is not None and (isinstance(self.max_percent, bool) or not self.max_percent > 0):
            raise ValueError(f"constraints.max_percent must be a number > 0 or null, got {self.max_percent!r}")

    def violation(self, params: int, total: int) -> str | None:
        """Why ``params`` trainable parameters of a ``total``-parameter adapted model break the constraint, or None."""
        if self.max_params is not None and params > self.max_params:
            return f"{params:,} trainable parameters > max_params {self.max_params:,}"
        if self.max_percent is not None and 100.0 * params / total > self.max_percent:
            return f"{100.0 * params / total:.3f}% trainable parameters > max_percent {self.max_percent}%"
        return None


@dataclass(frozen=True, kw_only=True)
class Objectives:
    """What the search optimises: the task metric (maximised) and a cost (minimised).

    Attributes:
        metric: the evaluation metric to maximise; None for the task's main metric.
        cost: ``params`` (trainable parameters) or ``time`` (seconds per training step of the trial alone,
            measured on a probe batch before training).
    """

    metric: str | None = None
    cost: Cost = "params"

    def __post_init__(self) -> None:
        if self.cost not in COSTS:
            raise ValueError(f"objectives.cost: unknown cost {self.cost!r}; valid: {', '.join(COSTS)}")


@dataclass(frozen=True, kw_only=True)
class Budget:
    """How much the search trains.

    Attributes:
        steps: optimizer steps per trial.
        eval_every: intermediate evaluations every this many steps, reported to the pruner (None: only the end).
        trials: trials to train (completed or pruned; infeasible and repeated points do not count).
        parallel: trials trained at once on one base (:func:`unipeft.train.multi.train_jobs`).
        reduction_factor: the pruner's η (successive halving / Hyperband keep the top 1/η at each rung).
    """

    steps: int = 150
    eval_every: int | None = 50
    trials: int = 16
    parallel: int = 4
    reduction_factor: int = 3

    def __post_init__(self) -> None:
        for key in ("steps", "trials", "parallel"):
            _positive_int(f"budget.{key}", getattr(self, key))
        _positive_int("budget.eval_every", self.eval_every, nullable=True)
        _positive_int("budget.reduction_factor", self.reduction_factor)
        if self.reduction_factor < 2:
            raise ValueError(f"budget.reduction_factor must be >= 2, got {self.reduction_factor}")


@dataclass(frozen=True, kw_only=True)
class SearchConfig:
    """A whole search (see the module docstring).

    Attributes:
        train: TrainConfig keys shared by every trial (model, task, batch_size, max_length, eval_limit, ...).
        space: the search space.
        constraints: the budget a point must fit.
        objectives: the metric and the cost.
        budget: steps per trial, evaluations, trials, trials at once.
        sampler: Optuna's sampler: ``tpe`` (multi-objective TPE), ``nsga2`` (NSGA-II) or ``random``.
        pruner: ``successive_halving``, ``hyperband``, ``median`` (on the metric's intermediate values) or ``none``.
        seed: the sampler's seed (each trial trains with ``train.seed``).
        output_dir: the study (``study.db``), the trials' runs and the reports.
        study_name: the study's name in ``study.db``.
    """

    train: Mapping[str, Any] = field(default_factory=dict)
    space: SearchSpace
    constraints: Constraints = field(default_factory=Constraints)
    objectives: Objectives = field(default_factory=Objectives)
    budget: Budget = field(default_factory=Budget)
    sampler: Sampler = "tpe"
    pruner: Pruner = "successive_halving"
    seed: int = 0
    output_dir: str = "runs/search"
    study_name: str = "search"

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; valid: {', '.join(SAMPLERS)}")
        if self.pruner not in PRUNERS:
            raise ValueError(f"unknown pruner {self.pruner!r}; valid: {', '.join(PRUNERS)}")
        bad = sorted(set(self.train) & set(TRIAL_KEYS))
        if bad:
            raise ValueError(f"train: {', '.join(bad)} are set per trial by the search (the space and the budget); "
                             "remove them")
        self.trial_config()  # the shared keys must make a valid training config
        task = self.trial_config().task_spec()
        if task.kind not in ("classification", "regression"):
            raise ValueError(f"train.task: the search trains {task.name!r} ({task.kind}); only labelled tasks "
                             "(classification, regression) are searched here")
        if self.objectives.metric is not None and self.objectives.metric not in task.metrics:
            raise ValueError(f"objectives.metric: task {task.name!r} has no metric {self.objectives.metric!r}; "
                             f"its metrics: {', '.join(task.metrics)}")

    @property
    def metric(self) -> str:
        """The metric maximised."""
        return self.objectives.metric or self.trial_config().task_spec().main_metric

    def trial_config(self, **keys: Any) -> TrainConfig:
        """The TrainConfig of one trial: the shared keys, the budget's steps and ``keys`` (method, lr, ...)."""
        data = {"progress": False, **self.train, "max_steps": self.budget.steps,
                "eval_every": self.budget.eval_every, **keys}
        try:
            return train_config_from_dict(data)
        except ValueError as err:
            raise ValueError(f"train: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """The config's scalar sections as plain data (the space is kept as given, in ``search.json``)."""
        return {"train": dict(self.train), "constraints": _fields(self.constraints),
                "objectives": _fields(self.objectives), "budget": _fields(self.budget), "sampler": self.sampler,
                "pruner": self.pruner, "seed": self.seed, "output_dir": self.output_dir, "study_name": self.study_name}


def _fields(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def _section(cls: type, data: Any, where: str) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be a mapping, got {data!r}")
    check_keys(data, [f.name for f in fields(cls)], where)
    values = dict(data)
    if cls is Constraints and isinstance(values.get("max_percent"), str):
        values["max_percent"] = float(values["max_percent"])
    return cls(**values)


def search_config_from_dict(data: Mapping[str, Any]) -> SearchConfig:
    """A :class:`SearchConfig` from plain data (a parsed YAML file).

    Raises:
        ValueError: for unknown keys (listing the valid ones) or invalid values.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"a search config is a mapping, got {data!r}")
    valid = [f.name for f in fields(SearchConfig)]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ValueError(f"unknown search key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}")
    if "space" not in data:
        raise ValueError("a search config needs a space (forms, positions, ... ; see configs/search_sst2.yaml)")
    train = data.get("train") or {}
    if not isinstance(train, Mapping):
        raise ValueError(f"train must be a mapping of training keys, got {train!r}")
    return SearchConfig(
        train=dict(train), space=space_from_dict(data["space"]),
        constraints=_section(Constraints, data.get("constraints"), "constraints"),
        objectives=_section(Objectives, data.get("objectives"), "objectives"),
        budget=_section(Budget, data.get("budget"), "budget"),
        **{k: data[k] for k in ("sampler", "pruner", "seed", "output_dir", "study_name") if k in data})


def apply_search_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``key=value`` override (dotted keys for nested ones, values as YAML) to plain data, in place.

    Raises:
        ValueError: without ``=``, for an unknown top-level key, or a value that is not valid YAML.
    """
    set_override(data, override, valid=[f.name for f in fields(SearchConfig)], nested=None,
                 example="budget.trials=8 or train.task=cola")


def load_search_config(path: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()) -> SearchConfig:
    """Read a search config YAML and apply ``key=value`` overrides.

    Raises:
        FileNotFoundError: a missing file.
        ValueError: invalid YAML, keys or values.
    """
    data = read_mapping(path, what="search config")
    for override in overrides:
        apply_search_override(data, override)
    return search_config_from_dict(data)


__all__ = ["SearchConfig", "Constraints", "Objectives", "Budget", "SAMPLERS", "PRUNERS", "COSTS",
           "search_config_from_dict", "load_search_config", "apply_search_override"]
