"""Task specifications: which data, which fields, which metrics.

A :class:`TaskSpec` is plain data describing one fine-tuning task: where its rows come from, which
fields hold the text and the label, what kind of head it needs and how it is scored. The built-in
registry :data:`TASKS` holds five GLUE tasks with their official metrics and Alpaca instruction
tuning; :func:`jsonl_task` describes any user JSONL file with a field mapping.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from unipeft.data.datadir import load_split, read_jsonl, take
from unipeft.data.metrics import ALL_METRICS, HIGHER_IS_BETTER

TaskKind = Literal["classification", "regression", "causal_lm"]
TASK_KINDS: tuple[str, ...] = get_args(TaskKind)

# Metrics that make sense for each kind of task.
KIND_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "f1", "matthews"),
    "regression": ("pearson", "spearman"),
    "causal_lm": ("perplexity",),
}


@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """One fine-tuning task.

    Rows come either from a folder of the data directory (``folder`` with ``train_split`` and
    ``eval_split``) or from two explicit files (``train_path`` and ``eval_path``). When a folder has
    no evaluation split (``eval_split=None``), the last ``eval_holdout`` training rows are held out
    as the evaluation set and removed from training.

    Attributes:
        name: short task name, e.g. ``"sst2"``.
        kind: ``"classification"``, ``"regression"`` (one score) or ``"causal_lm"`` (instruction tuning).
        folder: dataset folder relative to the data directory, e.g. ``"glue/sst2"``.
        train_path: an explicit training file (``.jsonl`` or ``.jsonl.gz``), instead of ``folder``.
        eval_path: an explicit evaluation file, instead of ``folder``.
        train_split: the training split name inside ``folder``.
        eval_split: the evaluation split name inside ``folder``, or ``None`` to hold out training rows.
        eval_holdout: number of final training rows used for evaluation when ``eval_split`` is ``None``.
        text_fields: one or two text fields (two are encoded as a sentence pair); empty for causal_lm.
        label_field: the label field (classification/regression).
        num_labels: classes for classification (>= 2), 1 for regression, 0 for causal_lm.
        label_names: optional class names; string labels in the data are mapped through them.
        prompt_field: the instruction field (causal_lm).
        input_field: an optional extra-context field (causal_lm), e.g. Alpaca's ``input``.
        response_field: the target text field (causal_lm).
        metrics: metric names reported for this task.
        main_metric: the metric used for model selection; one of ``metrics``.
    """

    name: str
    kind: TaskKind
    folder: str | None = None
    train_path: str | None = None
    eval_path: str | None = None
    train_split: str = "train"
    eval_split: str | None = "validation"
    eval_holdout: int = 0
    text_fields: tuple[str, ...] = ()
    label_field: str | None = None
    num_labels: int = 0
    label_names: tuple[str, ...] = ()
    prompt_field: str | None = None
    input_field: str | None = None
    response_field: str | None = None
    metrics: tuple[str, ...] = ()
    main_metric: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("task name must be a non-empty string")
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task {self.name!r}: unknown kind {self.kind!r}; valid kinds: {', '.join(TASK_KINDS)}")
        self._check_source()
        if self.kind == "causal_lm":
            self._check_causal_lm()
        else:
            self._check_labelled()
        allowed = KIND_METRICS[self.kind]
        if not self.metrics:
            raise ValueError(f"task {self.name!r}: metrics must not be empty; valid for {self.kind}: {', '.join(allowed)}")
        for metric in self.metrics:
            if metric not in allowed:
                known = "" if metric in ALL_METRICS else " (unknown metric)"
                raise ValueError(
                    f"task {self.name!r}: metric {metric!r}{known} does not fit kind {self.kind!r}; "
                    f"valid: {', '.join(allowed)}"
                )
        if self.main_metric not in self.metrics:
            raise ValueError(
                f"task {self.name!r}: main_metric {self.main_metric!r} is not one of its metrics: "
                f"{', '.join(self.metrics)}"
            )

    def _check_source(self) -> None:
        has_paths = self.train_path is not None or self.eval_path is not None
        if (self.folder is None) == (not has_paths):
            raise ValueError(
                f"task {self.name!r}: give either folder (got {self.folder!r}) or train_path/eval_path "
                f"(got {self.train_path!r}, {self.eval_path!r}), not both or neither"
            )
        if has_paths and (self.train_path is None or self.eval_path is None):
            raise ValueError(
                f"task {self.name!r}: train_path and eval_path must both be given, got "
                f"{self.train_path!r} and {self.eval_path!r}"
            )
        if self.eval_holdout < 0:
            raise ValueError(f"task {self.name!r}: eval_holdout must be >= 0, got {self.eval_holdout}")
        if self.folder is not None and self.eval_split is None and self.eval_holdout == 0:
            raise ValueError(f"task {self.name!r}: with eval_split=None, eval_holdout must be > 0")

    def _check_labelled(self) -> None:
        if len(self.text_fields) not in (1, 2):
            raise ValueError(
                f"task {self.name!r}: {self.kind} needs one or two text_fields, got {self.text_fields!r}"
            )
        if not self.label_field:
            raise ValueError(f"task {self.name!r}: {self.kind} needs a label_field")
        if self.kind == "classification" and self.num_labels < 2:
            raise ValueError(f"task {self.name!r}: classification needs num_labels >= 2, got {self.num_labels}")
        if self.kind == "regression" and self.num_labels != 1:
            raise ValueError(f"task {self.name!r}: regression needs num_labels == 1, got {self.num_labels}")
        if self.label_names and len(self.label_names) != self.num_labels:
            raise ValueError(
                f"task {self.name!r}: {len(self.label_names)} label_names {self.label_names!r} "
                f"for num_labels={self.num_labels}"
            )
        if any((self.prompt_field, self.input_field, self.response_field)):
            raise ValueError(f"task {self.name!r}: prompt/input/response fields are for causal_lm tasks only")

    def _check_causal_lm(self) -> None:
        if not self.prompt_field or not self.response_field:
            raise ValueError(
                f"task {self.name!r}: causal_lm needs prompt_field and response_field, got "
                f"{self.prompt_field!r} and {self.response_field!r}"
            )
        if self.text_fields or self.label_field or self.label_names:
            raise ValueError(
                f"task {self.name!r}: causal_lm uses prompt_field/response_field, not text_fields/label_field"
            )
        if self.num_labels != 0:
            raise ValueError(f"task {self.name!r}: causal_lm needs num_labels == 0, got {self.num_labels}")

    @property
    def is_pair(self) -> bool:
        """Whether examples are sentence pairs (two text fields)."""
        return len(self.text_fields) == 2

    @property
    def greater_is_better(self) -> bool:
        """Whether a larger ``main_metric`` is better (False for perplexity)."""
        return HIGHER_IS_BETTER[self.main_metric]


def load_rows(
    spec: TaskSpec,
    which: Literal["train", "eval"],
    data_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Read the training or evaluation rows of a task.

    Args:
        spec: the task.
        which: ``"train"`` or ``"eval"``.
        data_dir: the data directory for folder-based tasks (see :func:`resolve_data_dir`).
        limit: keep only the first ``limit`` rows (after any hold-out split), or ``None`` for all.

    Raises:
        ValueError: ``which`` is not ``"train"`` or ``"eval"``, or ``limit`` is negative.
        FileNotFoundError: the data cannot be found (the message names what was tried).
    """
    if which not in ("train", "eval"):
        raise ValueError(f"which must be 'train' or 'eval', got {which!r}")
    if spec.folder is None:
        path = spec.train_path if which == "train" else spec.eval_path
        assert path is not None  # guaranteed by TaskSpec validation
        return take(read_jsonl(path), limit)
    if which == "eval" and spec.eval_split is not None:
        return take(load_split(spec.folder, spec.eval_split, data_dir), limit)
    rows = load_split(spec.folder, spec.train_split, data_dir)
    if spec.eval_split is None:
        if spec.eval_holdout >= len(rows):
            raise ValueError(
                f"task {spec.name!r}: eval_holdout={spec.eval_holdout} leaves no training rows out of {len(rows)}"
            )
        cut = len(rows) - spec.eval_holdout
        rows = rows[:cut] if which == "train" else rows[cut:]
    return take(rows, limit)


