"""Composition functions of He et al. (2022): how Δh joins the hidden state h.

* ``add``:    h + Δh                                   (LoRA with its α/r folded in, Houlsby, Pfeiffer)
* ``scaled``: h + s·Δh, s fixed or learned             (scaled parallel adapter, s = 4)
* ``gated``:  h + σ(z W_g + b_g)·Δh                    (UniPELT's gate, Mao et al. 2022; z is the delta's input)
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Composition = Literal["add", "scaled", "gated"]
COMPOSITIONS: tuple[str, ...] = ("add", "scaled", "gated")


class Add(nn.Module):
    """h + Δh."""

    def forward(self, h: torch.Tensor, delta: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return h + delta


class Scaled(nn.Module):
    """h + s·Δh with a fixed (buffer) or learned (parameter) scalar s."""

    def __init__(self, scale: float, learn: bool) -> None:
        super().__init__()
        value = torch.tensor(float(scale))
        if learn:
            self.scale = nn.Parameter(value)
        else:
            self.register_buffer("scale", value, persistent=False)

    def forward(self, h: torch.Tensor, delta: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return h + self.scale.to(delta.dtype) * delta


class Gated(nn.Module):
    """h + σ(z W_g + b_g)·Δh, a per-token gate computed from the delta's input z (UniPELT)."""

    def __init__(self, d_in: int) -> None:
        super().__init__()
        self.gate = nn.Linear(d_in, 1)

    def forward(self, h: torch.Tensor, delta: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return h + torch.sigmoid(self.gate(z)) * delta  # (B, T, 1) * (B, T, d)


def build_composition(kind: str, *, scale: float, learn_scale: bool, d_in: int | None) -> nn.Module:
    """Create the composition module.

    Raises:
        ValueError: for an unknown kind, or ``gated`` without an input dimension.
    """
    if kind == "add":
        return Add()
    if kind == "scaled":
        return Scaled(scale, learn_scale)
    if kind == "gated":
        if d_in is None:
            raise ValueError("composition 'gated' needs a site with an input dimension (not an embedding)")
        return Gated(d_in)
    raise ValueError(f"unknown composition {kind!r}; valid: {', '.join(COMPOSITIONS)}")
