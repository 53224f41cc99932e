"""The search space: He et al.'s design dimensions (arXiv 2110.04366, Sec. 3) as sets of choices, plus shipped recipes
as fixed points.

A point of the space is one delta ``(form, positions, layers, insertion, composition)`` with the form's
hyperparameters, and a learning rate; or one shipped recipe as it ships. From YAML (the ``space:`` section of a
search config)::

    forms:                          # the functional forms, each with choices of its hyperparameters (lists) or fixed
      lora: {r: [2, 4, 8], lr: [1.0e-3, 2.0e-3, 5.0e-3]}
      bottleneck: {size: [8, 16, 32], lr: [1.0e-3, 3.0e-3], positions: [[ffn], [attn]]}   # positions: this form's own
      ia3: {lr: [3.0e-3, 1.0e-2], positions: [[attn.k, attn.v]]}
    positions: [[attn.q, attn.v], [attn.q, attn.k, attn.v, attn.o], [ffn.up, ffn.down]]   # the modified representation
    layers: [null, [3, 4, 5]]      # null: every layer; a list: those layers (negative from the end)
    insertions: [parallel, sequential, multiplicative, multiplicative_input]   # each form keeps those it supports
    compositions: [add, scaled]
    scales: [1.0, 4.0]             # s of the scaled composition
    recipes: {lora: 2.0e-3, pfeiffer: 1.0e-3}   # shipped recipes as points, each with its learning rate

Only forms that train in mixed batches can be searched (every trial of a wave shares one base through
:func:`unipeft.train.multi.train_jobs`): see :data:`SEARCHABLE_FORMS`. The per-form keys ``lr``, ``positions``,
``layers``, ``insertions`` and ``compositions`` override the space-wide ones for that form.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from unipeft.core.compose import COMPOSITIONS
from unipeft.core.delta import form_config_class
from unipeft.core.recipe import builtin_recipe_names, load_recipe
from unipeft.core.site import INSERTIONS
from unipeft.mixed.batch import SUPPORTED_FORMS

#: Forms a search can place: those that train in a mixed batch, less AdaLoRA (a per-step rank schedule, refused in
#: multi-job training) and module copies (the head copy is added to every trial anyway).
SEARCHABLE_FORMS: tuple[str, ...] = tuple(f for f in SUPPORTED_FORMS if f not in ("adalora", "copy"))
#: Compositions that run in mixed batches (``gated`` does not).
SEARCHABLE_COMPOSITIONS: tuple[str, ...] = tuple(c for c in COMPOSITIONS if c != "gated")
#: Keys of a form entry that are not the form's hyperparameters.
PLACEMENT_KEYS = ("lr", "positions", "layers", "insertions", "compositions")
DEFAULT_LR = 1e-3

Choice = tuple[Any, ...]


def check_keys(data: Mapping[str, Any], valid: Sequence[str], where: str) -> None:
    """Refuse keys of ``data`` outside ``valid``, naming them and the valid ones.

    Raises:
        ValueError: ``<where>: unknown key(s) a, b; valid: ...``.
    """
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(valid)}")

def _choices(key: str, value: Any) -> Choice:
    """A list of choices as a tuple; a scalar as one choice."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{key}: give at least one choice, got an empty list")
        return tuple(value)
    return (value,)


def _position_sets(key: str, value: Any) -> tuple[tuple[str, ...], ...]:
    sets = _choices(key, value)
    out = []
    for entry in sets:
        entry = (entry,) if isinstance(entry, str) else entry
        if not isinstance(entry, (list, tuple)) or not entry or not all(isinstance(p, str) and p for p in entry):
            raise ValueError(f"{key}: each choice is a list of positions such as [attn.q, attn.v], got {entry!r}")
        out.append(tuple(entry))
    return tuple(out)


def _layer_sets(key: str, value: Any) -> tuple[tuple[int, ...] | None, ...]:
    out: list[tuple[int, ...] | None] = []
    for entry in _choices(key, value) if value is not None else (None,):
        if entry is None or entry == "all":
            out.append(None)
        elif isinstance(entry, (list, tuple)) and entry and all(isinstance(i, int) and not isinstance(i, bool)
                                                               for i in entry):
            out.append(tuple(entry))
        else:
            raise ValueError(f"{key}: each choice is null (every layer) or a list of layer indices such as [3, 4, 5], "
                             f"got {entry!r}")
    return tuple(out)


