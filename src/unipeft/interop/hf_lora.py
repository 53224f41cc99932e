"""HF peft ``LORA`` ↔ unipeft ``lora`` (and ``dora`` for ``use_dora``).

HF tensors per targeted module ``m`` (adapter name stripped): ``m.lora_A.weight`` (r, in), ``m.lora_B.weight``
(out, r), or ``m.lora_embedding_A`` (r, vocab) / ``m.lora_embedding_B`` (dim, r) on an embedding, plus
``m.lora_magnitude_vector`` (out,) with DoRA. The scaling is ``lora_alpha / r`` (``/ √r`` with ``use_rslora``), with
per-module ``rank_pattern`` / ``alpha_pattern``; unipeft makes one delta spec per distinct (r, alpha).

Writing, several unipeft LoRA deltas on one module (e.g. GPT-2's ``attn.q`` and ``attn.v`` slices of ``c_attn``, or a
``scaled`` composition) become one HF LoRA of the summed rank: A = [A₁; A₂], B = [c₁s₁B₁ | c₂s₂B₂] placed on the rows of
each slice (zero elsewhere), with scaling 1 — the same Δ, so the same outputs.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from unipeft.core.modules import is_conv1d, module_dims
from unipeft.core.recipe import DeltaSpec
from unipeft.interop.hf_common import (check_parallel, grouped_specs, rank_alpha_fields, same_everywhere,
                                       target_fields)
from unipeft.interop.hf_match import hf_targets, most_common
from unipeft.interop.hf_method import HFMethod, MethodExport, Placement, TensorPool, register_hf_method
from unipeft.methods.dora import DoRA, DoRAConfig
from unipeft.methods.lora import LoRA, LoRAConfig

#: HF ``init_lora_weights`` values that only set the starting A and B (irrelevant once trained weights are loaded).
PLAIN_INITS = {True: "kaiming", False: "kaiming", "gaussian": "gaussian", "orthogonal": "kaiming", "eva": "kaiming"}
#: Values that also rewrite the base weight; unipeft's LoRA does the same rewrite on attach.
BASE_INITS = ("pissa", "olora")


@register_hf_method
class LoRAMapping(HFMethod):
    """LoRA (Hu et al. 2021) and DoRA (Liu et al. 2024) in HF peft's ``LORA`` format."""

    peft_type = "LORA"
    forms = ("lora", "dora")
    family = "reparameterized"
    paper = "Hu et al. 2021, arXiv 2106.09685"
    handled = frozenset({"r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out",
                         "bias", "use_rslora", "init_lora_weights", "layers_to_transform", "layers_pattern",
                         "rank_pattern", "alpha_pattern", "use_dora", "megatron_core", "qalora_group_size"})
    bias_only = "lora_only"

    # -------------------------------------------------------------------------------------------- reading
    def targets(self, config: Mapping[str, Any], model: nn.Module) -> list[str]:
        return hf_targets(config, model)

    def _init(self, config: Mapping[str, Any]) -> str:
        init = config.get("init_lora_weights", True)
        if init in PLAIN_INITS:
            return PLAIN_INITS[init]
        if init in BASE_INITS:
            if config.get("use_dora"):
                raise ValueError(f"init_lora_weights={init!r} together with use_dora is not supported")
            return init
        raise ValueError(f"HF peft option init_lora_weights={init!r} is not supported: it changes the base weights "
                         f"(or the layer) in a way unipeft does not reproduce; supported: True, False, 'gaussian', "
                         f"'orthogonal', 'eva', {', '.join(map(repr, BASE_INITS))}")

    def to_specs(self, config: Mapping[str, Any], model: nn.Module) -> list[DeltaSpec]:
        init = self._init(config)
        common = dict(dropout=float(config.get("lora_dropout", 0.0)), rslora=bool(config.get("use_rslora", False)))

        def make_form(r: int, alpha: float) -> LoRAConfig | DoRAConfig:
            if config.get("use_dora"):
                return DoRAConfig(r=r, alpha=alpha, **common)
            return LoRAConfig(r=r, alpha=alpha, init=init, **common)

        return grouped_specs(config, model, self.targets(config, model), r_key="r", alpha_key="lora_alpha",
                             r_default=8, alpha_default=8.0, make_form=make_form)

    def load(self, placement: Placement, pool: TensorPool) -> None:
        form, m = placement.placed.form, placement.module
        if isinstance(form, LoRA) and form.embedding:
            a, b = pool.take(f"{m}.lora_embedding_A", form.lora_A.shape), pool.take(f"{m}.lora_embedding_B",
                                                                                    form.lora_B.shape)
        else:
            a, b = pool.take(f"{m}.lora_A.weight", form.lora_A.shape), pool.take(f"{m}.lora_B.weight",
                                                                                 form.lora_B.shape)
        with torch.no_grad():
            form.lora_A.copy_(a)
            form.lora_B.copy_(b)
            if isinstance(form, DoRA):
                form.magnitude.copy_(pool.take(f"{m}.lora_magnitude_vector", form.magnitude.shape))

    # -------------------------------------------------------------------------------------------- writing
    def export(self, placements: Sequence[Placement], model: nn.Module, *,
               modules_to_save: Sequence[str] | None = None) -> MethodExport:
        by_module: dict[str, list[Placement]] = {}
        for p in placements:
            check_parallel(p, "LoRA")
            by_module.setdefault(p.module, []).append(p)
        kinds = {p.form_type for p in placements}
        if kinds == {"lora", "dora"}:
            raise ValueError("this adapter mixes LoRA and DoRA deltas; HF peft's use_dora applies to every module "
                             "of an adapter — save them as two adapters")
        dropout = same_everywhere(placements, "dropout", "LoRA")
        inits = {getattr(p.spec.form, "init", "kaiming") for p in placements}
        base_inits = inits & set(BASE_INITS)
        if base_inits and len(inits) > 1:
            raise ValueError(f"the LoRA deltas of this adapter use different inits {sorted(inits)}, and "
                             f"{sorted(base_inits)} rewrites the base weight; HF peft has one init_lora_weights "
                             "per adapter")

        tensors: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        scalings: dict[str, float] = {}
        native: dict[str, tuple[float, bool]] = {}  # module → (alpha, rslora) where the form's own values carry over
        for module, group in by_module.items():
            embedding = isinstance(group[0].base, nn.Embedding)
            a_key, b_key = (f"{module}.lora_embedding_A", f"{module}.lora_embedding_B") if embedding else \
                (f"{module}.lora_A.weight", f"{module}.lora_B.weight")
            first = group[0]
            exact = len(group) == 1 and first.site.out_slice is None and first.scale == 1.0
            if first.form_type == "dora" or exact or base_inits:
                if not exact:
                    what = "DoRA" if first.form_type == "dora" else f"LoRA with init '{next(iter(base_inits))}'"
                    raise ValueError(f"{what} at {module} is combined with another delta, a scaled composition or a "
                                     "slice of a fused projection; HF peft can only store it alone on a whole module")
                form = first.placed.form
                tensors[a_key], tensors[b_key] = form.lora_A.detach(), form.lora_B.detach()
                if first.form_type == "dora":
                    tensors[f"{module}.lora_magnitude_vector"] = form.magnitude.detach()
                ranks[module], scalings[module] = first.spec.form.r, first.spec.form.scaling
                native[module] = (float(first.spec.form.alpha), bool(first.spec.form.rslora))
                continue
            tensors[a_key], tensors[b_key] = self._combine(group)
            ranks[module], scalings[module] = tensors[a_key].shape[0], 1.0

        targets = list(by_module)
        rslora = most_common([rs for _, rs in native.values()]) if native else False
        alphas = {m: native[m][0] if m in native and native[m][1] == rslora else
                  _alpha_for(scalings[m], ranks[m], rslora) for m in targets}
        config: dict[str, Any] = rank_alpha_fields(ranks, alphas, targets, r_key="r", alpha_key="lora_alpha")
        config.update(target_fields(targets, model, modules_to_save))
        config.update({
            "lora_dropout": dropout,
            "use_rslora": rslora,
            "use_dora": kinds == {"dora"},
            "fan_in_fan_out": any(is_conv1d(p.base) for p in placements),
            "init_lora_weights": next(iter(base_inits)) if base_inits else
            ("gaussian" if inits == {"gaussian"} else True),
        })
        return MethodExport(config=config, tensors=tensors, targets=targets)

    @staticmethod
    def _combine(group: Sequence[Placement]) -> tuple[torch.Tensor, torch.Tensor]:
        """One (A, B) of the summed rank with scaling 1 for several LoRA deltas on one module."""
        if any(p.form_type != "lora" for p in group):
            raise ValueError(f"{group[0].module} has several deltas that are not all LoRA; HF peft has one LoRA "
                             "layer per module")
        d_out = group[0].placed.form.lora_B.shape[0] if all(p.site.out_slice is None for p in group) else \
            module_dims(group[0].base)[1]
        a_parts, b_parts = [], []
        for p in group:
            form = p.placed.form
            b = torch.zeros(d_out, form.lora_B.shape[1], dtype=form.lora_B.dtype)
            rows = p.site.out_slice or (0, d_out)
            b[rows[0]:rows[1]] = form.lora_B.detach() * (p.scale * form.scaling)
            a_parts.append(form.lora_A.detach())
            b_parts.append(b)
        return torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)


def _alpha_for(scaling: float, r: int, rslora: bool) -> float:
    """The lora_alpha that gives ``scaling`` at rank ``r``."""
    return scaling * (math.sqrt(r) if rslora else r)


__all__ = ["LoRAMapping"]
