"""HF peft ``ADALORA`` ↔ unipeft ``adalora``.

HF stores per targeted module ``m`` the SVD-form factors ``m.lora_A`` (r, in), ``m.lora_E`` (r, 1) and ``m.lora_B``
(out, r), with the scaling ``lora_alpha / (init_r + 1e-5)``. After rank reallocation HF keeps only the surviving
triplets: ``rank_pattern`` maps ``<m>.lora_E`` to init_r booleans and the tensors hold the kept rows. unipeft keeps
all init_r triplets with a ``rank_mask`` (pruned λ = 0), so reading scatters the kept rows back (the pruned triplets
get zeros) and writing gathers them. The allocator's importance statistics are not part of either file.

``total_step`` is a training-schedule setting (unipeft passes it to ``Peft.on_step``); a written config gets the
smallest value HF accepts, ``tinit + tfinal + 1`` — set the real one before training further with HF peft.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from unipeft.core.modules import is_conv1d
from unipeft.core.recipe import DeltaSpec
from unipeft.interop.hf_common import preferred_targets, same_everywhere, target_fields, whole_module_placements
from unipeft.interop.hf_match import hf_targets, unipeft_modules
from unipeft.interop.hf_method import HFMethod, MethodExport, Placement, TensorPool, register_hf_method
from unipeft.methods.adalora import AdaLoRAConfig

#: AdaLoRA hyperparameters with the same name in HF's config and unipeft's form.
SAME_NAMES = ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight")


@register_hf_method
class AdaLoRAMapping(HFMethod):
    """AdaLoRA (Zhang et al. 2023) in HF peft's ``ADALORA`` format."""

    peft_type = "ADALORA"
    forms = ("adalora",)
    family = "reparameterized"
    paper = "Zhang et al. 2023, arXiv 2303.10512"
    handled = frozenset({"r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out",
                         "bias", "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern",
                         "total_step", "megatron_core", "qalora_group_size", *SAME_NAMES})
    bias_only = "lora_only"

    def targets(self, config: Mapping[str, Any], model: nn.Module) -> list[str]:
        return hf_targets(config, model)

    def to_specs(self, config: Mapping[str, Any], model: nn.Module) -> list[DeltaSpec]:
        targets = self.targets(config, model)
        if not targets:
            raise ValueError(f"target_modules {config.get('target_modules')!r} match no module of this model")
        if config.get("init_lora_weights", True) not in (True, False):
            raise ValueError(f"HF peft option init_lora_weights={config['init_lora_weights']!r} is not supported "
                             "for ADALORA")
        defaults = AdaLoRAConfig()
        form = AdaLoRAConfig(alpha=float(config.get("lora_alpha", 8)), dropout=float(config.get("lora_dropout", 0.0)),
                             **{k: type(getattr(defaults, k))(config.get(k, getattr(defaults, k))) for k in SAME_NAMES})
        return [DeltaSpec(form=form, modules=unipeft_modules(model, targets, preferred_targets(config, model)))]

    def load(self, placement: Placement, pool: TensorPool) -> None:
        form, m = placement.placed.form, placement.module
        mask = torch.ones(form.r, dtype=torch.bool)
        pattern = (pool.config.get("rank_pattern") or {}).get(f"{m}.lora_E")
        if pattern is not None:
            if len(pattern) != form.r:
                raise ValueError(f"rank_pattern of {m} has {len(pattern)} entries, but init_r is {form.r}")
            mask = torch.tensor(pattern, dtype=torch.bool)
        kept = int(mask.sum())
        a = pool.take(f"{m}.lora_A", (kept, form.lora_A.shape[1]))
        e = pool.take(f"{m}.lora_E", (kept, 1))
        b = pool.take(f"{m}.lora_B", (form.lora_B.shape[0], kept))
        with torch.no_grad():
            form.lora_A.zero_()[mask] = a
            form.lora_E.zero_()[mask] = e
            form.lora_B.zero_()[:, mask] = b
        form.mask_ranks_(mask)

    def export(self, placements: Sequence[Placement], model: nn.Module, *,
               modules_to_save: Sequence[str] | None = None) -> MethodExport:
        by_module = whole_module_placements(placements, "AdaLoRA")
        values = {f: same_everywhere(placements, f, "AdaLoRA") for f in (*SAME_NAMES, "alpha", "dropout")}
        pruned = any(not bool(p.placed.form.rank_mask.all()) for p in placements)
        tensors, pattern = {}, {}
        for m, p in by_module.items():
            form = p.placed.form
            mask = form.rank_mask.bool().cpu() if pruned else torch.ones(form.r, dtype=torch.bool)
            tensors[f"{m}.lora_A"] = form.lora_A.detach().cpu()[mask]
            tensors[f"{m}.lora_E"] = form.lora_E.detach().cpu()[mask] * p.scale
            tensors[f"{m}.lora_B"] = form.lora_B.detach().cpu()[:, mask]
            if pruned:
                pattern[f"{m}.lora_E"] = mask.tolist()
        targets = list(by_module)
        config = {**{k: values[k] for k in SAME_NAMES}, "lora_alpha": values["alpha"],
                  "lora_dropout": values["dropout"], "rank_pattern": pattern or None,
                  "total_step": values["tinit"] + values["tfinal"] + 1,
                  "fan_in_fan_out": any(is_conv1d(p.base) for p in placements),
                  **target_fields(targets, model, modules_to_save)}
        return MethodExport(config=config, tensors=tensors, targets=targets)


__all__ = ["AdaLoRAMapping"]