def _lrs(key: str, value: Any) -> tuple[float, ...]:
    """Positive numbers (learning rates, scales); YAML's ``1e-3`` (read as a string) is converted."""
    out = []
    for v in _choices(key, value):
        try:
            number = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: choices must be numbers, got {v!r}") from None
        if isinstance(v, bool) or not number > 0:
            raise ValueError(f"{key}: choices must be > 0, got {v!r}")
        out.append(number)
    return tuple(out)


def _check_within(key: str, values: Choice, valid: tuple[str, ...]) -> None:
    for v in values:
        if v not in valid:
            raise ValueError(f"{key}: unknown value {v!r}; valid: {', '.join(valid)}")


@dataclass(frozen=True, kw_only=True)
class FormChoices:
    """One form of the space and its choices.

    Attributes:
        type: the form (one of :data:`SEARCHABLE_FORMS`).
        options: each hyperparameter's choices, e.g. ``(("r", (4, 8)), ("alpha", (16.0,)))``.
        lrs: learning-rate choices.
        positions: position-set choices.
        layers: layer-set choices (None: every layer).
        insertions: insertion choices (a subset of the form's).
        compositions: composition choices.
    """

    type: str
    options: tuple[tuple[str, Choice], ...]
    lrs: tuple[float, ...]
    positions: tuple[tuple[str, ...], ...]
    layers: tuple[tuple[int, ...] | None, ...]
    insertions: tuple[str, ...]
    compositions: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class SearchSpace:
    """The design dimensions to search and the shipped recipes to include (see the module docstring).

    Attributes:
        forms: the forms and their choices.
        scales: the choices of s for the ``scaled`` composition.
        recipes: shipped recipes as fixed points, with their learning rates.
    """

    forms: tuple[FormChoices, ...]
    scales: tuple[float, ...] = (1.0,)
    recipes: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if not self.forms and not self.recipes:
            raise ValueError("the search space is empty: give forms (e.g. forms: {lora: {r: [4, 8]}}) or recipes")

    @property
    def points(self) -> tuple[str, ...]:
        """The top-level choices: ``form:<type>`` for each form, ``recipe:<name>`` for each shipped recipe."""
        return tuple(f"form:{f.type}" for f in self.forms) + tuple(f"recipe:{r}" for r, _ in self.recipes)

    def form(self, name: str) -> FormChoices:
        """The choices of form ``name``."""
        for f in self.forms:
            if f.type == name:
                return f
        raise ValueError(f"form {name!r} is not in the space; its forms: {', '.join(f.type for f in self.forms)}")

    def recipe_lr(self, name: str) -> float:
        """The learning rate of shipped recipe ``name``."""
        return dict(self.recipes)[name]


