"""The configuration of one training run, read from YAML with ``key=value`` overrides.

Example (``configs/sst2_lora.yaml``)::

    model: minilm
    task: sst2
    method: lora
    method_options: {r: 8}
    max_steps: 600
    lr: 2.0e-3

Overrides on the command line use the same keys, with dots for nested ones:
``unipeft train configs/sst2_lora.yaml max_steps=100 method_options.r=16``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

import yaml

from unipeft.core.recipe import builtin_recipe_names
from unipeft.util.files import read_mapping
from unipeft.data import TASKS, TaskSpec, get_task, jsonl_task
from unipeft.data.tasks import TASK_KINDS
from unipeft.models.load import QUANTIZATIONS
from unipeft.train.distributed import check_strategy
from unipeft.train.step import check_compile
from unipeft.train.optim import check_optimizer
from unipeft.train.precision import Precision, check_device, check_precision

Scheduler = Literal["linear", "cosine", "constant"]
SCHEDULERS: tuple[str, ...] = get_args(Scheduler)


@dataclass(frozen=True, kw_only=True)
class JsonlTaskConfig:
    """A user task stored in two JSONL files (``.jsonl`` or ``.jsonl.gz``), with its field mapping.

    Paths are relative to the working directory. See :func:`unipeft.data.jsonl_task` for the defaults.

    Attributes:
        train_path: the training file.
        eval_path: the evaluation file.
        kind: ``classification``, ``regression``, ``causal_lm`` or ``generation``.
        text_fields: one or two text fields (classification/regression).
        label_field: the label field (classification/regression).
        label_names: class names, if labels are strings (their order gives the class ids).
        num_labels: classes; defaults to ``len(label_names)`` (classification).
        prompt_field: the instruction field (causal_lm).
        input_field: an optional context field (causal_lm).
        response_field: the target text field (causal_lm, generation).
        prompt_template: the prompt of a generation task, with ``{field}`` placeholders (generation).
        max_new_tokens: the most tokens generated per prompt when scoring (generation).
        metrics: the metrics to report; defaults by kind.
        main_metric: the metric shown during training; defaults to the first.
    """

    train_path: str
    eval_path: str
    kind: Literal["classification", "regression", "causal_lm", "generation"]
    text_fields: tuple[str, ...] = ()
    label_field: str | None = None
    label_names: tuple[str, ...] = ()
    num_labels: int | None = None
    prompt_field: str | None = None
    input_field: str | None = None
    response_field: str | None = None
    prompt_template: str | None = None
    max_new_tokens: int = 64
    metrics: tuple[str, ...] | None = None
    main_metric: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"jsonl.kind: unknown kind {self.kind!r}; valid: {', '.join(TASK_KINDS)}")

    def spec(self, name: str) -> TaskSpec:
        """The :class:`~unipeft.data.TaskSpec` of this task, called ``name``.

        Raises:
            FileNotFoundError: a file does not exist.
            ValueError: an inconsistent field mapping.
        """
        return jsonl_task(name=name, **{f.name: getattr(self, f.name) for f in fields(self)})


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything that defines a training run.

    Attributes:
        model: a short model name (``minilm``, ``smollm2-135m``) or a local Hugging Face folder / ``.gguf`` file.
        task: a built-in task (sst2, cola, mrpc, rte, stsb, alpaca, e2e, ro_en), or the name of the user task in
            ``jsonl``.
        jsonl: a user JSONL task; when given, ``task`` is just its name.
        method: a built-in recipe name (``unipeft methods``) or a recipe YAML/JSON file.
        method_options: recipe hyperparameter overrides, e.g. ``{r: 16}`` or ``{positions: [attn.q]}``.
        max_steps: optimizer steps; None to train for ``epochs`` epochs.
        epochs: epochs over the training set, used when ``max_steps`` is None.
        batch_size: training examples per step.
        eval_batch_size: examples per evaluation batch.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW's decoupled weight decay (not applied to biases and norm weights).
        max_grad_norm: clip the gradient's global norm to this (None: no clipping).
        warmup_ratio: fraction of the steps with a linear warm-up from 0 to ``lr``.
        scheduler: the decay after warm-up: ``linear`` to 0, ``cosine`` to 0, or ``constant``.
        max_length: tokens per example (longer ones are truncated); batches are padded only to their longest row.
        group_by_length: build each batch from examples of similar length (less padding, as HF's
            ``group_by_length``); batches are still drawn in a seeded random order.
        seed: seeds the head's init, the adapter's init, dropout and the data order.
        eval_every: evaluate every this many steps (None: only at the end).
        save_every: write a resumable checkpoint every this many steps (None: never).
        output_dir: where the adapter, checkpoint, metrics and curves go.
        resume: continue from ``output_dir/checkpoint`` when it exists (otherwise start over).
        data_dir: the data directory (default ``$UNIPEFT_DATA_DIR`` or ``../shared/data``).
        train_limit: use only the first N training rows.
        eval_limit: use only the first N evaluation rows.
        threads: CPU threads for torch (None: all cores).
        progress: show a progress bar on stderr.
        device: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast, the frozen base stored in that dtype, the trainable
            tensors in float32; fp16 with a gradient scaler), or ``auto``: decided by the device's capability
            (:mod:`unipeft.train.precision`).
        grad_accum_steps: split each step's ``batch_size`` examples into this many micro-batches whose gradients
            add up (the same update as one batch, to rounding, in less activation memory).
        gradient_checkpointing: recompute the base's activations in the backward instead of storing them.
        quantization: ``nf4`` / ``fp4`` (4-bit QLoRA base) or ``int8`` to load the base's linear layers quantized
            with bitsandbytes (compute in the run's precision); None: no quantization.
        double_quant: with a 4-bit base, quantize the quantization constants too (QLoRA's double quantization).
        optimizer: ``adamw``, ``adamw_8bit`` (bitsandbytes' block-wise 8-bit AdamW), or ``paged_adamw_8bit`` /
            ``paged_adamw`` (CUDA only).
        packing: causal-LM tasks: pack each step's examples several to a row (per-example positions, no example
            sees another) instead of padding each to the longest.
        loss_chunk: causal-LM tasks: vocabulary rows per chunk of the LM head, which runs only at labelled
            positions (None: the whole vocabulary at once).
        strategy: under ``torchrun`` (or ``unipeft train --nproc N``): ``ddp`` (every rank holds the whole base;
            the adapters' gradients all-reduced) or ``fsdp`` (FSDP2: the frozen base sharded over the ranks, the
            adapters whole; not with a quantized base). Ignored in one process.
        compile: ``torch.compile`` the training forward (the model and its loss): ``true`` for the default backend
            (inductor), a backend name (``aot_eager``, ``eager``, ...), or false. Evaluation runs uncompiled.
    """

    model: str = "minilm"
    task: str = "sst2"
    jsonl: JsonlTaskConfig | None = None
    method: str = "lora"
    method_options: dict[str, Any] = field(default_factory=dict)
    max_steps: int | None = None
    epochs: int = 1
    batch_size: int = 32
    eval_batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    warmup_ratio: float = 0.06
    scheduler: Scheduler = "linear"
    max_length: int = 128
    group_by_length: bool = False
    seed: int = 0
    eval_every: int | None = None
    save_every: int | None = None
    output_dir: str = "runs/default"
    resume: bool = True
    data_dir: str | None = None
    train_limit: int | None = None
    eval_limit: int | None = None
    threads: int | None = None
    progress: bool = True
    device: str = "auto"
    precision: Precision = "fp32"
    grad_accum_steps: int = 1
    gradient_checkpointing: bool = False
    quantization: str | None = None
    double_quant: bool = True
    optimizer: str = "adamw"
    packing: bool = False
    loss_chunk: int | None = 8192
    strategy: str = "ddp"
    compile: bool | str = False

    def __post_init__(self) -> None:
        if self.jsonl is None and self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; valid tasks: {', '.join(TASKS)} "
                             "(or describe a user task under 'jsonl:')")
        for key in ("model", "task", "method", "output_dir"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ValueError(f"{key} must be a non-empty string, got {getattr(self, key)!r}")
        if not self.method.endswith((".yaml", ".yml", ".json")) and self.method not in builtin_recipe_names():
            raise ValueError(f"unknown method {self.method!r}; built-in recipes: {', '.join(builtin_recipe_names())} "
                             "(or give a .yaml/.json recipe file)")
        check_device(self.device)
        check_optimizer(self.optimizer)
        check_precision(self.precision)
        check_strategy(self.strategy)
        check_compile(self.compile)
        if self.compile is not False and self.strategy == "fsdp":
            raise ValueError("compile is not supported with strategy fsdp (FSDP2's hooks and torch.compile need "
                             "per-block compilation, not built here); use strategy ddp, or compile false")
        if self.strategy == "fsdp" and self.quantization is not None:
            raise ValueError(f"strategy fsdp cannot shard a quantized base (quantization={self.quantization!r}): "
                             "bitsandbytes' packed weights are not DTensors; use strategy ddp, or quantization null")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {self.quantization!r}; valid: {', '.join(QUANTIZATIONS)} "
                             "or null")
        for key in ("group_by_length", "resume", "progress", "gradient_checkpointing", "double_quant", "packing"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be true or false, got {getattr(self, key)!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; valid: {', '.join(SCHEDULERS)}")
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "eval_batch_size": self.eval_batch_size,
                    "max_length": self.max_length, "max_steps": self.max_steps, "eval_every": self.eval_every,
                    "save_every": self.save_every, "train_limit": self.train_limit, "eval_limit": self.eval_limit,
                    "threads": self.threads, "grad_accum_steps": self.grad_accum_steps,
                    "loss_chunk": self.loss_chunk}
        for key, value in positive.items():
            nullable = key not in ("epochs", "grad_accum_steps")
            if (value is not None or not nullable) and (isinstance(value, bool) or not isinstance(value, int)
                                                        or value < 1):
                raise ValueError(f"{key} must be a positive integer{' or null' if nullable else ''}, "
                                 f"got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or null, got {self.max_grad_norm!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if not isinstance(self.method_options, Mapping):
            raise ValueError(f"method_options must be a mapping such as {{r: 16}}, got {self.method_options!r}")
        if self.grad_accum_steps > self.batch_size:
            raise ValueError(f"grad_accum_steps ({self.grad_accum_steps}) cannot exceed batch_size "
                             f"({self.batch_size}): every micro-batch needs an example")
        if self.packing and self.task_kind() not in ("causal_lm", "generation"):
            raise ValueError(f"packing is for causal-LM tasks (kind causal_lm or generation); task {self.task!r} "
                             f"is {self.task_kind()}")

    def task_kind(self) -> str:
        """The kind of the task (``classification``, ``regression``, ``causal_lm`` or ``generation``)."""
        return self.jsonl.kind if self.jsonl is not None else TASKS[self.task].kind
    def task_spec(self) -> TaskSpec:
        """The task to train on: the user JSONL task, or the built-in one."""
        return self.jsonl.spec(self.task) if self.jsonl is not None else get_task(self.task)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists for tuples) that :func:`train_config_from_dict` reads back to an equal config."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


#: Float fields; YAML 1.1 reads ``1e-3`` (no dot) as a string, so numbers written that way are converted.
FLOAT_KEYS = {"lr", "weight_decay", "warmup_ratio", "max_grad_norm"}


def _number(key: str, value: Any) -> Any:
    if value is None:
        return value
    try:
        if isinstance(value, bool):
            raise TypeError
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a number, got {value!r}") from None


def _build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ValueError(f"unknown {where}key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    for key in FLOAT_KEYS & set(kwargs):
        kwargs[key] = _number(key, kwargs[key])
    try:
        return cls(**kwargs)
    except TypeError as err:  # a missing required field
        raise ValueError(f"{where or 'config'}: {err}") from None


def train_config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from plain data (a parsed YAML file).

    Raises:
        ValueError: for unknown keys (the message lists the valid ones) or invalid values.
    """
    data = dict(data)
    if isinstance(data.get("jsonl"), Mapping):
        data["jsonl"] = _build(JsonlTaskConfig, data["jsonl"], "jsonl.")
    elif data.get("jsonl") is not None:
        raise ValueError(f"jsonl must be a mapping (train_path, eval_path, kind, ...), got {data['jsonl']!r}")
    if data.get("method_options") is None:
        data.pop("method_options", None)
    elif isinstance(data["method_options"], Mapping):
        data["method_options"] = dict(data["method_options"])
    config = _build(TrainConfig, data, "")
    return config


def set_override(data: dict[str, Any], override: str, *, valid: list[str], nested: tuple[str, ...] | None,
                 example: str) -> None:
    """Apply one ``key=value`` override to plain data, in place: the value parsed as YAML, dotted keys setting
    nested entries.

    Args:
        data: the plain config data.
        override: ``key=value``.
        valid: the top-level keys.
        nested: the keys that may have sub-keys (None: any).
        example: an example override, for the error messages.

    Raises:
        ValueError: if the override has no ``=``, a bad key, or a value that is not valid YAML.
    """
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"bad override {override!r}: use key=value, e.g. {example}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ValueError(f"bad override {override!r}: the value is not valid YAML ({err.problem})") from None
    parts = key.split(".")
    if parts[0] not in valid:
        raise ValueError(f"unknown key {parts[0]!r} in override {override!r}; valid keys: {', '.join(valid)}")
    if len(parts) > 1 and nested is not None and parts[0] not in nested:
        raise ValueError(f"key {parts[0]!r} has no sub-keys (override {override!r}); "
                         f"only {' and '.join(k + '.*' for k in nested)} are nested")
    target = data
    for part in parts[:-1]:
        if not isinstance(target.get(part), dict):
            target[part] = {}
        target = target[part]
    target[parts[-1]] = value


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``key=value`` override to plain training-config data, in place.

    The value is parsed as YAML (``lr=1e-3``, ``positions=[attn.q,attn.v]``, ``max_steps=null``); dotted keys set
    nested entries (``method_options.r=16``, ``jsonl.train_path=data/train.jsonl``).

    Raises:
        ValueError: if the override has no ``=``, a bad key, or a value that is not valid YAML.
    """
    set_override(data, override, valid=[f.name for f in fields(TrainConfig)], nested=("method_options", "jsonl"),
                 example="max_steps=100 or method_options.r=16")


def load_train_config(path: str | os.PathLike[str] | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML training config and apply ``key=value`` overrides.

    Args:
        path: the YAML file, or None to start from the defaults.
        overrides: ``key=value`` strings (see :func:`apply_override`), applied in order.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: for invalid YAML, unknown keys (listing the valid ones) or invalid values.
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = read_mapping(path, what="config file")
    for override in overrides:
        apply_override(data, override)
    return train_config_from_dict(data)


__all__ = ["TrainConfig", "JsonlTaskConfig", "SCHEDULERS", "load_train_config", "train_config_from_dict",
           "apply_override"]
