"""SSF: scaling and shifting the features of a frozen model (Lian et al. 2022, arXiv 2210.08823).

    h' = γ ⊙ h + β,      γ = 1, β = 0 at init

In He et al.'s terms SSF is a *sequential* delta with a diagonal affine form: Δ(h) = (γ − 1) ⊙ h + β, so that
h + Δ(h) = γ ⊙ h + β (with the ``scaled`` composition, h + s·Δ(h)). Being affine in h, it folds into the module it
follows: for h = W x + b, W ← diag(γ) W and b ← γ ⊙ b + β; for a norm, its weight and bias likewise. A module
without a bias (LLaMA's projections, RMSNorm) cannot absorb β, so such sites stay unmerged unless ``shift`` is off.

The paper draws γ ~ N(1, σ²), β ~ N(0, σ²) with σ = 0.02; ``init_std`` reproduces that, and its default 0 starts
at the exact identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from unipeft.core.delta import Form, FormConfig, SiteShape, register_form
from unipeft.core.factors import Affine


@register_form("ssf")
@dataclass(frozen=True, kw_only=True)
class SSFConfig(FormConfig):
    """Hyperparameters of SSF.

    Attributes:
        shift: learn the shift β as well as the scale γ (off: (IA)³-like scaling only, mergeable without a bias).
        init_std: σ of the initial γ ~ N(1, σ²) and β ~ N(0, σ²); 0 (default) is the exact identity, 0.02 the paper's.
    """

    shift: bool = True
    init_std: float = 0.0

    insertions = ("sequential",)

    def __post_init__(self) -> None:
        if self.init_std < 0:
            raise ValueError(f"SSF init_std must be >= 0, got {self.init_std}")

    def build(self, shape: SiteShape) -> "SSF":
        return SSF(self, shape)


class SSF(Form):
    """Δ(h) = (γ − 1) ⊙ h + β; with add composition the site computes γ ⊙ h + β."""

    def __init__(self, config: SSFConfig, shape: SiteShape) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(shape.d_out))  # γ, (d_out,)
        self.shift = nn.Parameter(torch.zeros(shape.d_out)) if config.shift else None  # β, (d_out,)
        if config.init_std > 0:
            nn.init.normal_(self.scale, mean=1.0, std=config.init_std)
            if self.shift is not None:
                nn.init.normal_(self.shift, std=config.init_std)
        self._base_has_bias = isinstance(getattr(shape.base, "bias", None), torch.Tensor)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        delta = h * (self.scale - 1.0)  # (..., d_out)
        return delta + self.shift if self.shift is not None else delta

    def mixed_factors(self) -> Affine:
        """Δ(h) = (γ − 1) ⊙ h + β, for mixed batches (see :mod:`unipeft.mixed`)."""
        return Affine(gain=self.scale - 1.0, shift=self.shift)

    @property
    def mergeable(self) -> bool:
        """Foldable unless a shift must go into a base module that has no bias."""
        return self.shift is None or self._base_has_bias

    def merge_problem(self, base: nn.Module) -> str | None:
        if self.shift is not None and not isinstance(getattr(base, "bias", None), torch.Tensor):
            return "the base module has no bias to absorb SSF's shift β (use shift: false to merge the scale alone)"
        return None

    def merge_(self, weight: torch.Tensor, bias: torch.Tensor | None, *, insertion: str, scale: float,
               sign: int) -> None:
        if insertion != "sequential":
            raise NotImplementedError(f"SSF folds only as a sequential delta, not with insertion '{insertion}'")
        gamma = (1.0 + scale * (self.scale - 1.0)).to(weight.dtype)  # h + s·Δ(h) = γ' ⊙ h + s·β
        beta = (scale * self.shift).to(weight.dtype) if self.shift is not None else None
        if beta is not None and bias is None:
            raise NotImplementedError("the base module has no bias to absorb SSF's shift β")
        rows = gamma if weight.dim() == 1 else gamma[:, None]  # a norm's weight is 1-D
        if sign > 0:
            weight.mul_(rows)
            if bias is not None:
                bias.mul_(gamma)
                if beta is not None:
                    bias.add_(beta)
        else:
            if bias is not None:
                if beta is not None:
                    bias.sub_(beta)
                bias.div_(gamma)
            weight.div_(rows)