def _glue(name: str, *, text_fields: tuple[str, ...], metrics: tuple[str, ...], main_metric: str,
          label_names: tuple[str, ...] = ()) -> TaskSpec:
    """A GLUE task stored under ``glue/<name>`` with train/validation splits."""
    regression = "pearson" in metrics
    return TaskSpec(
        name=name,
        kind="regression" if regression else "classification",
        folder=f"glue/{name}",
        text_fields=text_fields,
        label_field="label",
        num_labels=1 if regression else 2,
        label_names=label_names,
        metrics=metrics,
        main_metric=main_metric,
    )


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _glue("sst2", text_fields=("sentence",), metrics=("accuracy",), main_metric="accuracy",
              label_names=("negative", "positive")),
        _glue("cola", text_fields=("sentence",), metrics=("matthews",), main_metric="matthews",
              label_names=("unacceptable", "acceptable")),
        _glue("mrpc", text_fields=("sentence1", "sentence2"), metrics=("f1", "accuracy"), main_metric="f1",
              label_names=("not_equivalent", "equivalent")),
        _glue("rte", text_fields=("sentence1", "sentence2"), metrics=("accuracy",), main_metric="accuracy",
              label_names=("entailment", "not_entailment")),
        _glue("stsb", text_fields=("sentence1", "sentence2"), metrics=("pearson", "spearman"),
              main_metric="pearson"),
        TaskSpec(
            name="alpaca",
            kind="causal_lm",
            folder="instruct/alpaca_5k",
            eval_split=None,
            eval_holdout=200,  # the 5k sample has no validation split; its last 200 rows serve as one
            prompt_field="instruction",
            input_field="input",
            response_field="output",
            metrics=("perplexity",),
            main_metric="perplexity",
        ),
    )
}


