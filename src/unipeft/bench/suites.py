"""The built-in suites (YAML files in ``unipeft/bench/suites/``) and command-line changes to a spec.

    spec = load_spec("nlu")                                   # or a path to a bench YAML file
    spec = customize(spec, task="cola", methods=["full", "lora"], sets=["max_steps=50"])
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import yaml

from unipeft.bench.spec import BenchSpec, spec_from_dict
from unipeft.train.config import apply_override

SUITES_DIR = Path(__file__).parent / "suites"


def suite_names() -> list[str]:
    """The built-in suites, sorted."""
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


def load_spec(source: str | os.PathLike[str]) -> BenchSpec:
    """A built-in suite by name (``nlu``, ``nlg``, ...) or a bench YAML file.

    Raises:
        ValueError: an unknown suite name (the message lists them), invalid YAML or an invalid spec.
        FileNotFoundError: a path that does not exist.
    """
    text = str(source)
    if text.endswith((".yaml", ".yml")) or os.sep in text:
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"bench file {text!r} does not exist")
    else:
        path = SUITES_DIR / f"{text}.yaml"
        if not path.is_file():
            raise ValueError(f"unknown suite {text!r}; built-in suites: {', '.join(suite_names())} "
                             "(or give a bench .yaml file)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping (name, train, methods, seeds, ...), got {type(data).__name__}")
    return spec_from_dict(data)


def customize(spec: BenchSpec, *, task: str | None = None, sets: Sequence[str] = (),
              methods: Sequence[str] | None = None, seeds: Sequence[int] | None = None) -> BenchSpec:
    """``spec`` with another task, ``key=value`` changes to its shared train config, a subset of its methods (in the
    given order) or other seeds; the name gets the task appended when the task changes.

    Raises:
        ValueError: a bad override, an unknown method name (the message lists the line-up), or an invalid result.
    """
    train = dict(spec.train)
    name = spec.name
    if task is not None:
        train["task"] = task
        train.pop("jsonl", None)
        name = f"{spec.name.split('_')[0]}_{task}"
    for override in sets:
        apply_override(train, override)
    lineup = tuple(spec.method(m) for m in methods) if methods else spec.methods
    return dataclasses.replace(spec, name=name, train=train, methods=lineup,
                               seeds=tuple(seeds) if seeds else spec.seeds)


__all__ = ["SUITES_DIR", "suite_names", "load_spec", "customize"]
