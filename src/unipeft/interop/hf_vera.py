"""HF peft ``VERA`` ↔ unipeft ``vera``.

HF stores the trained vectors per targeted module ``m`` as ``m.vera_lambda_d`` (r,) and ``m.vera_lambda_b`` (out,),
and, with ``save_projection``, the frozen shared pair once as ``vera_A`` (r, max in) and ``vera_B`` (max out, r): one
pair drawn from ``projection_prng_key`` at the largest targeted shape, sliced per module (A[:, :in], B[:out]).
unipeft draws one pair per module shape from the same seed (:mod:`unipeft.methods.vera`), which equals HF's slices
when every targeted module takes the same input width (all of BERT's and LLaMA's attention projections). Both
directions check this tensor for tensor and refuse otherwise, naming the shapes: the outputs would differ.
A ``scaled`` composition c is folded into λ_b.
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
from unipeft.methods.vera import VeRAConfig, shared_projections


def _hf_pair(placements: Sequence[Placement], seed: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's shared (A, B), drawn at the largest input and output width of the placements."""
    d_in = max(p.placed.form.vera_A.shape[1] for p in placements)
    d_out = max(p.placed.form.vera_B.shape[0] for p in placements)
    with torch.device("cpu"):
        return shared_projections(seed, r, d_in, d_out)


def _check_slices(placements: Sequence[Placement], a: torch.Tensor, b: torch.Tensor, where: str) -> None:
    for p in placements:
        form = p.placed.form
        d_in, d_out = form.vera_A.shape[1], form.vera_B.shape[0]
        if a.shape[0] != form.vera_A.shape[0] or not torch.equal(a[:, :d_in], form.vera_A.cpu()) or \
                not torch.equal(b[:d_out], form.vera_B.cpu()):
            shapes = sorted({(q.placed.form.vera_A.shape[1], q.placed.form.vera_B.shape[0]) for q in placements})
            raise ValueError(f"VeRA's shared random matrices differ at {p.module}: {where} one pair drawn at the "
                             f"largest targeted shape and sliced per module, unipeft draws one pair per (in, out) "
                             f"shape; they agree only when all targeted modules take the same input width, but "
                             f"these modules have (in, out) = {shapes}")


@register_hf_method
class VeRAMapping(HFMethod):
    """VeRA (Kopiczko et al. 2024) in HF peft's ``VERA`` format."""

    peft_type = "VERA"
    forms = ("vera",)
    family = "reparameterized"
    paper = "Kopiczko et al. 2024, arXiv 2310.11454"
    handled = frozenset({"r", "target_modules", "projection_prng_key", "save_projection", "vera_dropout",
                         "d_initial", "fan_in_fan_out", "bias", "init_weights", "layers_to_transform",
                         "layers_pattern"})
    bias_only = "vera_only"

    def targets(self, config: Mapping[str, Any], model: nn.Module) -> list[str]:
        return hf_targets(config, model)

    def to_specs(self, config: Mapping[str, Any], model: nn.Module) -> list[DeltaSpec]:
        targets = self.targets(config, model)
        if not targets:
            raise ValueError(f"target_modules {config.get('target_modules')!r} match no module of this model")
        form = VeRAConfig(r=int(config.get("r", 256)), projection_prng_key=int(config.get("projection_prng_key", 0)),
                          d_initial=float(config.get("d_initial", 0.1)),
                          dropout=float(config.get("vera_dropout", 0.0)))
        return [DeltaSpec(form=form, modules=unipeft_modules(model, targets, preferred_targets(config, model)))]

    def begin_load(self, placements: Sequence[Placement], pool: TensorPool) -> None:
        form = placements[0].spec.form
        if pool.has("vera_A") or pool.has("vera_B"):
            a, b = pool.take("vera_A"), pool.take("vera_B")
            where = "the file holds"
        else:
            a, b = _hf_pair(placements, form.projection_prng_key, form.r)
            where = "HF peft draws"
        _check_slices(placements, a, b, where)

    def load(self, placement: Placement, pool: TensorPool) -> None:
        form, m = placement.placed.form, placement.module
        with torch.no_grad():
            form.vera_lambda_d.copy_(pool.take(f"{m}.vera_lambda_d", form.vera_lambda_d.shape))
            form.vera_lambda_b.copy_(pool.take(f"{m}.vera_lambda_b", form.vera_lambda_b.shape))

    def export(self, placements: Sequence[Placement], model: nn.Module, *,
               modules_to_save: Sequence[str] | None = None) -> MethodExport:
        by_module = whole_module_placements(placements, "VeRA")
        values = {f: same_everywhere(placements, f, "VeRA") for f in ("r", "projection_prng_key", "d_initial",
                                                                      "dropout")}
        a, b = _hf_pair(placements, values["projection_prng_key"], values["r"])
        _check_slices(placements, a, b, "HF peft uses")
        tensors = {}
        for m, p in by_module.items():
            tensors[f"{m}.vera_lambda_d"] = p.placed.form.vera_lambda_d.detach()
            tensors[f"{m}.vera_lambda_b"] = p.placed.form.vera_lambda_b.detach() * p.scale
        targets = list(by_module)
        config = {"r": values["r"], "projection_prng_key": values["projection_prng_key"],
                  "d_initial": values["d_initial"], "vera_dropout": values["dropout"], "save_projection": True,
                  "fan_in_fan_out": any(is_conv1d(p.base) for p in placements),
                  **target_fields(targets, model, modules_to_save)}
        return MethodExport(config=config, tensors=tensors, targets=targets, shared={"vera_A": a, "vera_B": b})


__all__ = ["VeRAMapping"]
