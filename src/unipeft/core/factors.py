"""The shapes of Δ that a mixed batch can stack across adapters, and the protocol forms implement to give them.

A mixed batch (Punica, Chen et al. 2023, arXiv 2310.18547; S-LoRA, Sheng et al. 2023, arXiv 2311.03285) runs one
forward in which row b uses its own adapter a_b. At a site this needs Δ of every adapter in one standard shape, so that
the tensors of all adapters can be stacked (zero-padded to a common size) and gathered per row. Forms describe
themselves by returning one of these factor sets from ``mixed_factors()``; the core never asks which method a form is:

* :class:`LowRank`   Δ(z) = c·B A z  (+ g ⊙ W z)     LoRA, rsLoRA, PiSSA, OLoRA, VeRA, AdaLoRA; DoRA with the W z term
* :class:`Affine`    Δ(z) = g ⊙ z + b                 BitFit (b only), SSF (g = γ − 1, b = β)
* :class:`Scale`     h' = h ⊙ l  or  x' = x ⊙ l       (IA)³ (insertions ``multiplicative`` / ``multiplicative_input``)
* :class:`MLP`       Δ(z) = act(z W_downᵀ + b_down) W_upᵀ + b_up      bottleneck and parallel adapters

Scalings that belong to the form are folded into the returned tensors (or given as LowRank's ``scale``); the
composition's scale s of ``h + s·Δ`` is folded in by the core. The tensors are read, never written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Union, runtime_checkable

import torch
from torch import nn


@dataclass(frozen=True, eq=False)
class LowRank:
    """Δ(z) = c·B A z, plus g ⊙ (W z) when ``base_gain`` is given (DoRA).

    Attributes:
        A: (r, d_in); for an embedding site (r, num_embeddings), and z are token ids: Δ = c·B A[:, ids].
        B: (d_out, r).
        scale: the form's own scaling c of B A (LoRA's α/r), applied to B when the stacks are built.
        embedding: whether the site is an embedding (z are token ids).
        base_gain: (d_out,) g multiplying W z, or None.
        base_weight: (d_out, d_in) W, the site's base weight rows read with ``base_gain``.
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float = 1.0
    embedding: bool = False
    base_gain: torch.Tensor | None = None
    base_weight: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.A.dim() != 2 or self.B.dim() != 2 or self.A.shape[0] != self.B.shape[1]:
            raise ValueError(f"LowRank needs A (r, d_in) and B (d_out, r), got {tuple(self.A.shape)} and "
                             f"{tuple(self.B.shape)}")
        if (self.base_gain is None) != (self.base_weight is None):
            raise ValueError("LowRank's base_gain and base_weight go together")


@dataclass(frozen=True, eq=False)
class Affine:
    """Δ(z) = g ⊙ z + b, each part optional (at least one given). g: (d,) with d = d_in = d_out; b: (d_out,)."""

    gain: torch.Tensor | None = None
    shift: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.gain is None and self.shift is None:
            raise ValueError("Affine needs a gain, a shift or both")


@dataclass(frozen=True, eq=False)
class Scale:
    """A scaling vector l (d,): h' = h ⊙ l at the output (``multiplicative``) or x' = x ⊙ l at the input."""

    vector: torch.Tensor


@dataclass(frozen=True, eq=False)
class MLP:
    """Δ(z) = act(z W_downᵀ + b_down) W_upᵀ + b_up with act(0) = 0 (so zero-padding the hidden size is exact).

    Attributes:
        down_weight: (m, d_in);  down_bias: (m,) or None.
        up_weight: (d_out, m);   up_bias: (d_out,) or None.
        activation: the activation module (its type decides which adapters can share one stacked computation).
    """

    down_weight: torch.Tensor
    down_bias: torch.Tensor | None
    up_weight: torch.Tensor
    up_bias: torch.Tensor | None
    activation: nn.Module


Factors = Union[LowRank, Affine, Scale, MLP]


@runtime_checkable
class Batchable(Protocol):
    """A form that can run in a mixed batch: it gives its Δ as one of the factor sets above."""

    def mixed_factors(self) -> Factors:
        """The tensors of Δ in a standard shape (see the module docstring); read-only views are fine."""
        ...
