"""VeRA: vector-based random matrix adaptation (Kopiczko et al. 2024, arXiv 2310.11454).

One pair of frozen random matrices is shared by every site of the same shape; only two scaling vectors train:

    Δ(x) = Λ_b B Λ_d A x,     A ∈ R^{r×d_in},  B ∈ R^{d_out×r} frozen;  d ∈ R^r (init 0.1),  b ∈ R^{d_out} (init 0)

A and B are drawn Kaiming-uniform (gain √2, fan-in) from a CPU generator seeded with ``projection_prng_key``, A first
then B, exactly as HF peft's ``VeraModel`` draws its pair. HF draws one pair at the largest targeted shape and slices
it per layer; here each shape (d_in, d_out) gets its own pair, drawn the same way. Where every targeted site has the
same shape (BERT's query/value, LLaMA without grouped-query attention) the matrices are HF's bit for bit; elsewhere
(LLaMA's narrower v_proj under GQA) they are different draws of the same distribution.

The shared matrices are non-persistent buffers: not parameters (never counted or trained) and not saved — a loaded
adapter regenerates them from the seed in its recipe, which is exact (the draw is deterministic on the CPU). Sites
built on the same device share one tensor per shape while they are alive. Linear in the weight, so it merges:
W ← W + diag(b) B diag(d) A.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unipeft.core.delta import Form, FormConfig, SiteShape, register_form
from unipeft.core.factors import LowRank

#: (seed, r, d_in, d_out, device, "A"/"B") -> the shared frozen matrix, alive while some site holds it.
_SHARED: "weakref.WeakValueDictionary[tuple, torch.Tensor]" = weakref.WeakValueDictionary()


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    std = math.sqrt(2.0) / math.sqrt(shape[1])  # gain √2, fan-in = shape[1]
    bound = math.sqrt(3.0) * std
    return torch.empty(shape, device="cpu").uniform_(-bound, bound, generator=generator)


def shared_projections(seed: int, r: int, d_in: int, d_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen pair (A (r, d_in), B (d_out, r)) for this seed and shape, on the current default device.

    The same arguments return the same tensors while any site still holds them, and equal tensors afterwards.
    """
    device = torch.get_default_device()
    key = (seed, r, d_in, d_out, str(device))
    a, b = _SHARED.get((*key, "A")), _SHARED.get((*key, "B"))
    if a is None or b is None:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        a = _kaiming_uniform((r, d_in), generator).to(device)
        b = _kaiming_uniform((d_out, r), generator).to(device)
        _SHARED[(*key, "A")], _SHARED[(*key, "B")] = a, b
    return a, b


@register_form("vera")
@dataclass(frozen=True, kw_only=True)
class VeRAConfig(FormConfig):
    """Hyperparameters of VeRA.

    Attributes:
        r: rank of the shared random projections (VeRA uses large ranks; HF peft's default is 256).
        projection_prng_key: seed of the shared random matrices A and B.
        d_initial: initial value of every entry of the vector d.
        dropout: dropout on the input x.
    """

    r: int = 256
    projection_prng_key: int = 0
    d_initial: float = 0.1
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"VeRA rank r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"VeRA dropout must be in [0, 1), got {self.dropout}")

    def build(self, shape: SiteShape) -> "VeRA":
        return VeRA(self, shape)


class VeRA(Form):
    """Δ(x) = b ⊙ B (d ⊙ A x), with A and B frozen and shared (see the module docstring)."""

    def __init__(self, config: VeRAConfig, shape: SiteShape) -> None:
        super().__init__()
        if shape.d_in is None:
            raise ValueError("VeRA needs a site with input features (a linear projection), not an embedding")
        vera_a, vera_b = shared_projections(config.projection_prng_key, config.r, shape.d_in, shape.d_out)
        self.register_buffer("vera_A", vera_a, persistent=False)  # (r, d_in), frozen, shared
        self.register_buffer("vera_B", vera_b, persistent=False)  # (d_out, r), frozen, shared
        self.vera_lambda_d = nn.Parameter(torch.full((config.r,), float(config.d_initial)))  # (r,)
        self.vera_lambda_b = nn.Parameter(torch.zeros(shape.d_out))  # (d_out,)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.vera_lambda_d * F.linear(self.dropout(x), self.vera_A.to(x.dtype))  # (B, T, r)
        return self.vera_lambda_b * F.linear(hidden, self.vera_B.to(x.dtype))  # (B, T, d_out)

    def mixed_factors(self) -> LowRank:
        """Δ = (diag(b) B)(diag(d) A) x, for mixed batches (see :mod:`unipeft.mixed`)."""
        return LowRank(A=self.vera_lambda_d[:, None] * self.vera_A, B=self.vera_lambda_b[:, None] * self.vera_B)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = diag(b) B diag(d) A, shape (d_out, d_in)."""
        return (self.vera_lambda_b[:, None] * self.vera_B) @ (self.vera_lambda_d[:, None] * self.vera_A)

    def merge_(self, weight: torch.Tensor, bias: torch.Tensor | None, *, insertion: str, scale: float,
               sign: int) -> None:
        weight.add_((self.delta_weight() * (sign * scale)).to(weight.dtype))
