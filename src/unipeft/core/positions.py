"""Resolving positions and raw module patterns to concrete sites of a model.

A :class:`Site` is one place where a delta is inserted: the module that is wrapped (``module``), the module whose
input a parallel sub-layer delta reads (``entry``), and, for a fused projection, the slice of its output features.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from torch import nn

from unipeft.core.archmaps import ArchMap, FusedSlice, Stack, Sublayer, Target, arch_map_for
from unipeft.core.detect import detect_arch_map
from unipeft.core.site import base_named_modules

MODEL_POSITIONS = ("embed", "head")
#: The whole layer: every module inside it that holds parameters of its own (last-k-layers tuning copies them all).
LAYER = "layer"


@dataclass(frozen=True, kw_only=True)
class Site:
    """One concrete insertion point.

    Attributes:
        position: canonical position name, or ``"module"`` for a raw pattern match.
        module: full name of the module that gets wrapped.
        entry: full name of the module whose input parallel sub-layer deltas read, or None.
        stack: name of the layer stack (``encoder``/``decoder``), or None for model-level sites.
        layer: layer index in its stack, or None.
        out_slice: (start, stop) of the output features the delta modifies, or None for all.
    """

    position: str
    module: str
    entry: str | None = None
    stack: str | None = None
    layer: int | None = None
    out_slice: tuple[int, int] | None = None


def model_arch_map(model: nn.Module) -> ArchMap:
    """The architecture table of a model: a known family by ``config.model_type``, else detected by structure."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return arch_map_for(model_type) or detect_arch_map(model)


def _stack_layers(names: Sequence[str], stack: Stack) -> list[str]:
    pattern = re.compile(rf"(?:.*\.)?{stack.layers}\.(\d+)")
    layers: dict[int, str] = {}
    for name in names:
        match = pattern.fullmatch(name)
        if match:
            layers[int(match.group(1))] = name
    return [layers[i] for i in sorted(layers)]


def available_positions(model: nn.Module) -> list[str]:
    """The canonical positions this model has (those that resolve to at least one site)."""
    arch = model_arch_map(model)
    names = {name for name, _ in base_named_modules(model)}
    found: list[str] = []
    for stack in arch.stacks:
        layers = _stack_layers(sorted(names), stack)
        if not layers:
            continue
        for position, target in stack.positions.items():
            if position not in found and _target_exists(f"{layers[0]}.", target, names):
                found.append(position)
        if LAYER not in found:
            found.append(LAYER)
    for position, suffixes in arch.model_positions.items():
        if any(_suffix_match(name, s) for name in names for s in suffixes):
            found.append(position)
    return found


