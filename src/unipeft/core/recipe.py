"""Recipes: a named, serialisable list of (form, positions, insertion, composition) — a point in the design space.

The named methods of the surveys are recipes shipped as YAML files in ``unipeft/recipes/``; users write their own the
same way. A recipe prints back to the same YAML/JSON it was read from.

Example (He et al.'s scaled parallel adapter at the FFN)::

    name: scaled_pa
    family: additive
    paper: He et al. 2022, arXiv 2110.04366
    deltas:
      - form: {type: bottleneck, size: 64, activation: relu}
        positions: [ffn]
        insertion: parallel
        composition: scaled
        scale: 4.0
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from unipeft.core.compose import COMPOSITIONS
from unipeft.core.delta import FormConfig, form_config
from unipeft.core.site import INSERTIONS
from unipeft.util.files import read_mapping

Family = Literal["additive", "selective", "reparameterized", "hybrid", "unified", "full"]
FAMILIES: tuple[str, ...] = ("additive", "selective", "reparameterized", "hybrid", "unified", "full")


@dataclass(frozen=True, kw_only=True)
class DeltaSpec:
    """One form placed at a set of positions.

    Attributes:
        form: the functional form and its hyperparameters.
        positions: canonical positions (``attn.q``, ``ffn``, ...); may be empty when ``modules`` is given.
        modules: raw module-name patterns (a regex string, or a list of names/suffixes), as HF peft's target_modules.
        layers: layer indices to use in each stack (negative from the end); None for all.
        stacks: layer stacks to use (``encoder``, ``decoder``); None for all.
        insertion: parallel, sequential, multiplicative, multiplicative_input or replace; None for the form's default.
        composition: add, scaled or gated.
        scale: the fixed or initial s of ``scaled``.
        learn_scale: learn s instead of fixing it.
    """

    form: FormConfig
    positions: tuple[str, ...] = ()
    modules: tuple[str, ...] | str | None = None
    layers: tuple[int, ...] | None = None
    stacks: tuple[str, ...] | None = None
    insertion: str | None = None
    composition: str = "add"
    scale: float = 1.0
    learn_scale: bool = False

    def __post_init__(self) -> None:
        if not self.positions and not self.modules:
            raise ValueError(f"delta '{self.form.type}' needs positions (e.g. [attn.q, attn.v]) or modules patterns")
        insertion = self.resolved_insertion
        if insertion not in self.form.insertions:
            raise ValueError(f"form '{self.form.type}' does not support insertion {insertion!r}; "
                             f"valid: {', '.join(self.form.insertions)}")
        if self.composition not in COMPOSITIONS:
            raise ValueError(f"unknown composition {self.composition!r}; valid: {', '.join(COMPOSITIONS)}")
        if insertion in ("multiplicative", "multiplicative_input") and (self.composition != "add" or self.learn_scale):
            # h' = h ⊙ l has no Δh to scale or gate: a composition here would be silently ignored
            raise ValueError(f"composition {self.composition!r} of form '{self.form.type}' at insertion "
                             f"{insertion!r}: a multiplicative delta (h' = h ⊙ l) has no Δh to compose; use "
                             "composition 'add' (the default), or an additive insertion (parallel, sequential)")
        assert insertion in INSERTIONS

    @property
    def resolved_insertion(self) -> str:
        """The insertion form, defaulting to the form's first supported one."""
        return self.insertion or self.form.insertions[0]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DeltaSpec":
        """Build from plain data (YAML/JSON).

        Raises:
            ValueError: for unknown keys or invalid values.
        """
        data = dict(data)
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(f"unknown delta key(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
        if "form" not in data:
            raise ValueError("a delta needs a 'form' (e.g. form: {type: lora, r: 8})")
        data["form"] = form_config(data["form"])
        for key in ("positions", "layers", "stacks"):
            if isinstance(data.get(key), list):
                data[key] = tuple(data[key])
        if isinstance(data.get("modules"), list):
            data["modules"] = tuple(data["modules"])
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, omitting fields left at their defaults."""
        out: dict[str, Any] = {"form": self.form.to_dict()}
        for f in fields(self):
            if f.name == "form":
                continue
            value = getattr(self, f.name)
            if value != f.default:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """A named PEFT method: one or more deltas, plus whether the base itself trains (full fine-tuning).

    Attributes:
        name: the recipe's name.
        family: its family in Xu & Xie's taxonomy (additive, selective, reparameterized, hybrid, unified) or ``full``.
        paper: the paper that introduced it.
        deltas: the deltas it places.
        train_base: train every base weight (full fine-tuning); then ``deltas`` is usually empty.
        description: one line for ``unipeft methods``.
    """

    name: str
    family: str
    paper: str = ""
    deltas: tuple[DeltaSpec, ...] = ()
    train_base: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r} for recipe '{self.name}'; valid: {', '.join(FAMILIES)}")
        if not self.deltas and not self.train_base:
            raise ValueError(f"recipe '{self.name}' has no deltas and does not train the base: nothing would train")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Recipe":
        """Build from plain data (YAML/JSON)."""
        data = dict(data)
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(f"unknown recipe key(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
        data["deltas"] = tuple(DeltaSpec.from_dict(d) for d in data.get("deltas", ()))
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain data that :meth:`from_dict` reads back to an equal recipe."""
        out: dict[str, Any] = {"name": self.name, "family": self.family}
        if self.paper:
            out["paper"] = self.paper
        if self.description:
            out["description"] = self.description
        if self.train_base:
            out["train_base"] = True
        out["deltas"] = [d.to_dict() for d in self.deltas]
        return out

    def to_yaml(self) -> str:
        """The recipe as YAML."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_options(self, **options: Any) -> "Recipe":
        """A copy with hyperparameters overridden in every delta whose form has them (e.g. ``r=16``),
        or with placement fields (``positions``, ``layers``, ``modules``, ``composition``, ``scale``) set on every delta.

        Raises:
            ValueError: if an option applies to no delta (the message lists the valid options).
        """
        if not options:
            return self
        placement = {f.name for f in fields(DeltaSpec)} - {"form"}
        used: set[str] = set()
        deltas = []
        for spec in self.deltas:
            form_fields = {f.name for f in fields(spec.form)}
            form_opts = {k: v for k, v in options.items() if k in form_fields}
            place_opts = {k: _tupled(v) for k, v in options.items() if k in placement and k not in form_fields}
            used |= set(form_opts) | set(place_opts)
            form = replace(spec.form, **{k: _tupled(v) for k, v in form_opts.items()})
            deltas.append(replace(spec, form=form, **place_opts))
        unknown = sorted(set(options) - used)
        if unknown:
            valid = sorted({f.name for s in self.deltas for f in fields(s.form)} | placement)
            raise ValueError(f"option(s) {', '.join(unknown)} do not apply to recipe '{self.name}'; "
                             f"valid: {', '.join(valid)}")
        return replace(self, deltas=tuple(deltas))


def _tupled(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def builtin_recipe_names() -> list[str]:
    """Names of the recipes shipped with unipeft."""
    folder = resources.files("unipeft") / "recipes"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_recipe(source: "str | Path | Mapping[str, Any] | Recipe") -> Recipe:
    """A recipe from a built-in name, a YAML/JSON file, plain data, or a Recipe.

    Raises:
        ValueError: for an unknown name (the message lists the built-in recipes) or an invalid recipe.
        FileNotFoundError: for a missing file.
    """
    if isinstance(source, Recipe):
        return source
    if isinstance(source, Mapping):
        return Recipe.from_dict(source)
    text = str(source)
    if text.endswith((".yaml", ".yml", ".json")):
        return Recipe.from_dict(read_mapping(text, what="recipe file"))
    names = builtin_recipe_names()
    if text not in names:
        raise ValueError(f"unknown method {text!r}; built-in recipes: {', '.join(names)} "
                         "(or give a .yaml/.json recipe file)")
    raw = (resources.files("unipeft") / "recipes" / f"{text}.yaml").read_text(encoding="utf-8")
    return Recipe.from_dict(yaml.safe_load(raw))


__all__ = ["DeltaSpec", "Recipe", "load_recipe", "builtin_recipe_names", "FAMILIES"]
