"""The search loop: an Optuna study over the design space, several trials trained at once on one base.

Each wave asks the study for ``budget.parallel`` trials (``study.ask()``), turns each into a recipe
(:mod:`unipeft.search.sample`), checks it on the real base (:mod:`unipeft.search.probe`: an infeasible point, over
the constraint or not attachable, is told PRUNED with the reason in its user attributes, without training; a point
trained before gets that trial's outcome, its values or pruned: :func:`point_key`), writes the recipes as YAML and
trains the wave's trials together with :func:`unipeft.train.multi.train_jobs` (one forward and backward through the
frozen base per step for all of them, each row through its own trial's adapter). Intermediate evaluations go to the
pruner (:mod:`unipeft.search.prune`), which can stop a trial in the middle of the wave; the others go on. The
finished trials are told their objective values, ``(metric, params)`` or ``(metric, seconds per step)``: the study is
multi-objective (TPE's or NSGA-II's multi-objective samplers), and its Pareto front is the report
(:mod:`unipeft.search.report`).

The study lives in ``output_dir/study.db`` (SQLite). Rerunning the same command resumes: the study is loaded, trials
left running by an interrupted search are marked failed and their points queued again, and the search goes on until
``budget.trials`` trials are trained.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from unipeft.search.config import SearchConfig
from unipeft.search.probe import Probe
from unipeft.search.prune import ShadowPruner, make_pruner
from unipeft.search.sample import Candidate, suggest, summarize
from unipeft.train.multi import train_jobs
from unipeft.train.multi_config import Job, MultiTrainConfig

log = logging.getLogger(__name__)

#: Consecutive untrainable points (infeasible or repeated) after which the search stops: the space is exhausted or
#: the constraint excludes nearly all of it.
MAX_UNTRAINABLE = 200


@dataclass
class SearchOutcome:
    """What one call of :func:`run_search` did (the study holds the rest)."""

    study: optuna.Study
    wall_time_s: float = 0.0
    steps: int = 0
    waves: int = 0
    stopped_early: str | None = None
    trained_now: list[int] = field(default_factory=list)


def trial_name(number: int) -> str:
    """The job and file name of trial ``number``."""
    return f"t{number:03d}"


def make_sampler(config: SearchConfig, offset: int = 0) -> optuna.samplers.BaseSampler:
    """The config's sampler, seeded with ``seed + offset`` (a resumed search offsets by the trials it has, so that
    it does not draw the first session's random points again)."""
    seed = config.seed + offset
    if config.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, config.budget.parallel))
    if config.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(4, config.budget.parallel))


