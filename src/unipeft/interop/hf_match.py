"""Hugging Face peft's module-matching rules, both ways.

Reading: which modules an HF config targets (``target_modules`` as suffixes or a regex, ``exclude_modules``,
``layers_to_transform`` with ``layers_pattern``, ``modules_to_save``, per-module ``rank_pattern``/``alpha_pattern``),
reproduced from peft 0.21's ``check_target_module_exists``, ``get_pattern_key`` and ``_set_trainable`` so that a
config selects the same modules here as in HF peft.

Writing: the reverse — the shortest ``target_modules`` (module-name suffixes, then suffixes with
``layers_to_transform``, then full names) that selects exactly a given set of modules under those same rules, and the
unipeft ``modules:`` pattern that resolves to exactly a given set of modules.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Callable, Mapping, Sequence

from torch import nn

from unipeft.core.modules import is_conv1d
from unipeft.core.positions import resolve_patterns
from unipeft.core.site import base_named_modules

#: HF peft's shorthand for "every linear layer but the output layer".
ALL_LINEAR = "all-linear"


def model_module_names(model: nn.Module) -> list[str]:
    """Every module name of ``model`` as HF peft sees it (adapters attached by unipeft are seen through)."""
    return [name for name, _ in base_named_modules(model) if name]


def _suffix(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def layer_index(name: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    """The layer index HF peft reads from a module name (the first numbered segment, or the one after a pattern)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def in_modules_to_save(name: str, modules_to_save: Sequence[str] | None) -> bool:
    """Whether HF peft keeps adapters off ``name`` because it is (inside) a ``modules_to_save`` module."""
    return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in modules_to_save or ())


def linear_module_names(model: nn.Module) -> list[str]:
    """The last name components of every Linear/Conv1D module but the output layer (``all-linear``)."""
    modules = dict(base_named_modules(model))
    output = getattr(model, "get_output_embeddings", lambda: None)()
    found = {n.rsplit(".", 1)[-1] for n, m in modules.items() if n and (isinstance(m, nn.Linear) or is_conv1d(m))
             and m is not output}
    return sorted(found)


def hf_targets(config: Mapping[str, Any], model: nn.Module, *, layered: bool = True) -> list[str]:
    """Full names of the modules an HF config's ``target_modules`` selects, in model order.

    Args:
        config: the HF adapter config (a dict).
        model: the base model.
        layered: whether the method honours ``layers_to_transform`` (IA³ has no such option).

    Raises:
        ValueError: if the config has no ``target_modules``.
    """
    targets = config.get("target_modules")
    if not targets:
        raise ValueError(f"this {config.get('peft_type')} config has no target_modules (HF peft fills them in from its "
                         "per-model defaults when it creates an adapter; set them explicitly)")
    if targets == ALL_LINEAR:
        targets = linear_module_names(model)
    exclude = config.get("exclude_modules")
    layers = config.get("layers_to_transform") if layered else None
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for name in model_module_names(model):
        if exclude and (re.fullmatch(exclude, name) if isinstance(exclude, str) else
                        any(_suffix(name, e) for e in exclude)):
            continue
        if in_modules_to_save(name, config.get("modules_to_save")):
            continue
        if isinstance(targets, str):
            if re.fullmatch(targets, name):
                out.append(name)
            continue
        if name in targets:  # a full name is taken as is, whatever the layer selection
            out.append(name)
            continue
        if not any(name.endswith("." + t) for t in targets):
            continue
        if layers:
            index = layer_index(name, config.get("layers_pattern"))
            if index is None or index not in layers:
                continue
        out.append(name)
    return out


