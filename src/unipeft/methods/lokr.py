"""LoKr: low-rank Kronecker product (LyCORIS; KronA, Edalati et al. 2022, arXiv 2212.10650).

The update is a Kronecker product of a small matrix and a (low-rank) larger one:

    ΔW = (W₁ ⊗ W₂) · α/r,     W₁ ∈ R^{a×c},  W₂ = B A ∈ R^{b×d} (or full when r ≥ max(b, d)/2),
    d_out = a·b,  d_in = c·d,     Δ(x) = ΔW x

The dimensions are split as HF peft's ``LoKrConfig`` (LyCORIS's ``factorization``): (a, b) = factorization(d_out),
(c, d) = factorization(d_in), each the divisor pair closest to √d (or with one side = ``decompose_factor``), smaller
side first. W₂ is factored as B A of rank r unless r ≥ max(b, d)/2; W₁ is factored too only with ``decompose_both``
and r < max(a, c)/2. The scaling is α/r in every case, as HF peft. Initialisation: ``init: peft`` (HF peft's
default) sets W₁ = 0 (or its A-side factor W₁_a = 0) with the rest Kaiming-uniform(a=√5); ``init: lycoris`` sets W₂'s
second factor (or W₂) to 0 and the rest Kaiming-uniform, as HF's ``init_weights="lycoris"``. Either way ΔW = 0 at
init. HF's rank/module dropout are not implemented. Linear in the weight, so it merges: W ← W + ΔW.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from unipeft.core.delta import Form, FormConfig, SiteShape, register_form


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into (m, n) with m·n = dimension and m ≤ n (LyCORIS's rule, as HF peft).

    With ``factor`` > 0 dividing ``dimension`` the split is (factor, dimension // factor); otherwise the divisor pair
    with the smallest sum whose smaller side is at most ``factor`` (no limit for -1), i.e. closest to √dimension.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        candidate = m + 1
        while dimension % candidate:
            candidate += 1
        other = dimension // candidate
        if candidate + other > m + n or candidate > limit:
            break
        m, n = candidate, other
    return (n, m) if m > n else (m, n)


@register_form("lokr")
@dataclass(frozen=True, kw_only=True)
class LoKrConfig(FormConfig):
    """Hyperparameters of LoKr (HF peft's defaults).

    Attributes:
        r: rank of the factored Kronecker factor(s).
        alpha: scaling numerator (scaling = alpha / r).
        decompose_both: also factor the small left matrix W₁ into rank r.
        decompose_factor: preferred size of the first factor of each dimension (-1: near its square root).
        init: ``peft`` (W₁ = 0, HF peft's default) or ``lycoris`` (W₂'s second factor = 0).
    """

    r: int = 8
    alpha: float = 8.0
    decompose_both: bool = False
    decompose_factor: int = -1
    init: Literal["peft", "lycoris"] = "peft"

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoKr rank r must be >= 1, got {self.r}")
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise ValueError(f"LoKr decompose_factor must be -1 or a positive integer, got {self.decompose_factor}")
        if self.init not in ("peft", "lycoris"):
            raise ValueError(f"unknown LoKr init {self.init!r}; valid: peft, lycoris")

    def build(self, shape: SiteShape) -> "LoKr":
        return LoKr(self, shape)


def _kaiming(*tensors: torch.Tensor) -> None:
    for t in tensors:
        nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class LoKr(Form):
    """Δ(x) = ((W₁ ⊗ W₂) · α/r) x (see the module docstring)."""

    def __init__(self, config: LoKrConfig, shape: SiteShape) -> None:
        super().__init__()
        if shape.d_in is None:
            raise ValueError("LoKr needs a site with input features (a linear projection), not an embedding")
        r = config.r
        (a, b), (c, d) = factorization(shape.d_out, config.decompose_factor), \
            factorization(shape.d_in, config.decompose_factor)
        self.scaling = config.alpha / r
        self.full_w1 = not (config.decompose_both and r < max(a, c) / 2)
        self.full_w2 = not r < max(b, d) / 2
        if self.full_w1:
            self.lokr_w1 = nn.Parameter(torch.empty(a, c))  # (a, c)
        else:
            self.lokr_w1_a = nn.Parameter(torch.empty(a, r))
            self.lokr_w1_b = nn.Parameter(torch.empty(r, c))
        if self.full_w2:
            self.lokr_w2 = nn.Parameter(torch.empty(b, d))  # (b, d)
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(b, r))
            self.lokr_w2_b = nn.Parameter(torch.empty(r, d))
        w1 = (self.lokr_w1,) if self.full_w1 else (self.lokr_w1_a, self.lokr_w1_b)
        w2 = (self.lokr_w2,) if self.full_w2 else (self.lokr_w2_a, self.lokr_w2_b)
        with torch.no_grad():
            if config.init == "peft":  # W₁ (or its first factor) = 0
                w1[0].zero_()
                _kaiming(*w1[1:], *w2)
            else:  # lycoris: W₂ (or its second factor) = 0
                w2[-1].zero_()
                _kaiming(*w1, *w2[:-1])

    def _w1(self) -> torch.Tensor:
        return self.lokr_w1 if self.full_w1 else self.lokr_w1_a @ self.lokr_w1_b  # (a, c)

    def _w2(self) -> torch.Tensor:
        return self.lokr_w2 if self.full_w2 else self.lokr_w2_a @ self.lokr_w2_b  # (b, d)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (W₁ ⊗ W₂) · α/r, shape (d_out, d_in)."""
        return torch.kron(self._w1(), self._w2()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.delta_weight().to(x.dtype))  # (B, T, d_out)

    def merge_(self, weight: torch.Tensor, bias: torch.Tensor | None, *, insertion: str, scale: float,
               sign: int) -> None:
        weight.add_((self.delta_weight() * (sign * scale)).to(weight.dtype))
