"""Bottleneck adapters (Houlsby et al. 2019, arXiv 1902.00751; Pfeiffer et al. 2021, arXiv 2005.00247) and the
parallel / scaled parallel adapter of He et al. (2022, arXiv 2110.04366).

    Δh = f(z W_down + b_down) W_up + b_up,     W_down ∈ R^{d×m},  W_up ∈ R^{m×d}

z is the sub-layer's output h for the sequential adapter (Houlsby: after attention and FFN; Pfeiffer: after the FFN)
and the sub-layer's input x for the parallel adapter; the scaled parallel adapter composes h + s·Δh (He et al.: s=4).
With ``init: lora`` (W_down Kaiming-uniform, W_up = 0, as He et al.'s code) the adapter starts as the identity;
``init: bert`` draws both from N(0, 0.02²) as Houlsby et al. (near-identity). Non-linear: not mergeable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from unipeft.core.delta import Form, FormConfig, SiteShape, register_form
from unipeft.core.factors import MLP

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU, "identity": nn.Identity}


@register_form("bottleneck")
@dataclass(frozen=True, kw_only=True)
class BottleneckConfig(FormConfig):
    """Hyperparameters of a bottleneck adapter.

    Attributes:
        size: bottleneck dimension m; or None to use ``reduction_factor``.
        reduction_factor: m = d / reduction_factor (``adapters``' convention), used when ``size`` is None.
        activation: the non-linearity f: relu, gelu, tanh, silu or identity.
        init: ``lora`` (exact identity at start) or ``bert`` (N(0, 0.02²), Houlsby's near-identity).
        bias: use biases in both projections.
    """

    size: int | None = 64
    reduction_factor: float | None = None
    activation: Literal["relu", "gelu", "tanh", "silu", "identity"] = "relu"
    init: Literal["lora", "bert"] = "lora"
    bias: bool = True

    insertions = ("sequential", "parallel")

    def __post_init__(self) -> None:
        if (self.size is None) == (self.reduction_factor is None):
            raise ValueError("give exactly one of bottleneck 'size' and 'reduction_factor'")
        if self.size is not None and self.size < 1:
            raise ValueError(f"bottleneck size must be >= 1, got {self.size}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; valid: {', '.join(_ACTIVATIONS)}")
        if self.init not in ("lora", "bert"):
            raise ValueError(f"unknown adapter init {self.init!r}; valid: lora, bert")

    def bottleneck(self, d: int) -> int:
        """The bottleneck size m for model width d."""
        return self.size if self.size is not None else max(1, int(d // self.reduction_factor))

    def build(self, shape: SiteShape) -> "Bottleneck":
        return Bottleneck(self, shape)


class Bottleneck(Form):
    """Δ(z) = f(z W_down + b_down) W_up + b_up."""

    def __init__(self, config: BottleneckConfig, shape: SiteShape) -> None:
        super().__init__()
        if shape.d_in is None:
            raise ValueError("a bottleneck adapter needs a hidden-state site, not an embedding")
        m = config.bottleneck(shape.d_out)
        self.down = nn.Linear(shape.d_in, m, bias=config.bias)
        self.act = _ACTIVATIONS[config.activation]()
        self.up = nn.Linear(m, shape.d_out, bias=config.bias)
        if config.init == "lora":
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)
        else:
            nn.init.normal_(self.down.weight, std=0.02)
            nn.init.normal_(self.up.weight, std=0.02)
        for lin in (self.down, self.up):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(z)))  # (B, T, d_out)

    def mixed_factors(self) -> MLP:
        """W_down, b_down, W_up, b_up and the activation, for mixed batches (see :mod:`unipeft.mixed`)."""
        return MLP(down_weight=self.down.weight, down_bias=self.down.bias, up_weight=self.up.weight,
                   up_bias=self.up.bias, activation=self.act)
