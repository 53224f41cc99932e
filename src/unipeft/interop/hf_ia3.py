"""HF peft ``IA3`` ↔ unipeft ``ia3``.

HF stores one vector per targeted module ``m`` as ``m.ia3_l``: shape (out, 1) scaling the module's output
(unipeft insertion ``multiplicative``), or (1, in) scaling its input for the modules matched by
``feedforward_modules`` (``multiplicative_input``). unipeft keeps the vector flat, (d,).

Writing, several (IA)³ vectors on one module (GPT-2's key and value slices of ``c_attn``) multiply into one vector,
with ones outside the slices.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from unipeft.core.modules import is_conv1d, module_dims
from unipeft.core.recipe import DeltaSpec
from unipeft.interop.hf_match import (ALL_LINEAR, compress_endswith, compress_targets, endswith_match, hf_targets,
                                      linear_module_names, unipeft_modules)
from unipeft.interop.hf_method import HFMethod, MethodExport, Placement, TensorPool, register_hf_method
from unipeft.methods.ia3 import IA3Config


@register_hf_method
class IA3Mapping(HFMethod):
    """(IA)³ (Liu et al. 2022) in HF peft's ``IA3`` format."""

    peft_type = "IA3"
    forms = ("ia3",)
    family = "additive"
    paper = "Liu et al. 2022, arXiv 2205.05638"
    handled = frozenset({"target_modules", "exclude_modules", "feedforward_modules", "fan_in_fan_out",
                         "init_ia3_weights"})

    def targets(self, config: Mapping[str, Any], model: nn.Module) -> list[str]:
        return hf_targets(config, model, layered=False)

    def _feedforward(self, config: Mapping[str, Any], targets: Sequence[str]) -> list[str]:
        ff = config.get("feedforward_modules")
        if ff is None:
            raise ValueError("this IA3 config has no feedforward_modules (HF peft fills them in from its per-model "
                             "defaults when it creates an adapter; set them explicitly, [] for none)")
        return endswith_match(targets, ff)

    def to_specs(self, config: Mapping[str, Any], model: nn.Module) -> list[DeltaSpec]:
        targets = self.targets(config, model)
        if not targets:
            raise ValueError(f"target_modules {config.get('target_modules')!r} match no module of this model")
        ff = set(self._feedforward(config, targets))
        out_names = [n for n in targets if n not in ff]
        ff_names = [n for n in targets if n in ff]
        preferred = config.get("target_modules")
        if preferred == ALL_LINEAR:
            preferred = linear_module_names(model)
        specs = []
        if out_names:
            specs.append(DeltaSpec(form=IA3Config(), insertion="multiplicative",
                                   modules=unipeft_modules(model, out_names, None if ff_names else preferred)))
        if ff_names:
            specs.append(DeltaSpec(form=IA3Config(), insertion="multiplicative_input",
                                   modules=unipeft_modules(model, ff_names, config["feedforward_modules"])))
        return specs

    def load(self, placement: Placement, pool: TensorPool) -> None:
        vector = placement.placed.form.ia3_l
        feedforward = placement.placed.insertion == "multiplicative_input"
        shape = (1, vector.shape[0]) if feedforward else (vector.shape[0], 1)
        with torch.no_grad():
            vector.copy_(pool.take(f"{placement.module}.ia3_l", shape).reshape(-1))

    def export(self, placements: Sequence[Placement], model: nn.Module, *,
               modules_to_save: Sequence[str] | None = None) -> MethodExport:
        by_module: dict[str, list[Placement]] = {}
        for p in placements:
            by_module.setdefault(p.module, []).append(p)
        tensors: dict[str, torch.Tensor] = {}
        feedforward: list[str] = []
        for module, group in by_module.items():
            insertions = {p.placed.insertion for p in group}
            if len(insertions) > 1:
                raise ValueError(f"(IA)³ at {module} scales both the module's input and its output; HF peft's IA3 "
                                 "scales one of them per module")
            ff = insertions == {"multiplicative_input"}
            d_in, d_out = module_dims(group[0].base)
            vector = torch.ones(d_in if ff else d_out)
            for p in group:
                start, stop = p.site.out_slice or (0, vector.shape[0])
                vector[start:stop] = vector[start:stop] * p.placed.form.ia3_l.detach()
            tensors[f"{module}.ia3_l"] = vector[None, :] if ff else vector[:, None]
            if ff:
                feedforward.append(module)
        targets = list(by_module)
        fields = compress_targets(targets, lambda f: hf_targets({**f, "modules_to_save": modules_to_save}, model),
                                  layered=False)
        ff_value = compress_endswith(feedforward, targets) if feedforward else []
        if isinstance(fields["target_modules"], list) and isinstance(ff_value, list) and \
                not set(ff_value) <= set(fields["target_modules"]):
            # HF peft requires feedforward_modules ⊆ target_modules when both are lists: use full names for both
            fields, ff_value = {"target_modules": targets}, list(feedforward)
            if sorted(hf_targets({**fields, "modules_to_save": modules_to_save}, model, layered=False)) != \
                    sorted(targets):
                raise ValueError(f"cannot write target_modules selecting exactly {targets[:4]} ... for HF peft")
        config = {**fields, "feedforward_modules": ff_value,
                  "fan_in_fan_out": any(is_conv1d(p.base) for p in placements)}
        return MethodExport(config=config, tensors=tensors, targets=targets)


__all__ = ["IA3Mapping"]