def _suffix_match(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _target_exists(prefix: str, target: Target, names: set[str]) -> bool:
    if isinstance(target, str):
        return prefix + target in names
    if isinstance(target, Sublayer):
        return prefix + target.exit in names and prefix + target.entry in names
    if isinstance(target, FusedSlice):
        return prefix + target.module in names
    return any(prefix + t in names for t in target)


def _select_layers(layers: list[str], wanted: Sequence[int] | None, stack: str) -> list[tuple[int, str]]:
    indexed = list(enumerate(layers))
    if wanted is None:
        return indexed
    picked: list[tuple[int, str]] = []
    for i in wanted:
        if not -len(layers) <= i < len(layers):
            raise ValueError(f"layer {i} is out of range for stack '{stack}' with {len(layers)} layers "
                             f"(valid: {-len(layers)}..{len(layers) - 1})")
        picked.append(indexed[i])
    return sorted(set(picked))


def _fused_slice(model: nn.Module, name: str, target: FusedSlice) -> tuple[int, int]:
    from unipeft.core.modules import module_dims

    _, out = module_dims(dict(base_named_modules(model))[name])
    width = out // target.parts
    return (target.index * width, (target.index + 1) * width)


#: Suffix of an optional position name (see :func:`resolve_positions`).
OPTIONAL = "?"


def resolve_positions(
    model: nn.Module,
    positions: Iterable[str],
    *,
    layers: Sequence[int] | None = None,
    stacks: Sequence[str] | None = None,
) -> list[Site]:
    """Resolve canonical position names to sites.

    Args:
        model: the model.
        positions: canonical names such as ``attn.q`` or ``ffn``; a name ending in ``?`` (``xattn?``) is optional:
            it resolves to nothing on a model without that position instead of raising.
        layers: layer indices (negative counts from the end) in every selected stack; None for all layers.
        stacks: stack names to use (``encoder``/``decoder``); None for all.

    Raises:
        ValueError: for an unknown position (the message lists the positions this model has), an unknown stack
            (the message lists the model's stacks) or a layer out of range.
    """
    arch = model_arch_map(model)
    names = [name for name, _ in base_named_modules(model)]
    name_set = set(names)
    valid = available_positions(model)
    stack_names = [s.name for s in arch.stacks]
    unknown_stacks = [s for s in stacks or () if s not in stack_names]
    if unknown_stacks:
        raise ValueError(f"unknown stack(s) {', '.join(map(repr, unknown_stacks))}; this model ({arch.family}) "
                         f"has: {', '.join(stack_names)}")
    sites: list[Site] = []
    for position in positions:
        optional = position.endswith(OPTIONAL)
        position = position.removesuffix(OPTIONAL)
        if position not in valid:
            if optional:
                continue  # ``xattn?``: where the model has it (cross-attention exists in encoder-decoders only)
            raise ValueError(f"unknown position '{position}'; this model ({arch.family}) has: {', '.join(valid)}")
        if position in arch.model_positions:
            matched = [n for n in names for s in arch.model_positions[position] if _suffix_match(n, s)]
            sites.extend(Site(position=position, module=n) for n in matched[:1])
            continue
        for stack in arch.stacks:
            if stacks is not None and stack.name not in stacks:
                continue
            target = stack.positions.get(position)
            stack_layers = _stack_layers(names, stack)
            if position == LAYER and stack_layers:
                for index, layer in _select_layers(stack_layers, layers, stack.name):
                    sites.extend(_layer_sites(model, stack.name, index, layer))
                continue
            if target is None or not stack_layers:
                continue
            for index, layer in _select_layers(stack_layers, layers, stack.name):
                sites.extend(_sites_for(model, position, stack.name, index, f"{layer}.", target, name_set))
    return sites


def _layer_sites(model: nn.Module, stack: str, index: int, layer: str) -> list[Site]:
    """One site per module inside ``layer`` with parameters of its own (never one inside another picked one)."""
    picked: list[str] = []
    for name, module in base_named_modules(model):  # parents come before their children
        if name.startswith(f"{layer}.") and next(module.parameters(recurse=False), None) is not None \
                and not any(name.startswith(f"{p}.") for p in picked):
            picked.append(name)
    return [Site(position=LAYER, module=n, stack=stack, layer=index) for n in picked]


def _sites_for(model: nn.Module, position: str, stack: str, index: int, prefix: str, target: Target,
               names: set[str]) -> list[Site]:
    common = dict(position=position, stack=stack, layer=index)
    if isinstance(target, str):
        return [Site(module=prefix + target, **common)]
    if isinstance(target, Sublayer):
        return [Site(module=prefix + target.exit, entry=prefix + target.entry, **common)]
    if isinstance(target, FusedSlice):
        name = prefix + target.module
        return [Site(module=name, out_slice=_fused_slice(model, name, target), **common)]
    return [Site(module=prefix + t, **common) for t in target if prefix + t in names]


def resolve_patterns(model: nn.Module, patterns: str | Sequence[str]) -> list[Site]:
    """Resolve raw module-name patterns, with HF ``peft``'s ``target_modules`` semantics.

    A string is a regular expression that must match a full module name; a list holds exact names or suffixes
    (``"query"`` matches ``...attention.self.query``).

    Raises:
        ValueError: if nothing matches; the message shows the model's leaf module names.
    """
    modules = [(n, m) for n, m in base_named_modules(model) if n]
    names = [n for n, _ in modules]
    if isinstance(patterns, str):
        regex = re.compile(patterns)
        matched = [n for n in names if regex.fullmatch(n)]
    else:
        matched = [n for n in names if any(_suffix_match(n, p) for p in patterns)]
    if not matched:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in modules if not list(m.children())})
        raise ValueError(f"module pattern {patterns!r} matches no module of this model; "
                         f"its leaf module names are: {', '.join(leaves)}")
    return [Site(position="module", module=n) for n in matched]
