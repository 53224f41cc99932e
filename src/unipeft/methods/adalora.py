"""AdaLoRA: adaptive budget allocation for LoRA (Zhang et al. 2023, arXiv 2303.10512).

Each site learns its update in SVD form, and the rank budget moves during training to the sites that need it:

    Δ(x) = P Λ Q x · α / (r₀ + 10⁻⁵),     Q ∈ R^{r₀×d_in} (``lora_A``),  Λ = diag(E) (``lora_E``, 0 at init),
                                           P ∈ R^{d_out×r₀} (``lora_B``),  r₀ = ``init_r``

with P, Q ~ N(0, 0.02²) and the orthogonality regulariser R = ‖QQᵀ − I‖_F + ‖PᵀP − I‖_F, weighted by
``orth_reg_weight`` and averaged over the matrices (:meth:`AdaLoRA.loss_term`, which ``peft.loss_term()`` gathers
for the training loss).
Every singular triplet i gets the importance S_i = s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji), where for each entry
s = Ī·Ū, Ī the EMA (β₁) of the sensitivity I = |θ·∇θ| and Ū the EMA (β₂) of |I − Ī|. The total budget (in
triplets over all sites of the adapter) falls from Σ init_r to target_r × n_sites on a cubic schedule:

    b(t) = b₀                                    for t ≤ t_init
    b(t) = b_T + (b₀ − b_T)(1 − (t − t_init)/(T − t_final − t_init))³   (every ``deltaT`` steps: mask to b(t))
    b(t) = b_T, ranks fixed                      for t ≥ T − t_final

and the triplets with the lowest S have λ_i set to 0. This follows HF peft's ``RankAllocator`` step for step;
``Peft.on_step(step, total_steps)`` drives it (HF's ``update_and_allocate(global_step)`` with ``total_step``); every
training loop calls it (unipeft's, ``AdapterTrainer`` through a callback, a plain loop). It reads the gradients, so
it runs after ``optimizer.step()`` and *before* ``optimizer.zero_grad()``, as HF peft requires.

Because the budget is global, all sites of one adapter share a :class:`RankAllocator`: ``AdaLoRAConfig.build`` joins
the allocator that is open for equal configs, and the first ``on_attach`` of its sites closes it, so every ``Peft.add``
gets its own (sites placed by several equal AdaLoRA deltas of one recipe share one budget). Deliberate differences
from HF peft: the saved adapter keeps all init_r triplets (masked λ are 0) plus a boolean ``rank_mask`` buffer per
site, instead of resizing tensors to the rank pattern; ``ranknum`` is a constant, not a frozen parameter, so HF's
"all params" count has one more parameter per site (the trainable counts agree). Linear in the weight: it merges.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from unipeft.core.delta import Form, FormConfig, SiteShape, register_form
from unipeft.core.factors import LowRank

if TYPE_CHECKING:
    from unipeft.core.adapted import Handle

log = logging.getLogger(__name__)


@register_form("adalora")
@dataclass(frozen=True, kw_only=True)
class AdaLoRAConfig(FormConfig):
    """Hyperparameters of AdaLoRA (names and defaults as HF peft's ``AdaLoraConfig``).

    Attributes:
        init_r: initial rank r₀ of every site.
        target_r: average rank per site at the end of the schedule (the final budget is target_r × sites).
        alpha: scaling numerator (scaling = alpha / (init_r + 1e-5), as HF peft).
        dropout: dropout on the input x.
        tinit: warm-up steps before the budget starts to shrink.
        tfinal: final steps with the budget fixed at its target.
        deltaT: reallocate every deltaT steps while the budget shrinks.
        beta1: EMA coefficient of the sensitivity.
        beta2: EMA coefficient of the uncertainty.
        orth_reg_weight: weight of the orthogonality regulariser (see :func:`adalora_orth_loss`).
    """

    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5

    def __post_init__(self) -> None:
        if self.init_r < 1:
            raise ValueError(f"AdaLoRA init_r must be >= 1, got {self.init_r}")
        if not 0 <= self.target_r <= self.init_r:
            raise ValueError(f"AdaLoRA target_r must be in [0, init_r={self.init_r}], got {self.target_r}")
        if self.alpha <= 0:
            raise ValueError(f"AdaLoRA alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"AdaLoRA dropout must be in [0, 1), got {self.dropout}")
        if self.tinit < 0 or self.tfinal < 0 or self.deltaT < 1:
            raise ValueError(f"AdaLoRA needs tinit >= 0, tfinal >= 0 and deltaT >= 1, got tinit={self.tinit}, "
                             f"tfinal={self.tfinal}, deltaT={self.deltaT}")
        for name in ("beta1", "beta2"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"AdaLoRA {name} must be in (0, 1), got {getattr(self, name)}")
        if self.orth_reg_weight < 0:
            raise ValueError(f"AdaLoRA orth_reg_weight must be >= 0, got {self.orth_reg_weight}")

    def build(self, shape: SiteShape) -> "AdaLoRA":
        return AdaLoRA(self, shape, RankAllocator.open_for(self))


class AdaLoRA(Form):
    """Δ(x) = P diag(E) Q x · α/(r₀ + 1e-5) (see the module docstring)."""

    def __init__(self, config: AdaLoRAConfig, shape: SiteShape, allocator: "RankAllocator") -> None:
        super().__init__()
        if shape.d_in is None:
            raise ValueError("AdaLoRA needs a site with input features (a linear projection), not an embedding")
        r = config.init_r
        self.r = r
        self.scaling = config.alpha / (r + 1e-5)  # HF: lora_alpha / (ranknum + 1e-5), ranknum = init_r
        self.orth_reg_weight = config.orth_reg_weight
        self.lora_A = nn.Parameter(torch.empty(r, shape.d_in))  # Q (r, d_in)
        self.lora_E = nn.Parameter(torch.zeros(r, 1))  # Λ (r, 1)
        self.lora_B = nn.Parameter(torch.empty(shape.d_out, r))  # P (d_out, r)
        nn.init.normal_(self.lora_A, std=0.02)
        nn.init.normal_(self.lora_B, std=0.02)
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool))  # kept triplets; saved with the adapter
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.allocator = allocator  # shared by the adapter's sites; a plain object, not a submodule
        self.attached = False
        self.merged = False
        allocator.add(self)

    @property
    def rank(self) -> int:
        """The number of triplets kept by the last reallocation (init_r before the first)."""
        return int(self.rank_mask.sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(x), self.lora_A * self.lora_E), self.lora_B) * self.scaling

    def mixed_factors(self) -> LowRank:
        """Δ = (s·P)(diag(E) Q) x, for mixed batches (see :mod:`unipeft.mixed`)."""
        return LowRank(A=self.lora_A * self.lora_E, B=self.lora_B, scale=self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = P diag(E) Q · α/(r₀ + 1e-5), shape (d_out, d_in)."""
        return (self.lora_B @ (self.lora_A * self.lora_E)) * self.scaling

    def merge_(self, weight: torch.Tensor, bias: torch.Tensor | None, *, insertion: str, scale: float,
               sign: int) -> None:
        weight.add_((self.delta_weight() * (sign * scale)).to(weight.dtype))
        self.merged = sign > 0

    def orthogonality(self) -> torch.Tensor:
        """‖QQᵀ − I‖_F + ‖PᵀP − I‖_F (differentiable)."""
        eye = torch.eye(self.r, device=self.lora_A.device, dtype=self.lora_A.dtype)
        q, p = self.lora_A, self.lora_B
        return torch.linalg.norm(q @ q.T - eye) + torch.linalg.norm(p.T @ p - eye)

    def mask_ranks_(self, keep: torch.Tensor) -> None:
        """Keep the triplets where ``keep`` (r,) is True and zero the others' singular values."""
        with torch.no_grad():
            self.rank_mask.copy_(keep)
            self.lora_E.masked_fill_(~keep[:, None], 0.0)

    def on_attach(self, base: nn.Module) -> None:
        self.attached = True
        self.allocator.close()

    def on_detach(self, base: nn.Module) -> None:
        self.attached = False

    def loss_term(self) -> torch.Tensor:
        """This site's share of the orthogonality regulariser: orth_reg_weight · (‖QQᵀ − I‖_F + ‖PᵀP − I‖_F) / (2n),
        n the sites of its budget, so the adapter's terms sum to HF peft's mean over its P and Q matrices."""
        return self.orth_reg_weight * self.orthogonality() / (2 * max(len(self.allocator.sites()), 1))

    def on_step(self, step: int, total_steps: int) -> bool:
        if not self.merged:
            self.allocator.step(step, total_steps)
        return False


class RankAllocator:
    """The rank budget of one adapter's AdaLoRA sites: importance scores and the masking schedule (HF's
    ``RankAllocator`` + ``AdaLoraModel.update_and_allocate``). Holds its sites weakly."""

    _open: dict[AdaLoRAConfig, "RankAllocator"] = {}

    def __init__(self, config: AdaLoRAConfig) -> None:
        self.config = config
        self._sites: list[weakref.ReferenceType[AdaLoRA]] = []
        self._scores: "weakref.WeakKeyDictionary[AdaLoRA, dict[str, tuple[torch.Tensor, torch.Tensor]]]" = \
            weakref.WeakKeyDictionary()
        self._last_step: int | None = None

    @classmethod
    def open_for(cls, config: AdaLoRAConfig) -> "RankAllocator":
        """The allocator still taking sites for configs equal to ``config`` (a new one if none is open)."""
        if config not in cls._open:
            cls._open[config] = cls(config)
        return cls._open[config]

    def close(self) -> None:
        """Take no more sites: the next build with an equal config starts a new allocator (a new adapter)."""
        if RankAllocator._open.get(self.config) is self:
            del RankAllocator._open[self.config]

    def add(self, site: AdaLoRA) -> None:
        """Share this budget with ``site``."""
        self._sites.append(weakref.ref(site))

    def sites(self) -> list[AdaLoRA]:
        """The attached sites sharing this budget."""
        return [s for s in (ref() for ref in self._sites) if s is not None and s.attached]

    def budgets(self) -> tuple[int, int]:
        """(initial, target) budget in triplets over all sites."""
        sites = self.sites()
        return sum(s.r for s in sites), self.config.target_r * len(sites)

    def schedule(self, step: int, total_steps: int) -> tuple[int, bool]:
        """(budget at ``step``, whether to mask at this step): the cubic schedule of the paper (HF's
        ``budget_schedule``)."""
        c = self.config
        initial, target = self.budgets()
        if step <= c.tinit:
            return initial, False
        if step > total_steps - c.tfinal:
            return target, True
        remaining = 1 - (step - c.tinit) / (total_steps - c.tfinal - c.tinit)
        return int((initial - target) * remaining ** 3 + target), step % c.deltaT == 0

    def step(self, step: int, total_steps: int) -> None:
        """Update the importance scores and reallocate the budget after optimizer step ``step`` (once per step,
        however many sites report it).

        Raises:
            ValueError: if the schedule leaves no budgeting phase (tinit >= total_steps - tfinal).
            RuntimeError: if no site has a gradient while the scores are still being updated.
        """
        if step == self._last_step:
            return
        self._last_step = step
        c = self.config
        final = total_steps - c.tfinal
        if c.tinit >= final:
            raise ValueError(f"AdaLoRA's schedule leaves no budgeting phase: tinit={c.tinit} >= total_steps - "
                             f"tfinal = {total_steps} - {c.tfinal}; lower tinit/tfinal or train longer")
        sites = self.sites()
        if not sites:
            return
        if step < final:
            self._update_scores(sites)
            budget, mask = self.schedule(step, total_steps)
            if mask:
                self._mask_to_budget(sites, budget)
        elif step == final:  # fix the ranks at the target budget
            self._mask_to_budget(sites, self.budgets()[1])
            self._scores.clear()
        else:  # keep the fixed pattern (the optimizer may move masked λ back from 0)
            for site in sites:
                site.mask_ranks_(site.rank_mask.clone())

    def _update_scores(self, sites: list[AdaLoRA]) -> None:
        c = self.config
        if all(p.grad is None for s in sites for p in (s.lora_A, s.lora_E, s.lora_B)):
            raise RuntimeError("AdaLoRA ranks its singular values by |θ·∇θ| but no gradient is present: call "
                               "peft.on_step(step, total_steps) after optimizer.step() and before "
                               "optimizer.zero_grad()")
        with torch.no_grad():
            for site in sites:
                scores = self._scores.setdefault(site, {})
                for name, p in (("A", site.lora_A), ("E", site.lora_E), ("B", site.lora_B)):
                    sensitivity = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
                    ipt, unc = scores.get(name, (torch.zeros_like(p), torch.zeros_like(p)))
                    ipt = c.beta1 * ipt + (1 - c.beta1) * sensitivity
                    unc = c.beta2 * unc + (1 - c.beta2) * (sensitivity - ipt).abs()
                    scores[name] = (ipt, unc)

    def _triplet_scores(self, site: AdaLoRA) -> torch.Tensor:
        scores = self._scores.get(site)
        if scores is None:
            return torch.zeros(site.r, device=site.lora_E.device)
        s = {name: ipt * unc for name, (ipt, unc) in scores.items()}
        return s["E"].view(-1) + (s["A"].mean(dim=1) + s["B"].mean(dim=0))  # (r,), summed in HF's order

    def _mask_to_budget(self, sites: list[AdaLoRA], budget: int) -> None:
        initial = sum(s.r for s in sites)
        triplets = [self._triplet_scores(s) for s in sites]
        k = initial - budget
        if k <= 0:
            threshold = None
        else:
            threshold = torch.kthvalue(torch.cat([t.float().cpu() for t in triplets]), k).values.item()
        for site, score in zip(sites, triplets):
            keep = torch.ones_like(site.rank_mask) if threshold is None else score > threshold
            site.mask_ranks_(keep)
        log.debug("AdaLoRA budget %d of %d triplets: ranks %s", budget, initial, [s.rank for s in sites])


def adalora_orth_loss(peft: "Handle", name: str | None = None) -> torch.Tensor:
    """AdaLoRA's orthogonality regulariser of adapter ``name`` (default: the active ones): the sum of its sites'
    :meth:`AdaLoRA.loss_term`, orth_reg_weight × the mean over its P and Q matrices of ‖PᵀP − I‖_F, ‖QQᵀ − I‖_F (HF
    peft adds the same term to ``outputs.loss`` in ``AdaLoraModel.forward``). Training loops add
    ``peft.loss_term()``, which includes it; this names AdaLoRA's part alone.

    Returns:
        A scalar tensor (0 when no adapter has AdaLoRA deltas).
    """
    names = [name] if name is not None else list(peft.active)
    terms = [p.form.loss_term() for adapter in names for _, p in peft.delta_modules(adapter)
             if isinstance(p.form, AdaLoRA)]
    if not terms:
        return torch.zeros((), device=next(iter(peft.model.parameters())).device)
    return torch.stack(terms).sum()


__all__ = ["AdaLoRA", "AdaLoRAConfig", "RankAllocator", "adalora_orth_loss"]
