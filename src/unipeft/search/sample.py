"""One trial's point of the space: Optuna's suggestions turned into a recipe and a learning rate.

The space is conditional (define-by-run): the trial first picks a point, ``form:<type>`` or ``recipe:<name>``; a
form then picks its hyperparameters (``lora.r``, ...), its positions, layers, insertion and composition (and the
scale of ``scaled``), each under a name of its own, so that the samplers model every form's choices apart.
Categorical choices are stored as Optuna needs them (numbers and strings): position sets as ``"attn.q,attn.v"``,
layer sets as ``"all"`` or ``"3,4,5"``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import optuna

from unipeft.core.delta import form_config
from unipeft.core.recipe import DeltaSpec, Recipe, load_recipe
from unipeft.search.space import SearchSpace


@dataclass(frozen=True)
class Candidate:
    """A sampled point: the recipe to train, its learning rate, and a one-line summary for tables."""

    recipe: Recipe
    lr: float
    summary: str


#: Hyperparameters a summary always shows (the others only when not at their defaults).
SIZES = ("r", "alpha", "size", "reduction_factor")


def _encode_positions(positions: tuple[str, ...]) -> str:
    return ",".join(positions)


def _encode_layers(layers: tuple[int, ...] | None) -> str:
    return "all" if layers is None else ",".join(str(i) for i in layers)


def _decode_layers(text: str) -> tuple[int, ...] | None:
    return None if text == "all" else tuple(int(i) for i in text.split(","))


def summarize(recipe: Recipe) -> str:
    """A one-line summary of a recipe: ``lora(r=4) @attn.q,attn.v [3,4,5] parallel scaled×4``."""
    parts = []
    for spec in recipe.deltas:
        if spec.form.type == "copy" and spec.positions == ("head",):  # the head copy every labelled task trains
            continue
        defaults = type(spec.form)()
        hyper = ",".join(f"{f.name}={getattr(spec.form, f.name)}" for f in fields(spec.form)
                         if f.name != "type" and getattr(spec.form, f.name) is not None
                         and (f.name in SIZES or getattr(spec.form, f.name) != getattr(defaults, f.name)))
        text = f"{spec.form.type}({hyper}) @{_encode_positions(spec.positions)}"
        if spec.layers is not None:
            text += f" [{_encode_layers(spec.layers)}]"
        text += f" {spec.resolved_insertion}"
        if spec.composition != "add":
            text += f" {spec.composition}" + (f"×{spec.scale:g}" if spec.composition == "scaled" else "")
        parts.append(text)
    return " + ".join(parts)


def _pick(trial: optuna.Trial, name: str, choices: tuple[Any, ...]) -> Any:
    return trial.suggest_categorical(name, list(choices))


def suggest(trial: optuna.Trial, space: SearchSpace, *, name: str) -> Candidate:
    """Sample one point of ``space`` through ``trial``'s suggestions.

    Args:
        trial: the Optuna trial.
        space: the space.
        name: the recipe's name.

    Raises:
        ValueError: if the sampled combination is not a valid delta (e.g. a form at an insertion it lacks); the
            caller marks the trial infeasible.
    """
    point = _pick(trial, "point", space.points)
    kind, _, which = point.partition(":")
    if kind == "recipe":
        recipe = load_recipe(which)
        return Candidate(recipe=recipe, lr=space.recipe_lr(which), summary=f"{which} (shipped) {summarize(recipe)}")
    form = space.form(which)
    options = {key: _pick(trial, f"{which}.{key}", values) for key, values in form.options}
    positions = tuple(_pick(trial, f"{which}.positions", tuple(_encode_positions(p) for p in form.positions))
                      .split(","))
    layers = _decode_layers(_pick(trial, f"{which}.layers", tuple(_encode_layers(s) for s in form.layers)))
    insertion = _pick(trial, f"{which}.insertion", form.insertions)
    # a multiplicative delta has no Δh to compose (DeltaSpec refuses it): composition is an additive one's choice
    composition = "add" if insertion.startswith("multiplicative") else \
        _pick(trial, f"{which}.composition", form.compositions)
    scale = float(_pick(trial, "scale", space.scales)) if composition == "scaled" else 1.0
    lr = float(_pick(trial, f"{which}.lr", form.lrs))
    spec = DeltaSpec(form=form_config({"type": which, **options}), positions=positions, layers=layers,
                     insertion=insertion, composition=composition, scale=scale)
    recipe = Recipe(name=name, family="unified", deltas=(spec,),
                    paper="found by unipeft search (He et al. 2022's design space, arXiv 2110.04366)")
    recipe = replace(recipe, description=summarize(recipe))
    return Candidate(recipe=recipe, lr=lr, summary=summarize(recipe))


__all__ = ["Candidate", "suggest", "summarize"]
