"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv 2402.09353).

The adapted weight is split into a learned magnitude m and a direction that LoRA updates:

    W' = m ⊙ (W + s·B A) / ‖W + s·B A‖_c,      m ∈ R^{d_out},  m = ‖W‖_c at init,  B = 0 at init

‖·‖_c is the L2 norm of each output row of the (out, in) weight over its inputs (HF peft's ``weight.norm(dim=1)``),
and s = α/r (α/√r with rsLoRA). Following the paper (§4.3) and HF peft, the norm is treated as a constant in the
backward pass. As a parallel delta on the base output h = W x + b this is

    Δ(x) = (f − 1) ⊙ W x + f ⊙ s·B A x,      f = m / ‖W + s·B A‖_c  (detached)

which costs one more product with W per call (HF peft computes the same when dropout is active). Dropout, when set,
applies to x in both terms, as HF peft does in training. The bias is not rescaled.

Merging folds W ← W + c·((f − 1) ⊙ W + f ⊙ s·B A) (c: the composition's fixed scale, 1 for ``add``, which gives
HF's W ← f ⊙ (W + s·B A)); the row factors of that merge are kept (not saved) so that unmerging divides back exactly
as HF peft does: W = (W' − c·f ⊙ s·B A) / (1 + c·(f − 1)). Needs the base weight of its site, so it works on
Linear/Conv1D modules (fused slices such as GPT-2's ``attn.q`` once the core passes the slice on), not embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unipeft.core.delta import Form, FormConfig, SiteShape, register_form
from unipeft.core.factors import LowRank
from unipeft.methods.lora_init import site_weight


@register_form("dora")
@dataclass(frozen=True, kw_only=True)
class DoRAConfig(FormConfig):
    """Hyperparameters of DoRA (those of LoRA; the magnitude vector has none).

    Attributes:
        r: rank of the directional update B A.
        alpha: scaling numerator (s = alpha / r, or alpha / sqrt(r) with rslora).
        dropout: dropout on the input x.
        rslora: rank-stabilised scaling alpha / sqrt(r).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"DoRA rank r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"DoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        """α/r, or α/√r with rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def build(self, shape: SiteShape) -> "DoRA":
        return DoRA(self, shape)


class DoRA(Form):
    """Δ(x) = (f − 1) ⊙ W x + f ⊙ s·B A x with f = m / ‖W + s·B A‖_c (see the module docstring)."""

    reads_base_weight = True  # W is the site's weight with nothing merged, also while neighbours are merged

    def __init__(self, config: DoRAConfig, shape: SiteShape) -> None:
        super().__init__()
        self.site = site_weight(shape, "DoRA")  # the base rows W (d_out, d_in); a plain reference, not a submodule
        self.scaling = config.scaling
        self.lora_A = nn.Parameter(torch.empty(config.r, shape.d_in))  # (r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(shape.d_out, config.r))  # (d_out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        with torch.no_grad():
            norm = torch.linalg.norm(self.site.tensor().float(), dim=1)
        self.magnitude = nn.Parameter(norm.to(self.lora_A.device))  # (d_out,) = ‖W‖_c
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self._merged_rows: tuple[torch.Tensor, torch.Tensor] | None = None  # (1 + c(f−1), c·f) of the merge

    def _factor(self, weight: torch.Tensor) -> torch.Tensor:
        """f = m / ‖W + s·B A‖_c, detached from the graph (the norm is a constant, as in the paper)."""
        direction = weight + self.scaling * (self.lora_B @ self.lora_A).detach().to(weight.dtype)
        norm = torch.linalg.norm(direction, dim=1).detach()
        return self.magnitude / norm  # (d_out,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)
        weight = self.site.tensor()  # (d_out, d_in)
        factor = self._factor(weight)
        lora = F.linear(F.linear(x, self.lora_A), self.lora_B)  # (B, T, d_out)
        return (factor - 1) * F.linear(x, weight) + factor * lora * self.scaling

    def mixed_factors(self) -> LowRank:
        """Δ = (f − 1) ⊙ W x + (f·s) ⊙ B A x as a low-rank term plus a gain on W x, for mixed batches."""
        weight = self.site.tensor().detach()
        factor = self._factor(weight).detach()
        return LowRank(A=self.lora_A, B=(factor * self.scaling)[:, None] * self.lora_B, base_gain=factor - 1,
                       base_weight=weight)

    def delta_weight(self) -> torch.Tensor:
        """The effective ΔW = (f − 1) ⊙ W + f ⊙ s·B A at the current base weight, shape (d_out, d_in)."""
        weight = self.site.tensor().detach()
        factor = self._factor(weight)[:, None]
        return (factor - 1) * weight + factor * (self.scaling * (self.lora_B @ self.lora_A))

    def merge_(self, weight: torch.Tensor, bias: torch.Tensor | None, *, insertion: str, scale: float,
               sign: int) -> None:
        lora = (self.scaling * (self.lora_B @ self.lora_A)).float()  # (d_out, d_in)
        if sign > 0:
            norm = torch.linalg.norm(weight.float() + lora, dim=1)
            factor = self.magnitude.float() / norm
            keep, add = 1 + scale * (factor - 1), scale * factor
            self._merged_rows = (keep, add)
            weight.copy_((keep[:, None] * weight.float() + add[:, None] * lora).to(weight.dtype))
        else:
            if self._merged_rows is None:
                raise RuntimeError("this DoRA delta is not merged")
            keep, add = self._merged_rows
            self._merged_rows = None
            weight.copy_(((weight.float() - add[:, None] * lora) / keep[:, None]).to(weight.dtype))
