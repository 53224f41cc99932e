"""LoRA: low-rank adaptation (Hu et al. 2021, arXiv 2106.09685); rsLoRA scaling (Kalajdzievski 2023, arXiv 2312.03732).

    h = W x + (α / r) · B A x,      A ∈ R^{r×d_in},  B ∈ R^{d_out×r},  B = 0 at init

With ``rslora`` the scaling is α / √r. On an embedding the low-rank update is looked up per token: Δh = (α/r)·B A[:, ids].
Linear in the weight, so it merges: W ← W + (α/r)·B A.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from unipeft.core.delta import Form, FormConfig, SiteShape, register_form
from unipeft.core.factors import LowRank
from unipeft.methods.lora_init import BASE_INITS, BaseRewrite, site_weight


@register_form("lora")
@dataclass(frozen=True, kw_only=True)
class LoRAConfig(FormConfig):
    """Hyperparameters of LoRA.

    Attributes:
        r: rank of the update.
        alpha: scaling numerator (scaling = alpha / r, or alpha / sqrt(r) with rslora).
        dropout: dropout on the input of the low-rank path.
        rslora: rank-stabilised scaling alpha / sqrt(r).
        init: ``kaiming`` (A ~ Kaiming-uniform(a=√5), HF peft's default) or ``gaussian`` (A ~ N(0, (1/r)²)); B = 0.
            ``pissa`` / ``olora``: A and B from the SVD / QR of the base weight, which keeps the residual
            (see :mod:`unipeft.methods.lora_init`).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    init: Literal["kaiming", "gaussian", "pissa", "olora"] = "kaiming"

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.init not in ("kaiming", "gaussian", *BASE_INITS):
            raise ValueError(f"unknown LoRA init {self.init!r}; valid: kaiming, gaussian, {', '.join(BASE_INITS)}")

    @property
    def scaling(self) -> float:
        """α/r, or α/√r with rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def build(self, shape: SiteShape) -> "LoRA":
        return LoRA(self, shape)


class LoRA(Form):
    """Δ(x) = (α/r) · B A x (see the module docstring)."""

    def __init__(self, config: LoRAConfig, shape: SiteShape) -> None:
        super().__init__()
        self.scaling = config.scaling
        self.embedding = shape.d_in is None
        d_in = shape.base.num_embeddings if self.embedding else shape.d_in
        self.lora_A = nn.Parameter(torch.empty(config.r, d_in))  # (r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(shape.d_out, config.r))  # (d_out, r)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        if self.embedding:  # as HF peft: A = 0, B ~ N(0, 1), so Δ = 0 at init
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)
        elif config.init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A, std=1.0 / config.r)
        # PiSSA / OLoRA: A, B from the base weight, which keeps W - s·B A; written in on_attach, undone in on_detach
        self.rewrite = BaseRewrite(config.init, site_weight(shape, f"LoRA init '{config.init}'"), r=config.r,
                                   scaling=self.scaling) if config.init in BASE_INITS else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The scaling multiplies the rank-r intermediate (B, T, r), not the (B, T, d_out) output: the same value
        # (bit for bit when α/r is a power of two), for r/d_out of the memory traffic, forward and backward.
        if self.embedding:  # x: token ids (B, T)
            return (F.embedding(x, self.lora_A.T) * self.scaling) @ self.lora_B.T
        return F.linear(F.linear(self.dropout(x), self.lora_A) * self.scaling, self.lora_B)  # (B, T, d_out)

    def mixed_factors(self) -> LowRank:
        """Δ = (α/r)·B A, for mixed batches (see :mod:`unipeft.mixed`)."""
        return LowRank(A=self.lora_A, B=self.lora_B, scale=self.scaling, embedding=self.embedding)

    @property
    def rewrites_base(self) -> bool:
        return self.rewrite is not None

    def set_low_rank_(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """Take these factors (A (r, d_in), B (d_out, r)) in place: Δ = (α/r)·B A (how a combination is written)."""
        with torch.no_grad():
            self.lora_A.copy_(A)
            self.lora_B.copy_(B)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (α/r)·B A, shape (d_out, d_in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def merge_(self, weight: torch.Tensor, bias: torch.Tensor | None, *, insertion: str, scale: float,
               sign: int) -> None:
        weight.add_((self.delta_weight() * (sign * scale)).to(weight.dtype))
        if self.rewrite is not None:  # a PiSSA/OLoRA adapter merged at detach(keep_merged=True) stays in the base
            self.rewrite.merged = sign > 0

    def on_attach(self, base: nn.Module) -> None:
        if self.rewrite is not None:
            self.rewrite.apply(self.lora_A.data, self.lora_B.data)

    def on_detach(self, base: nn.Module) -> None:
        if self.rewrite is not None:
            self.rewrite.restore()
