"""Multi-head parallel adapter, "MH PA" (He et al. 2022, arXiv 2110.04366, Sec. 3.3 and Table 4).

A parallel adapter at the attention sub-layer whose hidden state is split into N_h heads, each with its own
bottleneck of size r:

    Δh = concat_{i=1..N_h} [ f(x_i W_down^(i) + b_down^(i)) W_up^(i) + b_up^(i) ]
    x = concat(x_1, …, x_{N_h}),   x_i ∈ R^{d/N_h},   W_down^(i) ∈ R^{(d/N_h)×r},   W_up^(i) ∈ R^{r×(d/N_h)}

x is the attention sub-layer's input and Δh is added to its output (parallel insertion at ``attn``); f = ReLU.

He et al. derive MH PA from their view of prefix tuning as N_h per-head adapters: each head's adapter reads the
head's projection x W_q^(i) (frozen) instead of x, so N_h bottlenecks of size r cost 2·d·r parameters, the same as one
parallel adapter of size r ("capacity for free"). A form here sees only its own site (the attention's output
projection), not W_q, so each head reads its own d/N_h slice of x — the W_q = I case of the same block structure,
with the same count: 2·d·r + N_h·r + d parameters per site with biases. W_up starts at 0, so the adapter starts as the
identity (He et al.'s LoRA-style init). Non-linear: not mergeable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from unipeft.core.delta import Form, FormConfig, SiteShape, register_form

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU, "identity": nn.Identity}


@register_form("mh_adapter")
@dataclass(frozen=True, kw_only=True)
class MHAdapterConfig(FormConfig):
    """Hyperparameters of the multi-head parallel adapter.

    Attributes:
        heads: number of heads N_h; the site's input and output widths must be divisible by it.
        size: bottleneck size r of each head.
        activation: the non-linearity f: relu (He et al.), gelu, tanh, silu or identity.
        bias: use biases in both projections.
    """

    heads: int = 8
    size: int = 64
    activation: Literal["relu", "gelu", "tanh", "silu", "identity"] = "relu"
    bias: bool = True

    insertions = ("parallel", "sequential")

    def __post_init__(self) -> None:
        if self.heads < 1:
            raise ValueError(f"mh_adapter heads must be >= 1, got {self.heads}")
        if self.size < 1:
            raise ValueError(f"mh_adapter size must be >= 1, got {self.size}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; valid: {', '.join(_ACTIVATIONS)}")

    def build(self, shape: SiteShape) -> "MHAdapter":
        return MHAdapter(self, shape)


class MHAdapter(Form):
    """N_h independent bottleneck adapters, one per d/N_h slice of the hidden state (see the module docstring)."""

    def __init__(self, config: MHAdapterConfig, shape: SiteShape) -> None:
        super().__init__()
        if shape.d_in is None:
            raise ValueError("a multi-head adapter needs a hidden-state site, not an embedding")
        heads, r = config.heads, config.size
        for what, width in (("input", shape.d_in), ("output", shape.d_out)):
            if width % heads:
                raise ValueError(f"mh_adapter: the site's {what} width {width} is not divisible by heads={heads}; "
                                 f"valid heads divide {width}")
        self.heads = heads
        d_in, d_out = shape.d_in // heads, shape.d_out // heads
        self.down = nn.Parameter(torch.empty(heads, d_in, r))  # (H, d/H, r)
        self.up = nn.Parameter(torch.zeros(heads, r, d_out))  # (H, r, d/H)
        self.down_bias = nn.Parameter(torch.zeros(heads, r)) if config.bias else None
        self.up_bias = nn.Parameter(torch.zeros(heads * d_out)) if config.bias else None
        bound = 1.0 / math.sqrt(d_in)  # nn.Linear's Kaiming-uniform(a=√5) bound for fan-in d/H
        nn.init.uniform_(self.down, -bound, bound)
        self.act = _ACTIVATIONS[config.activation]()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = z.unflatten(-1, (self.heads, -1))  # (..., H, d/H)
        mid = torch.einsum("...hd,hdr->...hr", x, self.down)  # (..., H, r)
        if self.down_bias is not None:
            mid = mid + self.down_bias
        out = torch.einsum("...hr,hre->...he", self.act(mid), self.up).flatten(-2)  # (..., d_out)
        return out + self.up_bias if self.up_bias is not None else out
