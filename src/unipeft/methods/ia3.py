"""(IA)³: infused adapter by inhibiting and amplifying inner activations (Liu et al. 2022, arXiv 2205.05638).

    k' = l_k ⊙ k,   v' = l_v ⊙ v,   FFN: W_down (l_ff ⊙ act(W_up x)),     l = 1 at init

Keys and values are scaled at the projection's output (insertion ``multiplicative``); the FFN's inner activation is
scaled at the input of the down projection (``multiplicative_input``), as HF peft does. Both fold into the weight:
W ← diag(l) W (and b ← l ⊙ b) at an output, W ← W diag(l) at an input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from unipeft.core.delta import Form, FormConfig, SiteShape, register_form
from unipeft.core.factors import Scale


@register_form("ia3")
@dataclass(frozen=True, kw_only=True)
class IA3Config(FormConfig):
    """(IA)³ has no hyperparameters beyond its positions; ``init`` sets the starting value of l (1 = identity)."""

    init: float = 1.0
    insertions = ("multiplicative", "multiplicative_input")

    def build(self, shape: SiteShape) -> "IA3":
        return IA3(self, shape)


class IA3(Form):
    """A learned scaling vector l ∈ R^d; ``forward()`` returns l."""

    def __init__(self, config: IA3Config, shape: SiteShape) -> None:
        super().__init__()
        self.ia3_l = nn.Parameter(torch.full((shape.d_out,), float(config.init)))

    def forward(self) -> torch.Tensor:
        return self.ia3_l

    def mixed_factors(self) -> Scale:
        """The scaling vector l, for mixed batches (see :mod:`unipeft.mixed`)."""
        return Scale(vector=self.ia3_l)

    def merge_(self, weight: torch.Tensor, bias: torch.Tensor | None, *, insertion: str, scale: float,
               sign: int) -> None:
        factor = self.ia3_l.to(weight.dtype) if sign > 0 else 1.0 / self.ia3_l.to(weight.dtype)
        if insertion == "multiplicative":
            weight.mul_(factor[:, None])
            if bias is not None:
                bias.mul_(factor)
        else:
            weight.mul_(factor[None, :])
