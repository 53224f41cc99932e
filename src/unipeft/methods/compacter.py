"""Compacter: bottleneck adapters built from PHM layers (Mahabadi et al. 2021, arXiv 2106.04647).

    Δh = GELU(h W_down + b_down) W_up + b_up,      W = Σ_{i=1..n} A_i ⊗ B_i   (for W_down and W_up)

A PHM layer (parameterized hypercomplex multiplication) builds its (d_in × d_out) weight from n Kronecker products of
"slow" rules A_i ∈ R^{n×n} and "fast" weights B_i ∈ R^{(d_in/n)×(d_out/n)}. Compacter shares one set of rules
A = (A_1, …, A_n) across every PHM layer of the adapter (down and up projections, all layers) and makes each B_i low
rank: B_i = s_i t_i with s_i ∈ R^{(d_in/n)×r}, t_i ∈ R^{r×(d_out/n)} (r = 1 in the paper; ``rank: null`` keeps B_i
full, the paper's PHM-Adapter).

Parameters, the paper's closed form written out with biases and rank: a PHM layer has r·(d_in + d_out) + d_out; an
adapter d → m → d has 2r(d + m) + m + d; the shared rules add n³ once. With adapters after the attention and the FFN
of L layers (Compacter) that is 2L·(2r(d + m) + m + d) + n³ — the paper's 4L(d + m) + n³ for r = 1 without biases;
after the FFN only (Compacter++, ``positions=["ffn"]``) L·(2r(d + m) + m + d) + n³.

Init: A_i ~ N(0, 1/n); s_i, t_i Glorot-uniform, except the up projection's t_i = 0, so the adapter starts as the
identity (as the LoRA-style init of the bottleneck adapters). Non-linear: not mergeable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from unipeft.core.delta import Form, FormConfig, SiteShape, register_form

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU}


@register_form("compacter")
@dataclass(frozen=True, kw_only=True)
class CompacterConfig(FormConfig):
    """Hyperparameters of Compacter.

    Attributes:
        size: bottleneck size m (a multiple of ``n``); or None to use ``reduction_factor``.
        reduction_factor: m = d / reduction_factor, rounded down to a multiple of n (at least n).
        n: number of Kronecker products (the PHM dimension); d and m must be divisible by it.
        rank: rank r of each fast weight B_i = s_i t_i; None for full B_i (PHM-Adapter).
        shared: share the rules A_i across every site of the delta (Compacter); False gives each site its own.
        activation: the non-linearity: gelu (the paper's), relu, tanh or silu.
    """

    size: int | None = None
    reduction_factor: float | None = 32.0
    n: int = 4
    rank: int | None = 1
    shared: bool = True
    activation: Literal["gelu", "relu", "tanh", "silu"] = "gelu"

    insertions = ("sequential", "parallel")

    def __post_init__(self) -> None:
        if (self.size is None) == (self.reduction_factor is None):
            raise ValueError("give exactly one of compacter 'size' and 'reduction_factor'")
        if self.n < 1:
            raise ValueError(f"compacter n must be >= 1, got {self.n}")
        if self.size is not None and (self.size < 1 or self.size % self.n):
            raise ValueError(f"compacter size must be a positive multiple of n={self.n}, got {self.size}")
        if self.reduction_factor is not None and self.reduction_factor <= 0:
            raise ValueError(f"compacter reduction_factor must be > 0, got {self.reduction_factor}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"compacter rank must be >= 1 (or null for full-rank B_i), got {self.rank}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; valid: {', '.join(_ACTIVATIONS)}")

    def bottleneck(self, d: int) -> int:
        """The bottleneck size m for model width d."""
        if self.size is not None:
            return self.size
        return max(self.n, int(d // self.reduction_factor) // self.n * self.n)

    def build(self, shape: SiteShape) -> "Compacter":
        return Compacter(self, shape)

    def share(self, forms: list[Form]) -> None:
        """Make every site use the first site's rules A_i (only that site owns, trains and saves them)."""
        if self.shared and forms:
            owner = forms[0]
            for form in forms[1:]:
                form.use_rules(owner)


class PHMLinear(nn.Module):
    """y = x W + b with W = Σ_i A_i ⊗ B_i; the rules A (n, n, n) are passed in, B_i = s_i t_i are this layer's."""

    def __init__(self, d_in: int, d_out: int, *, n: int, rank: int | None, zero: bool) -> None:
        super().__init__()
        a, b = d_in // n, d_out // n
        if rank is None:
            self.s = nn.Parameter(torch.empty(n, a, b))  # full B_i
            self.t = None
        else:
            self.s = nn.Parameter(torch.empty(n, a, rank))  # (n, d_in/n, r)
            self.t = nn.Parameter(torch.empty(n, rank, b))  # (n, r, d_out/n)
        self.bias = nn.Parameter(torch.zeros(d_out))
        for factor in (self.s, self.t):
            if factor is not None:
                bound = math.sqrt(6.0 / (factor.shape[1] + factor.shape[2]))  # Glorot-uniform per B_i factor
                nn.init.uniform_(factor, -bound, bound)
        if zero:  # the up projection starts at W = 0: the adapter starts as the identity
            nn.init.zeros_(self.t if self.t is not None else self.s)

    def weight(self, rules: torch.Tensor) -> torch.Tensor:
        """W = Σ_i A_i ⊗ B_i, shape (d_in, d_out)."""
        fast = self.s if self.t is None else self.s @ self.t  # (n, d_in/n, d_out/n)
        n, a, b = fast.shape
        return torch.einsum("ipq,iab->paqb", rules, fast).reshape(n * a, n * b)

    def forward(self, x: torch.Tensor, rules: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(rules).T, self.bias)


class Rules(nn.Module):
    """The slow weights A_1..A_n of the PHM layers, A_i ~ N(0, 1/n)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(n, n, n) / math.sqrt(n))  # (n, n, n): A_i = A[i]


class Compacter(Form):
    """Δ(h) = PHM_up(act(PHM_down(h))), both PHM layers using the (shared) rules A."""

    def __init__(self, config: CompacterConfig, shape: SiteShape) -> None:
        super().__init__()
        if shape.d_in is None:
            raise ValueError("a Compacter adapter needs a hidden-state site, not an embedding")
        n = config.n
        m = config.bottleneck(shape.d_out)
        for what, width in (("input width", shape.d_in), ("output width", shape.d_out), ("bottleneck", m)):
            if width % n:
                raise ValueError(f"compacter: the site's {what} {width} is not divisible by n={n}")
        self.rules = Rules(n)
        self._shared: tuple[Rules, ...] = ()  # the owner's rules, unregistered, when they are shared
        self.down = PHMLinear(shape.d_in, m, n=n, rank=config.rank, zero=False)
        self.act = _ACTIVATIONS[config.activation]()
        self.up = PHMLinear(m, shape.d_out, n=n, rank=config.rank, zero=True)

    def use_rules(self, owner: "Compacter") -> None:
        """Use ``owner``'s rules instead of this site's own (which are dropped)."""
        del self.rules
        self._shared = (owner.rules,)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        rules = (self._shared[0] if self._shared else self.rules).A
        return self.up(self.act(self.down(z, rules)), rules)  # (..., d_out)