def open_study(config: SearchConfig) -> optuna.Study:
    """The search's study in ``output_dir/study.db``, created or loaded."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(storage=f"sqlite:///{out / 'study.db'}", study_name=config.study_name,
                                directions=["maximize", "minimize"], sampler=make_sampler(config), load_if_exists=True)
    if study.trials:
        study.sampler = make_sampler(config, offset=len(study.trials))
    return study


def trained_count(study: optuna.Study) -> int:
    """Trials trained so far: completed or pruned while training (not infeasible or repeated points)."""
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.user_attrs.get("status") in ("trained", "pruned"))


def _requeue_interrupted(study: optuna.Study) -> None:
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.enqueue_trial(stale.params, skip_if_exists=False)
        study.tell(stale.number, state=TrialState.FAIL)
        log.info("trial %d was interrupted; its point is queued again", stale.number)


def point_key(candidate: Candidate) -> str:
    """What makes two sampled points the same training run: the recipe's deltas (as summarized: every form field
    off its default, positions, layers, insertion, composition) and the learning rate. A shipped recipe and the
    same point sampled form by form share a key."""
    return f"{summarize(candidate.recipe)} lr={candidate.lr:g}"


def _done_points(study: optuna.Study) -> dict[str, optuna.trial.FrozenTrial]:
    """The points trained before (completed or pruned while training), by :func:`point_key`."""
    return {t.user_attrs["point_key"]: t for t in study.get_trials(deepcopy=False)
            if t.user_attrs.get("status") in ("trained", "pruned") and "point_key" in t.user_attrs}


def run_search(config: SearchConfig) -> SearchOutcome:
    """Run (or resume) the search of ``config``; see the module docstring.

    Returns:
        What this call did; ``outcome.study`` is the whole study.

    Raises:
        ValueError: a bad config (found before anything trains) or a training error in a wave.
    """
    began = time.perf_counter()
    out = Path(config.output_dir)
    study = open_study(config)
    storage = f"sqlite:///{out / 'study.db'}"
    shadow = ShadowPruner(storage, config.study_name, make_pruner(config.pruner, config.budget))
    _requeue_interrupted(study)
    probe = Probe(config.trial_config())
    outcome = SearchOutcome(study=study)
    (out / "candidates").mkdir(exist_ok=True)
    untrainable = 0
    while trained_count(study) < config.budget.trials:
        wave: list[tuple[optuna.Trial, Candidate, dict[str, Any]]] = []
        want = min(config.budget.parallel, config.budget.trials - trained_count(study))
        done = _done_points(study)
        while len(wave) < want and untrainable < MAX_UNTRAINABLE:
            trial = study.ask()
            name = trial_name(trial.number)
            attrs = _check(trial, config, probe, name, done, {w[2]["key"]: w[0].number for w in wave})
            if attrs is None:
                untrainable += 1
                continue
            untrainable = 0
            wave.append((trial, attrs.pop("candidate"), attrs))
        if not wave:
            outcome.stopped_early = (f"{MAX_UNTRAINABLE} points in a row were infeasible or repeated: the space is "
                                     "exhausted or the constraint excludes nearly all of it")
            log.warning("search stopped: %s", outcome.stopped_early)
            break
        outcome.steps += _train_wave(config, study, shadow, wave)
        outcome.waves += 1
        outcome.trained_now += [t.number for t, _, _ in wave]
    outcome.wall_time_s = time.perf_counter() - began
    return outcome


def _check(trial: optuna.Trial, config: SearchConfig, probe: Probe, name: str,
           done: dict[str, optuna.trial.FrozenTrial], in_wave: dict[str, int]) -> dict[str, Any] | None:
    """Sample and check one trial; None if it is not trained (told here), else its candidate and measurements."""
    try:
        candidate = suggest(trial, config.space, name=name)
        measured = probe.measure(candidate.recipe, time_steps=3 if config.objectives.cost == "time" else 0)
    except (ValueError, NotImplementedError) as err:
        trial.set_user_attr("status", "infeasible")
        trial.set_user_attr("reason", str(err).splitlines()[0])
        trial.study.tell(trial, state=TrialState.PRUNED)
        return None
    trial.set_user_attr("summary", candidate.summary)
    trial.set_user_attr("lr", candidate.lr)
    trial.set_user_attr("params", measured.params)
    trial.set_user_attr("percent", measured.percent)
    if measured.step_s is not None:
        trial.set_user_attr("step_s", measured.step_s)
    reason = config.constraints.violation(measured.params, measured.total)
    key = point_key(candidate)
    trial.set_user_attr("point_key", key)
    if reason is not None:
        trial.set_user_attr("status", "infeasible")
        trial.set_user_attr("reason", reason)
        trial.study.tell(trial, state=TrialState.PRUNED)
        return None
    if key in done:  # a point trained before: its outcome again (values, or pruned), no training
        trial.set_user_attr("status", "repeated")
        trial.set_user_attr("repeat_of", done[key].number)
        if done[key].state == TrialState.COMPLETE:
            trial.study.tell(trial, done[key].values)
        else:
            trial.study.tell(trial, state=TrialState.PRUNED)
        return None
    if key in in_wave:  # the same point as a trial of this wave: not trained twice
        trial.set_user_attr("status", "repeated")
        trial.set_user_attr("repeat_of", in_wave[key])
        trial.study.tell(trial, state=TrialState.PRUNED)
        return None
    path = Path(config.output_dir) / "candidates" / f"{name}.yaml"
    path.write_text(candidate.recipe.to_yaml(), encoding="utf-8")
    trial.set_user_attr("recipe", str(path))
    return {"candidate": candidate, "measured": measured, "path": path, "key": key}


def _train_wave(config: SearchConfig, study: optuna.Study, shadow: ShadowPruner,
                wave: list[tuple[optuna.Trial, Candidate, dict[str, Any]]]) -> int:
    """Train one wave's trials together; tell the study their values. Returns the optimizer steps taken."""
    out = Path(config.output_dir) / "trials"
    jobs = []
    for trial, candidate, attrs in wave:
        tc = config.trial_config(method=str(attrs["path"]), lr=candidate.lr,
                                 output_dir=str(out / trial_name(trial.number)))
        jobs.append(Job(name=trial_name(trial.number), config=tc))
    by_name = {trial_name(t.number): (t, shadow.start(t.number)) for t, _, _ in wave}
    metric = config.metric
    steps: dict[str, int] = {}

    def on_step(job: str, step: int, loss: float) -> None:
        steps[job] = step

    def on_eval(job: str, step: int, metrics: dict[str, float]) -> bool:
        trial, shadow_trial = by_name[job]
        value = float(metrics[metric])
        trial.set_user_attr(f"eval_{step}", value)
        return shadow.report(shadow_trial, value, step)

    log.info("training %d trials at once: %s", len(jobs), ", ".join(by_name))
    results = train_jobs(MultiTrainConfig(jobs=tuple(jobs), output_dir=str(out)), on_step=on_step, on_eval=on_eval)
    for trial, candidate, attrs in wave:
        name = trial_name(trial.number)
        trial.set_user_attr("steps", steps.get(name, 0))
        _, shadow_trial = by_name[name]
        result = results.get(name)
        if result is None:
            trial.set_user_attr("status", "pruned")
            shadow.finish(shadow_trial, None)
            study.tell(trial, state=TrialState.PRUNED)
            continue
        value = float(result.metrics[metric])
        cost = attrs["measured"].step_s if config.objectives.cost == "time" else result.trainable_params
        trial.set_user_attr("status", "trained")
        trial.set_user_attr("metrics", dict(result.metrics))
        trial.set_user_attr("train_time_s", result.train_time_s)
        trial.set_user_attr("adapter", str(result.adapter_dir))
        shadow.finish(shadow_trial, value)
        study.tell(trial, [value, float(cost)])
    return sum(steps.values())


__all__ = ["run_search", "SearchOutcome", "open_study", "point_key", "trained_count", "trial_name"]
