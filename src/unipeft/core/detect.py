"""Detecting an architecture map from module structure, for families that have no table.

The detector finds the longest ``ModuleList`` of identical blocks and, inside its first block, looks up each position
by the usual names of the field (``q_proj``/``query``/``q``, ``o_proj``/``out_proj``, ``up_proj``/``fc1``, ...).
"""

from __future__ import annotations

from torch import nn

from unipeft.core.archmaps import ArchMap, Stack, Sublayer, Target

_SYNONYMS: dict[str, tuple[str, ...]] = {
    "attn.q": ("q_proj", "query", "q", "wq", "q_lin"),
    "attn.k": ("k_proj", "key", "k", "wk", "k_lin"),
    "attn.v": ("v_proj", "value", "v", "wv", "v_lin"),
    "attn.o": ("o_proj", "out_proj", "wo", "out_lin", "dense"),
    "ffn.gate": ("gate_proj", "w1"),
    "ffn.up": ("up_proj", "fc1", "c_fc", "lin1", "w3"),
    "ffn.down": ("down_proj", "fc2", "lin2", "w2"),
}
_ATTN_PARENTS = ("attn", "attention", "self_attn", "self_attention", "SelfAttention")


def _find(block: nn.Module, leaves: tuple[str, ...], *, attention: bool) -> str | None:
    for name, module in block.named_modules():
        parts = name.split(".")
        if parts[-1] in leaves and isinstance(module, nn.Linear):
            in_attention = any(p in _ATTN_PARENTS for p in parts[:-1])
            if in_attention == attention:
                return name
    return None


def detect_arch_map(model: nn.Module) -> ArchMap:
    """Build an :class:`ArchMap` for an unknown family from its module structure.

    Raises:
        ValueError: if the model has no list of repeated blocks (the error suggests raw module patterns).
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(m) for m in module}
            if len(kinds) == 1 and (best is None or len(module) > len(best[1])):
                best = (name, module)
    if best is None:
        raise ValueError(f"cannot find a stack of transformer layers in {type(model).__name__}; "
                         "target modules by name instead (modules: [...] in the recipe)")
    list_name, layers = best
    block = layers[0]
    positions: dict[str, Target] = {}
    for position, leaves in _SYNONYMS.items():
        found = _find(block, leaves, attention=position.startswith("attn"))
        if found:
            positions[position] = found
    if "attn.o" in positions:
        parent = positions["attn.o"].rsplit(".", 1)[0] if "." in positions["attn.o"] else ""
        if parent:
            positions["attn"] = Sublayer(entry=parent, exit=positions["attn.o"])
    if "ffn.down" in positions and "ffn.up" in positions:
        up = positions.get("ffn.gate", positions["ffn.up"])
        positions["ffn"] = Sublayer(entry=up, exit=positions["ffn.down"])
    norms = tuple(n for n, m in block.named_modules() if n and "norm" in type(m).__name__.lower())
    if norms:
        positions["norm"] = norms
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    pattern = list_name.replace(".", r"\.")
    return ArchMap(family=f"detected:{model_type}", model_types=(), stacks=(
        Stack(name="layers", layers=pattern, positions=positions),))