def _form_choices(name: str, raw: Any, defaults: Mapping[str, Any]) -> FormChoices:
    if name not in SEARCHABLE_FORMS:
        raise ValueError(f"space.forms: unknown or unsearchable form {name!r}; valid: {', '.join(SEARCHABLE_FORMS)} "
                         "(forms that train in a mixed batch)")
    raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        raise ValueError(f"space.forms.{name}: a mapping of hyperparameter choices such as {{r: [4, 8]}}, "
                         f"got {raw!r}")
    cls = form_config_class(name)
    hyper = [f.name for f in fields(cls) if f.name != "type"]
    check_keys(raw, hyper + list(PLACEMENT_KEYS), f"space.forms.{name}")
    if "dropout" in raw and any(v != 0 for v in _choices("dropout", raw["dropout"])):
        raise ValueError(f"space.forms.{name}.dropout: must be 0 (multi-adapter training cannot apply dropout per row)")
    where = f"space.forms.{name}"
    options = tuple((k, _choices(f"{where}.{k}", raw[k])) for k in hyper if k in raw)
    for key, values in options:  # every choice must build a valid form config
        for v in values:
            try:
                cls(**{key: tuple(v) if isinstance(v, list) else v})
            except (TypeError, ValueError) as err:
                raise ValueError(f"{where}.{key}: bad choice {v!r} ({err})") from None
    merged = {**defaults, **{k: raw[k] for k in PLACEMENT_KEYS if k in raw}}
    if "positions" not in merged:
        raise ValueError(f"{where}: no positions (give space.positions or {where}.positions)")
    insertions = tuple(i for i in _choices(f"{where}.insertions", merged.get("insertions", cls.insertions))
                       if i in cls.insertions)
    _check_within(f"{where}.insertions", _choices("insertions", merged.get("insertions", cls.insertions)), INSERTIONS)
    if not insertions:
        raise ValueError(f"{where}: none of the insertions {list(_choices('', merged['insertions']))} is supported by "
                         f"form {name!r}; it supports: {', '.join(cls.insertions)}")
    compositions = _choices(f"{where}.compositions", merged.get("compositions", ("add",)))
    _check_within(f"{where}.compositions", compositions, SEARCHABLE_COMPOSITIONS)
    return FormChoices(type=name, options=options, lrs=_lrs(f"{where}.lr", merged.get("lr", DEFAULT_LR)),
                       positions=_position_sets(f"{where}.positions", merged["positions"]),
                       layers=_layer_sets(f"{where}.layers", merged.get("layers")), insertions=insertions,
                       compositions=tuple(compositions))


def _recipes(raw: Any) -> tuple[tuple[str, float], ...]:
    if raw is None:
        return ()
    if isinstance(raw, (list, tuple)):
        raw = {name: DEFAULT_LR for name in raw}
    if not isinstance(raw, Mapping):
        raise ValueError(f"space.recipes: a list of shipped recipe names or a mapping name: lr, got {raw!r}")
    names = builtin_recipe_names()
    out = []
    for name, lr in raw.items():
        if name not in names:
            raise ValueError(f"space.recipes: unknown recipe {name!r}; shipped recipes: {', '.join(names)}")
        recipe = load_recipe(name)
        for spec in recipe.deltas:
            if spec.form.type not in SEARCHABLE_FORMS + ("copy",) or spec.composition not in SEARCHABLE_COMPOSITIONS:
                raise ValueError(f"space.recipes: recipe {name!r} uses {spec.form.type} ({spec.composition}), which "
                                 "multi-adapter training cannot run; searchable forms: "
                                 f"{', '.join(SEARCHABLE_FORMS)}")
            if getattr(spec.form, "dropout", 0.0):
                raise ValueError(f"space.recipes: recipe {name!r} has dropout {spec.form.dropout}; multi-adapter "
                                 "training needs dropout 0")
        out.append((str(name), _lrs(f"space.recipes.{name}", lr)[0]))
    return tuple(out)


def space_from_dict(data: Mapping[str, Any]) -> SearchSpace:
    """A :class:`SearchSpace` from plain data (the ``space:`` section).

    Raises:
        ValueError: for unknown keys, forms, hyperparameters, insertions, compositions or recipes (the message
            lists the valid ones) and malformed choices.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"space must be a mapping (forms, positions, layers, ...), got {data!r}")
    valid = ("forms", "positions", "layers", "insertions", "compositions", "scales", "recipes", "lr")
    check_keys(data, valid, "space")
    defaults = {k: data[k] for k in ("positions", "layers", "insertions", "compositions", "lr") if k in data}
    forms_raw = data.get("forms") or {}
    if not isinstance(forms_raw, Mapping):
        raise ValueError(f"space.forms: a mapping form -> choices such as {{lora: {{r: [4, 8]}}}}, got {forms_raw!r}")
    forms = tuple(_form_choices(str(name), raw, defaults) for name, raw in forms_raw.items())
    scales = _lrs("space.scales", data.get("scales", 1.0))
    return SearchSpace(forms=forms, scales=scales, recipes=_recipes(data.get("recipes")))


__all__ = ["SearchSpace", "FormChoices", "SEARCHABLE_FORMS", "SEARCHABLE_COMPOSITIONS", "check_keys", "space_from_dict"]