def get_task(name: str) -> TaskSpec:
    """The built-in task called ``name``.

    Raises:
        ValueError: unknown name (the message lists the valid names).
    """
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}") from None


def jsonl_task(
    *,
    train_path: str | os.PathLike[str],
    eval_path: str | os.PathLike[str],
    kind: TaskKind,
    name: str = "custom",
    text_fields: tuple[str, ...] = (),
    label_field: str | None = None,
    num_labels: int | None = None,
    label_names: tuple[str, ...] = (),
    prompt_field: str | None = None,
    input_field: str | None = None,
    response_field: str | None = None,
    metrics: tuple[str, ...] | None = None,
    main_metric: str | None = None,
) -> TaskSpec:
    """Describe a task stored in two user JSONL files (``.jsonl`` or ``.jsonl.gz``).

    Args:
        train_path: the training file.
        eval_path: the evaluation file.
        kind: ``"classification"``, ``"regression"`` or ``"causal_lm"``.
        name: a name for logs and outputs.
        text_fields: one or two text fields (classification/regression).
        label_field: the label field (classification/regression).
        num_labels: classes; defaults to ``len(label_names)`` for classification, 1 for regression,
            0 for causal_lm.
        label_names: class names, if the labels are strings (or to name integer classes).
        prompt_field: the instruction field (causal_lm).
        input_field: optional extra context (causal_lm).
        response_field: the target text field (causal_lm).
        metrics: defaults by kind: accuracy/f1/matthews (f1 only for two classes), pearson/spearman,
            or perplexity.
        main_metric: defaults to the first metric.

    Raises:
        FileNotFoundError: a file does not exist (the message names it).
        ValueError: an inconsistent field mapping (see :class:`TaskSpec`).
    """
    for path in (train_path, eval_path):
        if not Path(path).is_file():
            raise FileNotFoundError(f"JSONL file {str(path)!r} for task {name!r} does not exist")
    if num_labels is None:
        num_labels = {"classification": len(label_names), "regression": 1}.get(kind, 0)
    if metrics is None:
        if kind == "classification":
            metrics = ("accuracy", "f1", "matthews") if num_labels == 2 else ("accuracy", "matthews")
        else:
            metrics = KIND_METRICS.get(kind, ())
    return TaskSpec(
        name=name,
        kind=kind,
        train_path=str(train_path),
        eval_path=str(eval_path),
        text_fields=tuple(text_fields),
        label_field=label_field,
        num_labels=num_labels,
        label_names=tuple(label_names),
        prompt_field=prompt_field,
        input_field=input_field,
        response_field=response_field,
        metrics=tuple(metrics),
        main_metric=main_metric if main_metric is not None else (metrics[0] if metrics else ""),
    )
