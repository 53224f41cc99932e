"""A multi-job training config: several adapter jobs trained at once on one copy of the base (``jobs:``).

The YAML is a training config (:class:`unipeft.train.TrainConfig`) whose top-level keys are the defaults of every
job, plus a ``jobs:`` list (and optionally ``jobs_per_pass``: how many jobs' rows share one forward and backward);
each job has a ``name`` (its adapter's name and its folder under ``output_dir``) and any
training keys of its own (method, method_options, task or jsonl, lr, scheduler, batch_size, max_steps, ...)::

    model: smollm2-135m
    output_dir: runs/many
    max_steps: 100
    jobs:
      - {name: alpaca_r8, task: alpaca, method: lora}
      - {name: alpaca_ia3, task: alpaca, method: ia3, lr: 3.0e-3}
      - {name: e2e, task: e2e, method: lora, method_options: {r: 16}, batch_size: 8, max_steps: 60}

Every job is an ordinary :class:`TrainConfig` (its ``output_dir`` is ``output_dir/name``), so a job can also be
trained alone with ``unipeft train`` and the two compared. The keys that describe the one base and the one forward
must agree over the jobs (:data:`SHARED_KEYS`); the step options that act on the whole batch are not available
per job (:data:`SINGLE_JOB_KEYS`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unipeft.train.config import TrainConfig, apply_override, train_config_from_dict

#: Keys every job must share: they describe the one base model, where it runs, and the process.
SHARED_KEYS = ("model", "device", "precision", "quantization", "double_quant", "gradient_checkpointing", "threads",
               "progress", "data_dir", "resume")
#: Keys whose non-default values only a single-job run supports, with the value multi-job training needs.
SINGLE_JOB_KEYS: dict[str, Any] = {"grad_accum_steps": 1, "packing": False, "compile": False}


@dataclass(frozen=True)
class Job:
    """One adapter job: its name (the adapter's) and its training config."""

    name: str
    config: TrainConfig


@dataclass(frozen=True)
class MultiTrainConfig:
    """Several jobs trained together on one base (see the module docstring).

    Attributes:
        jobs: the jobs, in order (the first one's shared keys describe the base).
        output_dir: the run's folder; job ``name`` writes to ``output_dir/name``.
        jobs_per_pass: jobs whose rows share one forward and backward (None: every unfinished job, one pass per
            step); fewer hold less activation memory at once (:mod:`unipeft.train.multi`).
    """

    jobs: tuple[Job, ...]
    output_dir: str
    jobs_per_pass: int | None = None

    def __post_init__(self) -> None:
        if not self.jobs:
            raise ValueError("jobs: give at least one job (a list of mappings with a name and training keys)")
        names = [j.name for j in self.jobs]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"job names must be unique; repeated: {', '.join(repeated)}")
        if self.jobs_per_pass is not None and (isinstance(self.jobs_per_pass, bool)
                                               or not isinstance(self.jobs_per_pass, int) or self.jobs_per_pass < 1):
            raise ValueError(f"jobs_per_pass must be an integer >= 1 or null (every job in one pass), got "
                             f"{self.jobs_per_pass!r}")
        first = self.jobs[0]
        for job in self.jobs[1:]:
            for key in SHARED_KEYS:
                if getattr(job.config, key) != getattr(first.config, key):
                    raise ValueError(f"job {job.name!r}: {key}={getattr(job.config, key)!r} differs from job "
                                     f"{first.name!r}'s {getattr(first.config, key)!r}; the jobs share one base, so "
                                     f"{', '.join(SHARED_KEYS)} must agree")
        for job in self.jobs:
            for key, needed in SINGLE_JOB_KEYS.items():
                if getattr(job.config, key) != needed:
                    raise ValueError(f"job {job.name!r}: {key}={getattr(job.config, key)!r} is not available in "
                                     f"multi-job training (use {key}={needed!r}, or train the job alone)")

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON: the output folder and every job's full config."""
        return {"output_dir": self.output_dir, "jobs_per_pass": self.jobs_per_pass,
                "jobs": [{"name": j.name, **j.config.to_dict()} for j in self.jobs]}


def is_multi(data: Mapping[str, Any]) -> bool:
    """Whether parsed config data describes a multi-job run (it has ``jobs``)."""
    return "jobs" in data


def multi_config_from_dict(data: Mapping[str, Any]) -> MultiTrainConfig:
    """A :class:`MultiTrainConfig` from plain data: the top-level keys as every job's defaults, ``jobs`` the jobs.

    Raises:
        ValueError: for a missing or malformed ``jobs`` list, a job without a valid ``name``, an invalid key of a
            job (the message names the job), or jobs that disagree on a shared key.
    """
    defaults = {k: v for k, v in data.items() if k != "jobs"}
    jobs = data.get("jobs")
    if not isinstance(jobs, list) or not all(isinstance(j, Mapping) for j in jobs):
        raise ValueError(f"jobs must be a list of mappings (each a name and training keys), got {jobs!r}")
    output_dir = str(defaults.pop("output_dir", "runs/multi"))
    jobs_per_pass = defaults.pop("jobs_per_pass", None)
    built = []
    for index, raw in enumerate(jobs):
        entry = dict(raw)
        name = entry.pop("name", None)
        if not isinstance(name, str) or not name or not all(c.isalnum() or c in "_-" for c in name):
            raise ValueError(f"jobs[{index}]: name must be letters, digits, '_' and '-', got {name!r}")
        if "output_dir" in entry:
            raise ValueError(f"job {name!r}: output_dir is set for the whole run (job {name!r} writes to "
                             f"{output_dir}/{name})")
        merged = {**defaults, **entry, "output_dir": str(Path(output_dir) / name)}
        if isinstance(defaults.get("method_options"), Mapping) and isinstance(entry.get("method_options"), Mapping):
            merged["method_options"] = {**defaults["method_options"], **entry["method_options"]}
        try:
            built.append(Job(name=name, config=train_config_from_dict(merged)))
        except ValueError as err:
            raise ValueError(f"job {name!r}: {err}") from None
    return MultiTrainConfig(jobs=tuple(built), output_dir=output_dir, jobs_per_pass=jobs_per_pass)


def load_multi_config(data: Mapping[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> MultiTrainConfig:
    """:func:`multi_config_from_dict` after applying ``key=value`` overrides to the defaults and to every job (an
    override wins over a job's own value: ``max_steps=2`` makes a quick run of every job).

    Raises:
        ValueError: as :func:`multi_config_from_dict`, or for a bad override.
    """
    top = dict(data)
    jobs = top.get("jobs")
    if isinstance(jobs, list):
        top["jobs"] = [dict(j) if isinstance(j, Mapping) else j for j in jobs]
    for override in overrides:
        apply_override(top, override)
        for job in top["jobs"] if isinstance(jobs, list) else ():
            if isinstance(job, dict) and override.partition("=")[0].strip().split(".")[0] in job:
                apply_override(job, override)
    return multi_config_from_dict(top)


__all__ = ["Job", "MultiTrainConfig", "SHARED_KEYS", "SINGLE_JOB_KEYS", "is_multi", "multi_config_from_dict",
           "load_multi_config", "read_config_data"]
