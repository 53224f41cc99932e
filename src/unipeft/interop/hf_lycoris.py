"""HF peft ``LOHA`` ↔ unipeft ``loha`` and HF peft ``LOKR`` ↔ unipeft ``lokr`` (the LyCORIS family).

Both store, per targeted module ``m``, the form's own parameters under HF's names (``m.hada_w1_a`` ... for LoHa,
``m.lokr_w1`` / ``m.lokr_w2`` or their ``_a``/``_b`` factors for LoKr), with the scaling ``alpha / r`` and per-module
``rank_pattern`` / ``alpha_pattern``. A ``scaled`` composition c is written as alpha·c. HF's ``rank_dropout`` and
``module_dropout`` (training-time regularisers unipeft's forms do not implement) are refused when non-zero.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, Sequence

from torch import nn

from unipeft.core.delta import FormConfig
from unipeft.core.recipe import DeltaSpec
from unipeft.interop.hf_common import (grouped_specs, load_named, named_tensors, rank_alpha_fields, same_everywhere,
                                       target_fields, whole_module_placements)
from unipeft.interop.hf_match import hf_targets
from unipeft.interop.hf_method import HFMethod, MethodExport, Placement, TensorPool, register_hf_method
from unipeft.methods.loha import LoHaConfig
from unipeft.methods.lokr import LoKrConfig

COMMON = frozenset({"r", "alpha", "target_modules", "exclude_modules", "init_weights", "layers_to_transform",
                    "layers_pattern", "rank_pattern", "alpha_pattern"})


class LycorisMapping(HFMethod):
    """A LyCORIS method: whole-module updates stored under the form's parameter names."""

    family = "reparameterized"
    handled = COMMON
    why = {name: "a training-time dropout unipeft's form does not implement (set it to 0 in adapter_config.json to "
                 "load the adapter for inference)" for name in ("rank_dropout", "module_dropout")}
    #: Form fields HF holds once per adapter (config key = form field).
    shared_fields: ClassVar[tuple[str, ...]] = ()

    def targets(self, config: Mapping[str, Any], model: nn.Module) -> list[str]:
        return hf_targets(config, model)

    def make_form(self, r: int, alpha: float, config: Mapping[str, Any]) -> FormConfig:
        """The form config for one (r, alpha) group."""
        raise NotImplementedError

    def to_specs(self, config: Mapping[str, Any], model: nn.Module) -> list[DeltaSpec]:
        return grouped_specs(config, model, self.targets(config, model), r_key="r", alpha_key="alpha",
                             r_default=8, alpha_default=8.0,
                             make_form=lambda r, alpha: self.make_form(r, alpha, config))

    def load(self, placement: Placement, pool: TensorPool) -> None:
        names = [n for n, _ in placement.placed.form.named_parameters(recurse=False)]
        load_named(placement, pool, names)

    def export(self, placements: Sequence[Placement], model: nn.Module, *,
               modules_to_save: Sequence[str] | None = None) -> MethodExport:
        by_module = whole_module_placements(placements, self.peft_type)
        targets = list(by_module)
        ranks = {m: p.spec.form.r for m, p in by_module.items()}
        alphas = {m: float(p.spec.form.alpha) * p.scale for m, p in by_module.items()}
        config = rank_alpha_fields(ranks, alphas, targets, r_key="r", alpha_key="alpha")
        config.update(target_fields(targets, model, modules_to_save))
        config.update(self.shared_config(placements))
        tensors = {}
        for p in by_module.values():
            tensors.update(named_tensors(p, [n for n, _ in p.placed.form.named_parameters(recurse=False)]))
        return MethodExport(config=config, tensors=tensors, targets=targets)

    def shared_config(self, placements: Sequence[Placement]) -> dict[str, Any]:
        """Config fields held once per adapter."""
        return {}


@register_hf_method
class LoHaMapping(LycorisMapping):
    """LoHa (Hyeon-Woo et al. 2022) in HF peft's ``LOHA`` format."""

    peft_type = "LOHA"
    forms = ("loha",)
    paper = "Hyeon-Woo et al. 2022, arXiv 2108.06098"

    def make_form(self, r: int, alpha: float, config: Mapping[str, Any]) -> FormConfig:
        return LoHaConfig(r=r, alpha=alpha)


@register_hf_method
class LoKrMapping(LycorisMapping):
    """LoKr (LyCORIS; KronA, Edalati et al. 2022) in HF peft's ``LOKR`` format."""

    peft_type = "LOKR"
    forms = ("lokr",)
    paper = "Edalati et al. 2022, arXiv 2212.10650"
    handled = COMMON | {"decompose_both", "decompose_factor"}

    def make_form(self, r: int, alpha: float, config: Mapping[str, Any]) -> FormConfig:
        init = "lycoris" if config.get("init_weights") == "lycoris" else "peft"
        return LoKrConfig(r=r, alpha=alpha, decompose_both=bool(config.get("decompose_both", False)),
                          decompose_factor=int(config.get("decompose_factor", -1)), init=init)

    def shared_config(self, placements: Sequence[Placement]) -> dict[str, Any]:
        init = same_everywhere(placements, "init", "LoKr")
        return {"decompose_both": same_everywhere(placements, "decompose_both", "LoKr"),
                "decompose_factor": same_everywhere(placements, "decompose_factor", "LoKr"),
                "init_weights": "lycoris" if init == "lycoris" else True}


__all__ = ["LoHaMapping", "LoKrMapping", "LycorisMapping"]
