"""BitFit: tune only the bias terms (Ben Zaken et al. 2022, arXiv 2106.10199).

    h = W x + b + Δb,      Δb = 0 at init

A parallel delta that adds a learned vector to a module's output; it merges into the module's existing bias
(b ← b + Δb). On modules without a bias (LLaMA-family projections) it still trains, but cannot be merged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from unipeft.core.delta import Form, FormConfig, SiteShape, register_form
from unipeft.core.factors import Affine


@register_form("bias")
@dataclass(frozen=True, kw_only=True)
class BiasConfig(FormConfig):
    """BitFit's bias delta (no hyperparameters)."""

    def build(self, shape: SiteShape) -> "BiasDelta":
        return BiasDelta(shape)


class BiasDelta(Form):
    """Δ(x) = Δb, the same vector for every token."""

    def __init__(self, shape: SiteShape) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(shape.d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias

    def mixed_factors(self) -> Affine:
        """Δ = Δb, for mixed batches (see :mod:`unipeft.mixed`)."""
        return Affine(shift=self.bias)

    def merge_problem(self, base: nn.Module) -> str | None:
        return None if isinstance(getattr(base, "bias", None), torch.Tensor) else "the base module has no bias to merge into"

    def merge_(self, weight: torch.Tensor, bias: torch.Tensor | None, *, insertion: str, scale: float,
               sign: int) -> None:
        if bias is None:
            raise NotImplementedError("the base module has no bias to merge BitFit's Δb into")
        bias.add_((self.bias * (sign * scale)).to(bias.dtype))
