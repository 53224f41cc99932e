"""What a benchmark runs: one model and task, a line-up of methods, a budget and seeds (a :class:`BenchSpec`).

A spec is read from YAML (the built-in suites in ``unipeft/bench/suites/`` or a user's file)::

    name: my_task
    description: LoRA against full fine-tuning on my reviews
    train:                      # TrainConfig keys shared by every method: model, task or jsonl, budget, ...
      model: minilm
      jsonl: {train_path: data/train.jsonl, eval_path: data/dev.jsonl, kind: classification,
              text_fields: [review], label_field: stars, label_names: [negative, positive]}
      task: reviews
      max_steps: 200
      batch_size: 32
    seeds: [0, 1]
    methods:                    # a recipe name, or a mapping: method, an optional name, per-method TrainConfig keys
      - full: {lr: 5.0e-5}
      - lora: {lr: 2.0e-3, method_options: {r: 8}}
      - {name: lora_ffn, method: lora, lr: 2.0e-3, method_options: {positions: [ffn.up, ffn.down]}}

Every (method, seed) becomes one :class:`~unipeft.train.TrainConfig`; the spec checks them all when it is built,
so a typo fails before anything trains.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from unipeft.core.recipe import load_recipe
from unipeft.train.config import TrainConfig, train_config_from_dict

#: TrainConfig keys the bench sets itself, per run.
RUN_KEYS = ("seed", "output_dir", "method", "resume")
#: TrainConfig keys every method shares (one model, one task per benchmark).
SHARED_KEYS = ("model", "task", "jsonl", "data_dir", "eval_limit", "max_length")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


MALLOC_MMAP_THRESHOLD = 128 * 1024  # bytes; the workers' default (see BenchSpec.malloc_mmap_threshold)

@dataclass(frozen=True, kw_only=True)
class MethodRun:
    """One method of the line-up.

    Attributes:
        name: its label in tables, plots and file names (letters, digits, ``_.-``); unique in the spec.
        method: a built-in recipe name or a recipe file.
        overrides: TrainConfig keys for this method only, e.g. ``{lr: 2e-3, method_options: {r: 16}}``.
    """

    name: str
    method: str
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(f"method name {self.name!r} must be letters, digits, '_', '.' or '-'")
        bad = sorted(set(self.overrides) & set(RUN_KEYS + SHARED_KEYS))
        if bad:
            raise ValueError(f"method {self.name!r}: {', '.join(bad)} cannot be set per method "
                             f"({', '.join(RUN_KEYS)} are set by the bench; {', '.join(SHARED_KEYS)} are shared, "
                             "set them under 'train:')")


@dataclass(frozen=True, kw_only=True)
class LatencyConfig:
    """How inference latency is measured: forward passes over one fixed batch of evaluation examples.

    Attributes:
        batch_size: examples in the batch (the first ones of the evaluation set).
        warmup: untimed passes first.
        repeats: timed passes; the median is reported.
    """

    batch_size: int = 32
    warmup: int = 2
    repeats: int = 10

    def __post_init__(self) -> None:
        for key in ("batch_size", "repeats"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"latency.{key} must be a positive integer, got {value!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"latency.warmup must be a non-negative integer, got {self.warmup!r}")


@dataclass(frozen=True, kw_only=True)
class BenchSpec:
    """A benchmark: methods side by side on one model and task.

    Attributes:
        name: the benchmark's name (used for the default output folder).
        description: one line for the report.
        train: TrainConfig keys shared by every run (model, task or jsonl, budget, batch size, ...).
        methods: the line-up, in report order.
        seeds: every method runs once per seed.
        latency: how inference latency is measured.
        samples: generations shown per method in the report (generation and causal_lm tasks).
        malloc_mmap_threshold: glibc's ``MALLOC_MMAP_THRESHOLD_`` for the workers, in bytes: allocations from this
            size up are mapped and unmapped on their own, so freed tensors go back to the system and the resident
            set follows live memory (with glibc's default, heap fragmentation from batches of varying length
            added up to 600 MiB to MiniLM's peak RSS); None keeps the allocator's default. It costs ~15-20% of a
            CPU training step here.
    """

    name: str
    description: str = ""
    train: Mapping[str, Any] = field(default_factory=dict)
    methods: tuple[MethodRun, ...] = ()
    seeds: tuple[int, ...] = (0,)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    samples: int = 3
    malloc_mmap_threshold: int | None = MALLOC_MMAP_THRESHOLD

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(f"bench name {self.name!r} must be letters, digits, '_', '.' or '-'")
        if not self.methods:
            raise ValueError(f"bench {self.name!r} has no methods")
        names = [m.name for m in self.methods]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"method names must be unique; repeated: {', '.join(duplicates)} "
                             "(give each a distinct 'name:')")
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be a non-empty list of non-negative integers, got {list(self.seeds)!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {list(self.seeds)!r}")
        bad = sorted(set(self.train) & set(RUN_KEYS))
        if bad:
            raise ValueError(f"train: {', '.join(bad)} cannot be set here; the bench sets them per run "
                             "(seeds go under 'seeds:', methods under 'methods:')")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 0:
            raise ValueError(f"samples must be a non-negative integer, got {self.samples!r}")
        threshold = self.malloc_mmap_threshold
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0):
            raise ValueError(f"malloc_mmap_threshold must be a non-negative integer (bytes) or null, got {threshold!r}")
        for method in self.methods:
            try:
                config = self.config(method, self.seeds[0], "runs/_check")
                load_recipe(config.method).with_options(**config.method_options)
            except (ValueError, TypeError, FileNotFoundError) as err:
                raise ValueError(f"method {method.name!r}: {err}") from None

    def method(self, name: str) -> MethodRun:
        """The method called ``name``.

        Raises:
            ValueError: no such method (the message lists the line-up).
        """
        for method in self.methods:
            if method.name == name:
                return method
        raise ValueError(f"unknown method {name!r} in bench {self.name!r}; its methods: "
                         f"{', '.join(m.name for m in self.methods)}")

    def config(self, method: MethodRun, seed: int, output_dir: str) -> TrainConfig:
        """The training config of one run: the shared keys, the method's overrides, its seed and folder.

        Raises:
            ValueError: an invalid key or value (from :func:`~unipeft.train.train_config_from_dict`).
        """
        data = {**_plain(self.train), **_plain(method.overrides), "method": method.method, "seed": seed,
                "output_dir": output_dir, "resume": True}
        return train_config_from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """Plain data that :func:`spec_from_dict` reads back to an equal spec."""
        return {"name": self.name, "description": self.description, "train": _plain(self.train),
                "seeds": list(self.seeds), "samples": self.samples, "malloc_mmap_threshold": self.malloc_mmap_threshold,
                "latency": {f.name: getattr(self.latency, f.name) for f in fields(LatencyConfig)},
                "methods": [{"name": m.name, "method": m.method, **_plain(m.overrides)} for m in self.methods]}


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _method_entry(entry: Any, index: int) -> MethodRun:
    """A line-up entry: ``lora``, ``{lora: {lr: ...}}`` or ``{method: lora, name: ..., lr: ...}``."""
    if isinstance(entry, str):
        return MethodRun(name=entry.rsplit("/", 1)[-1].split(".")[0], method=entry)
    if isinstance(entry, Mapping) and "method" in entry:
        data = dict(entry)
        method = data.pop("method")
        name = data.pop("name", None) or str(method).rsplit("/", 1)[-1].split(".")[0]
        return MethodRun(name=name, method=method, overrides=data)
    if isinstance(entry, Mapping) and len(entry) == 1:
        (method, options), = entry.items()
        if options is not None and not isinstance(options, Mapping):
            raise ValueError(f"methods[{index}]: options of {method!r} must be a mapping, got {options!r}")
        data = dict(options or {})
        name = data.pop("name", None) or str(method)
        return MethodRun(name=name, method=str(method), overrides=data)
    raise ValueError(f"methods[{index}]: expected a recipe name, {{recipe: {{key: value}}}} or "
                     f"{{method: recipe, name: ..., key: value}}, got {entry!r}")


KEYS = ("name", "description", "train", "methods", "seeds", "latency", "samples", "malloc_mmap_threshold")


def spec_from_dict(data: Mapping[str, Any]) -> BenchSpec:
    """A :class:`BenchSpec` from plain data (a parsed YAML file).

    Raises:
        ValueError: unknown keys (the message lists the valid ones) or invalid values.
    """
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise ValueError(f"unknown bench key(s) {', '.join(unknown)}; valid keys: {', '.join(KEYS)}")
    if not isinstance(data.get("methods"), list):
        raise ValueError(f"methods must be a list, got {data.get('methods')!r}")
    if not isinstance(data.get("train", {}), Mapping):
        raise ValueError(f"train must be a mapping of TrainConfig keys, got {data.get('train')!r}")
    latency = data.get("latency") or {}
    if not isinstance(latency, Mapping):
        raise ValueError(f"latency must be a mapping (batch_size, warmup, repeats), got {latency!r}")
    unknown = sorted(set(latency) - {f.name for f in fields(LatencyConfig)})
    if unknown:
        raise ValueError(f"unknown latency key(s) {', '.join(unknown)}; valid: batch_size, warmup, repeats")
    seeds = data.get("seeds", [0])
    seeds = [seeds] if isinstance(seeds, int) else seeds
    if not isinstance(seeds, list):
        raise ValueError(f"seeds must be a list of integers, got {seeds!r}")
    return BenchSpec(name=data.get("name", "bench"), description=str(data.get("description", "")),
                     train=dict(data.get("train") or {}),
                     methods=tuple(_method_entry(e, i) for i, e in enumerate(data["methods"])),
                     seeds=tuple(seeds), latency=LatencyConfig(**latency), samples=data.get("samples", 3),
                     malloc_mmap_threshold=data.get("malloc_mmap_threshold", MALLOC_MMAP_THRESHOLD))


__all__ = ["BenchSpec", "MethodRun", "LatencyConfig", "spec_from_dict", "RUN_KEYS", "SHARED_KEYS"]
