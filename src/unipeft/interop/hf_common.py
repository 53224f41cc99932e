"""Pieces shared by the per-method mappings: per-module rank/alpha groups, whole-module placements, target fields and
tensors stored under the form's own parameter names."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from unipeft.core.compose import Add, Scaled
from unipeft.core.delta import FormConfig
from unipeft.core.recipe import DeltaSpec
from unipeft.interop.hf_match import (ALL_LINEAR, compress_pattern, compress_targets, hf_targets, linear_module_names,
                                      most_common, pattern_value, unipeft_modules)
from unipeft.interop.hf_method import Placement, TensorPool


def check_parallel(p: Placement, method: str) -> None:
    """Refuse a placement HF peft cannot express: not parallel on the module's own input, or a gated composition.

    Raises:
        ValueError: naming the module, the insertion/composition and why.
    """
    if p.placed.insertion != "parallel" or p.placed.source != "module":
        raise ValueError(f"{p.form_type} at {p.module} uses insertion '{p.placed.insertion}' "
                         f"(source {p.placed.source}); HF peft's {method} only adds Δ(x) of the module's own input "
                         "in parallel")
    if not isinstance(p.placed.compose, (Add, Scaled)):
        raise ValueError(f"{p.form_type} at {p.module} uses composition '{type(p.placed.compose).__name__.lower()}'; "
                         f"HF peft's {method} has no gate (only a fixed scaling)")


def whole_module_placements(placements: Sequence[Placement], method: str) -> dict[str, Placement]:
    """Module → its one placement, for methods HF stores as one layer per whole module.

    Raises:
        ValueError: for two deltas on one module, a slice of a fused projection, or a non-parallel placement.
    """
    out: dict[str, Placement] = {}
    for p in placements:
        check_parallel(p, method)
        if p.module in out:
            raise ValueError(f"{p.module} has two {method} deltas; HF peft has one {method} layer per module")
        if p.site.out_slice is not None:
            raise ValueError(f"{method} at {p.module} modifies output features {p.site.out_slice[0]}:"
                             f"{p.site.out_slice[1]} of a fused projection; HF peft's {method} adapts whole modules "
                             "(target the whole module, e.g. modules: [c_attn])")
        out[p.module] = p
    return out


def preferred_targets(config: Mapping[str, Any], model: nn.Module) -> str | list[str] | None:
    """The config's ``target_modules`` as a unipeft pattern candidate (``all-linear`` expanded)."""
    targets = config.get("target_modules")
    return linear_module_names(model) if targets == ALL_LINEAR else targets


def grouped_specs(config: Mapping[str, Any], model: nn.Module, targets: Sequence[str], *, r_key: str,
                  alpha_key: str | None, r_default: int, alpha_default: float,
                  make_form: Callable[[int, float], FormConfig]) -> list[DeltaSpec]:
    """One delta spec per distinct (r, alpha) of the targets under ``rank_pattern`` / ``alpha_pattern``.

    Raises:
        ValueError: if the targets are empty.
    """
    if not targets:
        raise ValueError(f"target_modules {config.get('target_modules')!r} match no module of this model")
    r0 = int(config.get(r_key, r_default))
    alpha0 = float(config.get(alpha_key, alpha_default)) if alpha_key else alpha_default
    groups: dict[tuple[int, float], list[str]] = {}
    for name in targets:
        r = int(pattern_value(config.get("rank_pattern"), name, r0))
        alpha = float(pattern_value(config.get("alpha_pattern"), name, alpha0)) if alpha_key else alpha0
        groups.setdefault((r, alpha), []).append(name)
    preferred = preferred_targets(config, model) if len(groups) == 1 else None
    return [DeltaSpec(form=make_form(r, alpha), modules=unipeft_modules(model, names, preferred))
            for (r, alpha), names in groups.items()]


def plain_number(value: float) -> float | int:
    """An integral float as an int (HF configs write lora_alpha: 16)."""
    return int(value) if float(value).is_integer() else float(value)


def rank_alpha_fields(ranks: Mapping[str, int], alphas: Mapping[str, float] | None, targets: Sequence[str], *,
                      r_key: str, alpha_key: str | None) -> dict[str, Any]:
    """Global r/alpha (the most common) and ``rank_pattern`` / ``alpha_pattern`` for the other modules."""
    r = most_common([ranks[m] for m in targets])
    fields: dict[str, Any] = {r_key: r, "rank_pattern": compress_pattern(ranks, r, targets)}
    if alpha_key and alphas is not None:
        alpha = most_common([alphas[m] for m in targets])
        fields[alpha_key] = plain_number(alpha)
        fields["alpha_pattern"] = {k: plain_number(v) for k, v in compress_pattern(alphas, alpha, targets).items()}
    return fields


def target_fields(targets: Sequence[str], model: nn.Module, modules_to_save: Sequence[str] | None, *,
                  layered: bool = True) -> dict[str, Any]:
    """``target_modules`` (and maybe ``layers_to_transform``) selecting exactly ``targets`` under HF's rules."""
    return compress_targets(targets, lambda f: hf_targets({**f, "modules_to_save": modules_to_save}, model,
                                                          layered=layered), layered=layered)


def same_everywhere(placements: Sequence[Placement], field: str, method: str) -> Any:
    """The value of a form hyperparameter that HF peft holds once per adapter.

    Raises:
        ValueError: if the deltas disagree on it.
    """
    values = {getattr(p.spec.form, field) for p in placements}
    if len(values) > 1:
        raise ValueError(f"the {method} deltas of this adapter use different {field} values {sorted(values)}; "
                         f"HF peft has one {field} per adapter")
    return values.pop()


def load_named(p: Placement, pool: TensorPool, names: Sequence[str]) -> None:
    """Copy ``<module>.<name>`` from the file into the form's parameter ``name``, for each name."""
    form = p.placed.form
    with torch.no_grad():
        for name in names:
            param = getattr(form, name)
            param.copy_(pool.take(f"{p.module}.{name}", param.shape))


def named_tensors(p: Placement, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """``<module>.<name>`` → the form's parameter ``name``, for each name."""
    return {f"{p.module}.{name}": getattr(p.placed.form, name).detach() for name in names}


__all__ = ["check_parallel", "grouped_specs", "load_named", "named_tensors", "plain_number", "preferred_targets",
           "rank_alpha_fields", "same_everywhere", "target_fields", "whole_module_placements"]
