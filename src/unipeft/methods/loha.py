"""LoHa: low-rank Hadamard product (Hyeon-Woo et al. 2022, FedPara, arXiv 2108.06098; LyCORIS).

The update is the element-wise product of two rank-r matrices, which reaches rank up to r² with 2r(d_in + d_out)
parameters:

    ΔW = (B₁ A₁) ⊙ (B₂ A₂) · α/r,     B_i ∈ R^{d_out×r},  A_i ∈ R^{r×d_in},      Δ(x) = ΔW x

Initialisation as HF peft's ``LoHaConfig`` (``init_weights=True``): B₁, A₁, B₂ Kaiming-uniform(a=√5), A₂ = 0, so
ΔW = 0 at init. Parameter names follow HF peft (``hada_w1_a`` = B₁, ``hada_w1_b`` = A₁, ...). ΔW is materialised
on every call, as in HF peft (which saves memory in the backward with a custom autograd function; here autograd
keeps the two (d_out, d_in) factors). HF's rank and module dropout are not implemented. Linear in the weight, so it
merges: W ← W + ΔW.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unipeft.core.delta import Form, FormConfig, SiteShape, register_form


@register_form("loha")
@dataclass(frozen=True, kw_only=True)
class LoHaConfig(FormConfig):
    """Hyperparameters of LoHa (HF peft's defaults).

    Attributes:
        r: rank of each of the two factors.
        alpha: scaling numerator (scaling = alpha / r).
    """

    r: int = 8
    alpha: float = 8.0

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoHa rank r must be >= 1, got {self.r}")

    def build(self, shape: SiteShape) -> "LoHa":
        return LoHa(self, shape)


class LoHa(Form):
    """Δ(x) = ((B₁ A₁) ⊙ (B₂ A₂) · α/r) x (see the module docstring)."""

    def __init__(self, config: LoHaConfig, shape: SiteShape) -> None:
        super().__init__()
        if shape.d_in is None:
            raise ValueError("LoHa needs a site with input features (a linear projection), not an embedding")
        self.scaling = config.alpha / config.r
        self.hada_w1_a = nn.Parameter(torch.empty(shape.d_out, config.r))  # B₁ (d_out, r)
        self.hada_w1_b = nn.Parameter(torch.empty(config.r, shape.d_in))  # A₁ (r, d_in)
        self.hada_w2_a = nn.Parameter(torch.empty(shape.d_out, config.r))  # B₂ (d_out, r)
        self.hada_w2_b = nn.Parameter(torch.zeros(config.r, shape.d_in))  # A₂ (r, d_in) = 0
        for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (B₁ A₁) ⊙ (B₂ A₂) · α/r, shape (d_out, d_in)."""
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.delta_weight().to(x.dtype))  # (B, T, d_out)

    def merge_(self, weight: torch.Tensor, bias: torch.Tensor | None, *, insertion: str, scale: float,
               sign: int) -> None:
        weight.add_((self.delta_weight() * (sign * scale)).to(weight.dtype))
