"""The empirical Fisher information of base weights, and FishMask's global top-k choice (Sung et al. 2021,
arXiv 2111.09839).

    F_j = (1 / N) Σ_{batches b} (∂L_b / ∂W_j)²,        mask = the k entries j with the largest F_j, over all sites

FishMask (:mod:`unipeft.methods.sparse`) trains only the chosen entries. Sung et al. average squared per-example
gradients; here each batch gives one gradient (batches of one example reproduce the paper's estimate exactly).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from unipeft.core.adapted import Handle
from unipeft.core.modules import is_conv1d
from unipeft.core.positions import resolve_positions
from unipeft.core.site import base_named_modules

#: Where FishMask looks by default: every projection present in every family.
DEFAULT_POSITIONS: tuple[str, ...] = ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.down")

LossFn = Callable[[nn.Module, Any], torch.Tensor]
#: One place to score: a linear module and the (start, stop) rows of its (out, in) weight, or None for all rows.
Target = tuple[nn.Module, "tuple[int, int] | None"]


def model_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The model's own loss on a batch with labels: ``model(**batch).loss``.

    Raises:
        ValueError: if the model returns no loss (the batch has no labels).
    """
    loss = model(**batch).loss
    if loss is None:
        raise ValueError("the model returned no loss: give batches with labels, or a loss_fn(model, batch)")
    return loss


def _linear_weight(module: nn.Module) -> nn.Parameter:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 2 or isinstance(module, nn.Embedding):
        raise ValueError(f"Fisher scores need a linear module (Linear or Conv1D), got {type(module).__name__}")
    return weight


def fisher_scores(model: nn.Module, targets: Sequence[Target], batches: Iterable[Any], *,
                  loss_fn: LossFn = model_loss) -> list[torch.Tensor]:
    """Empirical Fisher information of each target's weight rows, as (rows, in) float32 tensors.

    The weights are made to require grad only while the batches run (their flags are restored after); gradients go
    through ``torch.autograd.grad``, so no ``.grad`` of the model is touched. The model's train/eval mode is kept.

    Raises:
        ValueError: for a target that is not a linear module, or no batches.
    """
    weights: dict[int, nn.Parameter] = {}
    for module, _ in targets:
        weight = _linear_weight(module)
        weights.setdefault(id(weight), weight)
    params = list(weights.values())
    sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
    flags = [p.requires_grad for p in params]
    seen = 0
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            for batch in batches:
                grads = torch.autograd.grad(loss_fn(model, batch), params, allow_unused=True)
                for total, grad in zip(sums, grads):
                    if grad is not None:
                        total.addcmul_(grad.float(), grad.float())
                seen += 1
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    if seen == 0:
        raise ValueError("the Fisher information needs at least one batch")
    by_id = {key: total / seen for key, total in zip(weights, sums)}
    scores = []
    for module, rows in targets:
        score = by_id[id(_linear_weight(module))]
        score = score.T if is_conv1d(module) else score  # (out, in)
        scores.append(score if rows is None else score[rows[0]:rows[1]])
    return scores


def budget(k: float | int, total: int) -> int:
    """How many entries ``k`` means among ``total``: a float in (0, 1] is a fraction, an int >= 0 a count.

    Raises:
        ValueError: for a fraction outside (0, 1] or a count above ``total``.
    """
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise ValueError(f"k must be a fraction (float in (0, 1]) or a count (int), got {k!r}")
    if isinstance(k, float):
        if not 0.0 < k <= 1.0:
            raise ValueError(f"a fraction k must be in (0, 1], got {k}")
        return round(k * total)
    if not 0 <= k <= total:
        raise ValueError(f"a count k must be in [0, {total}] (the candidate entries), got {k}")
    return k


def global_top_k(scores: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """The k largest entries over all score tensors together: per tensor, the sorted flat indices (int64) chosen."""
    flat = torch.cat([s.reshape(-1) for s in scores]) if scores else torch.zeros(0)
    chosen = torch.topk(flat, k, sorted=False).indices.sort().values
    sizes = torch.tensor([s.numel() for s in scores], device=chosen.device)
    ends = torch.cumsum(sizes, 0)
    cuts = [0, *torch.searchsorted(chosen, ends).tolist()]
    starts = [0, *ends.tolist()[:-1]]
    return [chosen[cuts[i]:cuts[i + 1]] - starts[i] for i in range(len(scores))]


def compute_fisher_mask(peft_or_model: Handle | nn.Module, batches: Iterable[Any],
                        positions: Sequence[str] | None = None, k: float | int = 0.005, *,
                        layers: Sequence[int] | None = None,
                        stacks: Sequence[str] | None = None, loss_fn: LossFn = model_loss) -> dict[str, torch.Tensor]:
    """FishMask's mask: the k base-weight entries with the largest empirical Fisher information, chosen globally.

    Args:
        peft_or_model: a model, or a :class:`unipeft.Peft` (its base model is scored through the adapters).
        batches: a few real batches (mappings passed as ``model(**batch)``, with labels for the loss).
        positions: canonical positions of linear modules (default: every attention and FFN projection present in
            every family); ``layers``/``stacks`` select layers as in recipes.
        k: a fraction (float in (0, 1]) of the candidate entries, or a count (int).
        loss_fn: ``loss_fn(model, batch) -> loss``; default ``model(**batch).loss``.

    Returns:
        Module name → boolean mask of its (out, in) weight (rows of fused projections outside the chosen positions
        are all False).

    Raises:
        ValueError: for an unknown position, a non-linear site, a bad k, or no batches.
    """
    model = peft_or_model.model if isinstance(peft_or_model, Handle) else peft_or_model
    sites = resolve_positions(model, positions or DEFAULT_POSITIONS, layers=layers, stacks=stacks)
    modules = dict(base_named_modules(model))
    targets = [(modules[s.module], s.out_slice) for s in sites]
    scores = fisher_scores(model, targets, batches, loss_fn=loss_fn)
    chosen = global_top_k(scores, budget(k, sum(s.numel() for s in scores)))
    masks: dict[str, torch.Tensor] = {}
    for site, (module, rows), score, picked in zip(sites, targets, scores, chosen):
        weight = _linear_weight(module)
        out_in = weight.shape[::-1] if is_conv1d(module) else weight.shape
        mask = masks.setdefault(site.module, torch.zeros(out_in, dtype=torch.bool, device=weight.device))
        start = rows[0] if rows is not None else 0
        block = torch.zeros(score.numel(), dtype=torch.bool, device=weight.device)
        block[picked] = True
        mask[start:start + score.shape[0]] |= block.view(score.shape)
    return masks


__all__ = ["compute_fisher_mask", "fisher_scores", "global_top_k", "budget", "model_loss", "DEFAULT_POSITIONS"]