def pattern_value(patterns: Mapping[str, Any] | None, name: str, default: Any) -> Any:
    """The value of ``rank_pattern`` / ``alpha_pattern`` for module ``name`` (HF's ``get_pattern_key``)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def endswith_match(names: Sequence[str], targets: str | Sequence[str]) -> list[str]:
    """Names selected by HF's plain ``endswith`` rule (``modules_to_save``, IA³'s ``feedforward_modules``),
    or by ``re.fullmatch`` for a string."""
    if isinstance(targets, str):
        return [n for n in names if re.fullmatch(targets, n)]
    return [n for n in names if any(n.endswith(t) for t in targets)]


def modules_to_save_names(model: nn.Module, modules_to_save: Sequence[str] | None) -> list[str]:
    """Full names of the modules HF peft wraps for ``modules_to_save`` (outermost matches only)."""
    matched = endswith_match(model_module_names(model), list(modules_to_save or ()))
    return [n for n in matched if not any(n.startswith(m + ".") for m in matched)]


# --------------------------------------------------------------------------------------------------- writing
def compress_targets(names: Sequence[str], check: Callable[[dict[str, Any]], list[str]], *,
                     layered: bool = True) -> dict[str, Any]:
    """The simplest HF config fields (``target_modules`` and maybe ``layers_to_transform``) selecting ``names``.

    Args:
        names: full module names to select.
        check: maps candidate fields to the names they select under HF's rules (the caller's model and options).
        layered: whether ``layers_to_transform`` may be used.

    Raises:
        RuntimeError: if no candidate selects exactly ``names`` (should not happen: full names always do).
    """
    wanted = list(names)
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in wanted})
    candidates: list[dict[str, Any]] = [{"target_modules": suffixes}]
    if layered:
        indices = sorted({i for i in (layer_index(n, None) for n in wanted) if i is not None})
        if indices:
            candidates.append({"target_modules": suffixes, "layers_to_transform": indices})
    candidates.append({"target_modules": list(wanted)})
    candidates.append({"target_modules": "|".join(re.escape(n) for n in wanted)})
    for fields in candidates:
        if sorted(check(fields)) == sorted(wanted):
            return fields
    raise RuntimeError(f"no target_modules selects exactly {wanted[:5]} ...")


def compress_endswith(names: Sequence[str], universe: Sequence[str]) -> list[str] | str:
    """The simplest list (or regex) that HF's plain ``endswith`` rule maps to exactly ``names`` within ``universe``."""
    wanted = sorted(names)
    for candidate in (sorted({n.rsplit(".", 1)[-1] for n in names}), list(names)):
        if sorted(endswith_match(universe, candidate)) == wanted:
            return candidate
    return "|".join(re.escape(n) for n in names)


def compress_pattern(values: Mapping[str, Any], default: Any, targets: Sequence[str]) -> dict[str, Any]:
    """A ``rank_pattern``/``alpha_pattern`` dict giving each target its value (``default`` elsewhere).

    Uses a module-name suffix as key where every target with that suffix shares the value, else full names
    (escaped if a plain full name would match another target).
    """
    groups: dict[str, set[Any]] = {}
    for name in targets:
        groups.setdefault(name.rsplit(".", 1)[-1], set()).add(values[name])
    pattern: dict[str, Any] = {}
    for name in targets:
        value = values[name]
        if value == default:
            continue
        suffix = name.rsplit(".", 1)[-1]
        if groups[suffix] == {value}:
            pattern.setdefault(suffix, value)
        else:
            pattern[name] = value
    if all(pattern_value(pattern, n, default) == values[n] for n in targets):
        return pattern
    exact = {re.escape(n): values[n] for n in targets if values[n] != default}
    return exact


def most_common(values: Sequence[Any]) -> Any:
    """The most frequent value (the first seen among ties)."""
    counts = Counter(values)
    best = max(counts.values())
    return next(v for v in values if counts[v] == best)


def unipeft_modules(model: nn.Module, names: Sequence[str],
                    preferred: str | Sequence[str] | None = None) -> str | tuple[str, ...]:
    """A unipeft ``modules:`` pattern resolving to exactly ``names``: ``preferred`` (an HF ``target_modules``) if it
    does, else the full names, else a regex of them."""
    wanted = sorted(names)
    candidates: list[str | tuple[str, ...]] = []
    if preferred:
        candidates.append(preferred if isinstance(preferred, str) else tuple(preferred))
    candidates.append(tuple(names))
    for candidate in candidates:
        try:
            found = sorted(s.module for s in resolve_patterns(model, candidate))
        except ValueError:
            continue
        if found == wanted:
            return candidate
    return "|".join(re.escape(n) for n in names)


__all__ = ["ALL_LINEAR", "compress_endswith", "compress_pattern", "compress_targets", "endswith_match", "hf_targets",
           "in_modules_to_save", "layer_index", "linear_module_names", "model_module_names", "modules_to_save_names",
           "most_common", "pattern_value", "unipeft_modules"]
