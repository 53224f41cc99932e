"""Task specifications: which data, which fields, which metrics.

A :class:`TaskSpec` is plain data describing one fine-tuning task: where its rows come from, which
fields hold the text and the label, what kind of head it needs and how it is scored. The built-in
registry :data:`TASKS` holds five GLUE tasks with their official metrics, Alpaca instruction
tuning, and two generation tasks for a causal LM scored on its greedy outputs: E2E NLG (meaning
representation -> restaurant description) and Romanian->English translation (trained on MLQE-PE,
scored on WMT16 newstest2016); :func:`jsonl_task` describes any user JSONL file with a field mapping.
"""

from __future__ import annotations

import os
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from unipeft.data.datadir import load_split, read_jsonl, take
from unipeft.data.metrics import ALL_METRICS, HIGHER_IS_BETTER

TaskKind = Literal["classification", "regression", "causal_lm", "generation"]
TASK_KINDS: tuple[str, ...] = get_args(TaskKind)

# Metrics that make sense for each kind of task.
KIND_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "f1", "matthews"),
    "regression": ("pearson", "spearman"),
    "causal_lm": ("perplexity",),
    "generation": ("bleu", "rouge_l", "perplexity"),
}


@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """One fine-tuning task.

    Rows come either from a folder of the data directory (``folder`` with ``train_split`` and
    ``eval_split``; ``eval_folder`` when evaluation data lives elsewhere) or from two explicit files
    (``train_path`` and ``eval_path``). When a folder has no evaluation split (``eval_split=None``),
    the last ``eval_holdout`` training rows are held out as the evaluation set and removed from training.

    A ``generation`` task trains a causal LM on ``prompt_template`` (filled with the row's fields) followed
    by the ``response_field``, with the loss on the response only, and is scored by greedy generation
    against the references: evaluation rows with the same prompt are one segment whose references are
    all their responses (E2E's several descriptions of one meaning representation).

    Attributes:
        name: short task name, e.g. ``"sst2"``.
        kind: ``"classification"``, ``"regression"`` (one score), ``"causal_lm"`` (instruction tuning,
            Alpaca prompt) or ``"generation"`` (prompt template -> text, scored on generations).
        folder: dataset folder relative to the data directory, e.g. ``"glue/sst2"``.
        eval_folder: the folder of ``eval_split`` when it is not ``folder``.
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
        response_field: the target text field (causal_lm, generation).
        prompt_template: the prompt of a generation task, ``str.format`` fields naming row fields, e.g.
            ``"Translate Romanian to English:\\n{ro}\\nEnglish:\\n"``.
        max_new_tokens: the most tokens generated per prompt when scoring (generation, causal_lm samples).
        metrics: metric names reported for this task.
        main_metric: the metric used for model selection; one of ``metrics``.
    """

    name: str
    kind: TaskKind
    folder: str | None = None
    eval_folder: str | None = None
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
    prompt_template: str | None = None
    max_new_tokens: int = 64
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
        elif self.kind == "generation":
            self._check_generation()
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
        if self.eval_folder is not None and (self.folder is None or self.eval_split is None):
            raise ValueError(f"task {self.name!r}: eval_folder {self.eval_folder!r} needs a folder and an eval_split")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"task {self.name!r}: max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.prompt_template is not None and self.kind != "generation":
            raise ValueError(f"task {self.name!r}: prompt_template is for generation tasks only (kind {self.kind!r})")

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
            raise ValueError(f"task {self.name!r}: prompt/input/response fields are for causal_lm/generation tasks only")

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

    def _check_generation(self) -> None:
        if not self.prompt_template or not self.response_field:
            raise ValueError(
                f"task {self.name!r}: generation needs prompt_template and response_field, got "
                f"{self.prompt_template!r} and {self.response_field!r}"
            )
        try:
            fields = self.template_fields
        except ValueError as err:
            raise ValueError(f"task {self.name!r}: bad prompt_template {self.prompt_template!r}: {err}") from None
        if not fields:
            raise ValueError(f"task {self.name!r}: prompt_template {self.prompt_template!r} names no field, "
                             "e.g. {source}")
        if self.text_fields or self.label_field or self.label_names or self.prompt_field or self.input_field:
            raise ValueError(f"task {self.name!r}: generation uses prompt_template/response_field only, not "
                             "text_fields/label_field/prompt_field/input_field")
        if self.num_labels != 0:
            raise ValueError(f"task {self.name!r}: generation needs num_labels == 0, got {self.num_labels}")

    @property
    def template_fields(self) -> tuple[str, ...]:
        """The row fields that ``prompt_template`` names, in order (empty without a template).

        Raises:
            ValueError: a malformed template, or a field with a format spec or index (only ``{name}`` is allowed).
        """
        if not self.prompt_template:
            return ()
        names = []
        for _, name, spec, conversion in string.Formatter().parse(self.prompt_template):
            if name is None:
                continue
            if not name.isidentifier() or spec or conversion:
                raise ValueError(f"only plain {{field}} placeholders are allowed, got {{{name}}}")
            names.append(name)
        return tuple(dict.fromkeys(names))

    def format_prompt(self, row: dict[str, Any], index: int = 0) -> str:
        """The generation prompt of one row: ``prompt_template`` filled with the row's fields.

        Raises:
            ValueError: the row lacks a field the template names (the message lists its fields).
        """
        assert self.prompt_template is not None
        missing = [f for f in self.template_fields if f not in row]
        if missing:
            raise ValueError(f"row {index} has no field {missing[0]!r} (named in the prompt template of task "
                             f"{self.name!r}); its fields: {', '.join(row)}")
        return self.prompt_template.format_map({f: str(row[f]) for f in self.template_fields})

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
        limit: keep only the first ``limit`` rows (after any hold-out split), or ``None`` for all. For the
            evaluation rows of a generation task it counts distinct prompts: the rows of the first ``limit``
            prompts are kept, so every kept prompt keeps all its references.

    Raises:
        ValueError: ``which`` is not ``"train"`` or ``"eval"``, or ``limit`` is negative.
        FileNotFoundError: the data cannot be found (the message names what was tried).
    """
    if which not in ("train", "eval"):
        raise ValueError(f"which must be 'train' or 'eval', got {which!r}")
    if which == "eval" and spec.kind == "generation" and limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        rows = load_rows(spec, "eval", data_dir)
        keep = set(list(dict.fromkeys(spec.format_prompt(r, i) for i, r in enumerate(rows)))[:limit])
        return [r for i, r in enumerate(rows) if spec.format_prompt(r, i) in keep]
    if spec.folder is None:
        path = spec.train_path if which == "train" else spec.eval_path
        assert path is not None  # guaranteed by TaskSpec validation
        return take(read_jsonl(path), limit)
    if which == "eval" and spec.eval_split is not None:
        return take(load_split(spec.eval_folder or spec.folder, spec.eval_split, data_dir), limit)
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
        TaskSpec(  # Novikova et al. 2017; scored against every reference of a meaning representation
            name="e2e",
            kind="generation",
            folder="nlg/e2e",
            prompt_template="Describe the restaurant in one sentence.\nAttributes: {meaning_representation}\n"
                            "Description:\n",
            response_field="target",
            max_new_tokens=64,
            metrics=("bleu", "rouge_l", "perplexity"),
            main_metric="bleu",
        ),
        TaskSpec(  # trained on MLQE-PE ro-en (Wikipedia, post-edited), scored on WMT16 newstest2016
            name="ro_en",
            kind="generation",
            folder="mt/mlqe_pe_ro_en",
            eval_folder="mt/wmt16_en_ro",
            eval_split="test",
            prompt_template="Translate Romanian to English.\nRomanian: {ro}\nEnglish:\n",
            response_field="en",
            max_new_tokens=128,
            metrics=("bleu", "perplexity"),
            main_metric="bleu",
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
    prompt_template: str | None = None,
    max_new_tokens: int = 64,
    metrics: tuple[str, ...] | None = None,
    main_metric: str | None = None,
) -> TaskSpec:
    """Describe a task stored in two user JSONL files (``.jsonl`` or ``.jsonl.gz``).

    Args:
        train_path: the training file.
        eval_path: the evaluation file.
        kind: ``"classification"``, ``"regression"``, ``"causal_lm"`` or ``"generation"``.
        name: a name for logs and outputs.
        text_fields: one or two text fields (classification/regression).
        label_field: the label field (classification/regression).
        num_labels: classes; defaults to ``len(label_names)`` for classification, 1 for regression,
            0 for causal_lm.
        label_names: class names, if the labels are strings (or to name integer classes).
        prompt_field: the instruction field (causal_lm).
        input_field: optional extra context (causal_lm).
        response_field: the target text field (causal_lm, generation).
        prompt_template: the prompt of a generation task, e.g. ``"Summarize:\\n{document}\\nSummary:\\n"``.
        max_new_tokens: the most tokens generated per prompt when scoring.
        metrics: defaults by kind: accuracy/f1/matthews (f1 only for two classes), pearson/spearman,
            perplexity, or bleu/rouge_l/perplexity (generation).
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
        prompt_template=prompt_template,
        max_new_tokens=max_new_tokens,
        metrics=tuple(metrics),
        main_metric=main_metric if main_metric is not None else (metrics[0] if metrics else ""),
    )
