"""Pure tensor operations for combining adapters: task arithmetic, TIES, DARE, magnitude pruning, truncated SVD.

Every function takes the n task tensors t_1..t_n of one site (same shape) and weights w_1..w_n, and returns one tensor.

* task arithmetic (Ilharco et al. 2023, arXiv 2212.04089):   τ = Σ_i w_i t_i
* magnitude pruning:                                         τ = Σ_i w_i trim_ρ(t_i)
* TIES (Yadav et al. 2023, arXiv 2306.01708):
      trim:       t̂_i = trim_ρ(t_i)               keep the ⌊ρ·numel⌋ entries of largest |t_i|, zero the rest
      elect:      γ = sgn(Σ_i t̂_i)  ("total": by mass)  or  sgn(Σ_i sgn(t̂_i))  ("frequency"); γ = +1 where 0
      disjoint:   τ = Σ_i w_i t̂_i [sgn(t̂_i) = γ] / max(1, Σ_i [sgn(t̂_i) = γ])
* DARE (Yu et al. 2023, arXiv 2311.03099, "Language Models are Super Mario"):
      drop:       t̃_i = m_i ⊙ t_i / ρ,  m_i ~ Bernoulli(ρ) elementwise (drop with probability 1 - ρ, rescale by 1/ρ)
      dare_linear: τ = Σ_i w_i t̃_i;   dare_ties: elect and disjoint mean as TIES, on t̃_i (no magnitude trim)

These follow Hugging Face peft's ``peft.utils.merge_utils`` (0.21) exactly, including where the weights enter: the
sign is elected on the unweighted tensors and the disjoint mean divides the *weighted* sum by the count of agreeing
entries. ρ ≥ 1 keeps every entry and draws no random numbers. The random masks are drawn with ``torch.bernoulli`` on
``generator`` (None: torch's global generator), one tensor after another in the order given.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

TaskMethod = Literal["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
TASK_METHODS: tuple[str, ...] = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SignMethod = Literal["total", "frequency"]


def trim(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ⌊density·numel⌋ entries of largest magnitude, zero the others (all kept for density ≥ 1)."""
    if density >= 1:
        return tensor
    k = int(density * tensor.numel())
    flat = tensor.reshape(-1)
    mask = torch.zeros_like(flat)
    mask[torch.topk(flat.abs(), k=k, largest=True).indices] = 1
    return tensor * mask.view_as(tensor)


def random_drop(tensor: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE's drop-and-rescale: m ⊙ t / ρ with m ~ Bernoulli(ρ) (unchanged, and no draw, for ρ ≥ 1)."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def elect_sign(stacked: torch.Tensor, method: SignMethod = "total") -> torch.Tensor:
    """TIES's sign election over dim 0 of ``stacked`` (n, ...): the mask of entries whose sign agrees with γ.

    Raises:
        ValueError: for an unknown ``method``.
    """
    signs = stacked.sign()
    if method == "total":
        mass = stacked.sum(dim=0)
    elif method == "frequency":
        mass = signs.sum(dim=0)
    else:
        raise ValueError(f"unknown majority sign method {method!r}; valid: total, frequency")
    elected = torch.where(mass >= 0, 1.0, -1.0).to(stacked.dtype)
    return signs == elected


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """TIES's disjoint merge: Σ_i weighted_i·agree_i / max(1, Σ_i agree_i) over dim 0."""
    total = (weighted * agree).sum(dim=0)
    return total / agree.sum(dim=0).clamp(min=1).to(weighted.dtype)


def _weights(tensors: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    w = torch.as_tensor(list(weights), dtype=tensors.dtype, device=tensors.device)
    return w.view(-1, *([1] * (tensors.dim() - 1)))  # (n, 1, ..., 1)


def merge_tensors(method: TaskMethod, tensors: Sequence[torch.Tensor], weights: Sequence[float], *,
                  density: float = 1.0, majority_sign: SignMethod = "total",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Combine n same-shaped task tensors into one (see the module docstring for each method's equation).

    Args:
        method: linear, ties, dare_linear, dare_ties or magnitude_prune.
        tensors: the task tensors t_i.
        weights: one weight w_i per tensor.
        density: ρ, the fraction of entries kept (ignored by ``linear``).
        majority_sign: TIES's sign election, ``total`` or ``frequency``.
        generator: the random generator of DARE's masks.

    Raises:
        ValueError: for an unknown method, no tensors, or a weight count that differs from the tensor count.
    """
    if method not in TASK_METHODS:
        raise ValueError(f"unknown task-arithmetic method {method!r}; valid: {', '.join(TASK_METHODS)}")
    if not tensors or len(tensors) != len(weights):
        raise ValueError(f"need one weight per tensor and at least one tensor; got {len(tensors)} tensors and "
                         f"{len(weights)} weights")
    if method in ("ties", "magnitude_prune"):
        tensors = [trim(t, density) for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        tensors = [random_drop(t, density, generator) for t in tensors]
    stacked = torch.stack(list(tensors), dim=0)  # (n, ...)
    weighted = stacked * _weights(stacked, weights)
    if method in ("ties", "dare_ties"):
        return disjoint_mean(weighted, elect_sign(stacked, majority_sign))
    return weighted.sum(dim=0)


def svd_factors(delta: torch.Tensor, rank: int, *, clamp: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor an (out, in) ΔW into LoRA factors of rank ``rank`` by truncated SVD: ΔW ≈ B A with
    B = U_r diag(S_r) (out, rank) and A = V_rᵀ (rank, in) (Eckart–Young: the best rank-r approximation).

    Ranks above min(out, in) are padded with zero components. With ``clamp`` = q, the entries of B and A are clamped to
    [-h, h] with h the q-quantile of all their entries (kohya-ss's svd_merge_lora, as HF peft's ``svd_clamp``).
    """
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    b = u[:, :rank] * s[:rank]  # (out, k)
    a = vh[:rank]  # (k, in)
    if clamp is not None:
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b, a = b.clamp(-high, high), a.clamp(-high, high)
    if b.shape[1] < rank:  # the matrix has fewer than `rank` singular values
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], dim=1)
        a = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])], dim=0)
    return b, a
