"""The causal-LM training loss, with the LM head computed only where there are labels, chunked over the vocabulary.

A causal LM's head turns every position's hidden state h_t into V logits, but instruction tuning takes the loss on
the response only, so most of those logits are thrown away, and at V = 49,152 (SmolLM2) a batch of 8×512 tokens holds
800 MB of float32 logits before their softmax and its gradient. Here the loss is

    L = Σ_{t : y_t labelled} ( logsumexp_v (W h_t)_v − (W h_t)_{y_t} )

over the labelled positions only (the shift: position t predicts token t+1), and ``chunked_cross_entropy`` computes it
chunk by chunk over the vocabulary with a running logsumexp (Milakov & Gimelshein 2018, "Online normalizer calculation
for softmax"; the trick of Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models"), keeping
only the (N,) logsumexp for the backward, which recomputes each chunk's logits:

    ∂L/∂h_t = Σ_chunks (softmax(W h_t)_c − onehot(y_t)_c) W_c,      ∂L/∂W_c = Σ_t (softmax_c − onehot_c)^T h_t

so no (N, V) tensor ever exists. The loss is a sum; the caller divides by the batch's label count.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from unipeft.data import IGNORE_INDEX

#: Vocabulary entries per chunk: 8,192 keeps a chunk of 4,096 labelled positions at 128 MiB of float32.
DEFAULT_CHUNK = 8192


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                chunk: int) -> torch.Tensor:
        lse = torch.full((hidden.shape[0],), float("-inf"), dtype=_accumulator(hidden), device=hidden.device)
        picked = torch.zeros_like(lse)
        for start in range(0, weight.shape[0], chunk):
            logits = _logits(hidden, weight, bias, start, chunk)  # (N, c) float32
            lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
            inside = (targets >= start) & (targets < start + logits.shape[1])
            rows = inside.nonzero().squeeze(1)
            picked[rows] = logits[rows, targets[rows] - start]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk = chunk
        return (lse - picked).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        chunk = ctx.chunk
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = _accumulator(hidden)
        grad_h = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        for start in range(0, weight.shape[0], chunk):
            logits = _logits(hidden, weight, bias, start, chunk)
            d = torch.exp(logits - lse[:, None])  # softmax over the whole vocabulary, this chunk's columns
            inside = (targets >= start) & (targets < start + logits.shape[1])
            rows = inside.nonzero().squeeze(1)
            d[rows, targets[rows] - start] -= 1.0
            d = d * grad
            end = start + logits.shape[1]
            if need_h:
                grad_h += d.to(hidden.dtype) @ weight[start:end].to(hidden.dtype)
            if need_w:
                grad_w[start:end] += d.t() @ hidden.to(acc)
            if need_b:
                grad_b[start:end] += d.sum(0)
        return (grad_h.to(hidden.dtype) if need_h else None, grad_w.to(weight.dtype) if need_w else None,
                grad_b.to(bias.dtype) if need_b else None, None, None)


def _accumulator(hidden: torch.Tensor) -> torch.dtype:
    """float32, or the inputs' dtype if wider (float64 in the tests)."""
    return torch.promote_types(hidden.dtype, torch.float32)


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, start: int,
            chunk: int) -> torch.Tensor:
    w = weight[start:start + chunk].to(hidden.dtype)
    logits = (hidden @ w.t()).to(_accumulator(hidden))
    if bias is not None:
        logits = logits + bias[start:start + chunk].to(logits.dtype)
    return logits


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          bias: torch.Tensor | None = None, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Σ_i cross-entropy(W h_i + b, y_i): the summed loss of a linear head over (N, d) ``hidden`` and (N,) ``targets``,
    computed ``chunk`` vocabulary rows at a time (never an (N, V) tensor). Gradients reach ``hidden`` and, if they
    require it, ``weight`` and ``bias``; the logsumexp runs in float32 whatever the inputs' dtype.

    Raises:
        ValueError: for a chunk below 1 or mismatched shapes.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1] or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"expected hidden (N, d), weight (V, d), targets (N,); got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(targets.shape)}")
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return _ChunkedCrossEntropy.apply(hidden, weight, bias, targets, chunk)


def label_count(labels: torch.Tensor) -> int:
    """The positions a causal-LM loss averages over: labels after the shift that are not ignored."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _plain_head(model: nn.Module) -> nn.Linear | None:
    """The model's output layer if the loss may be computed from the body's hidden states with it: a plain
    ``nn.Linear`` head (no delta placed there) outside the body, no pre-/post-hooks on the whole model (prompt tuning
    edits its inputs there), and no logit scaling or soft-capping in the config; else None."""
    if model._forward_pre_hooks or model._forward_hooks or not hasattr(model, "base_model_prefix"):
        return None
    config = getattr(model, "config", None)
    if any(getattr(config, key, None) not in (None, 1.0) for key in ("final_logit_softcapping", "logit_scale")):
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, model.base_model_prefix, None)
    if type(head) is not nn.Linear or not isinstance(body, nn.Module):
        return None
    if any(m is head for m in body.modules()):  # a wrapper (e.g. HF peft's PeftModel) whose "body" is the whole LM
        return None
    return head


def causal_lm_loss_sum(model: nn.Module, batch: Mapping[str, torch.Tensor], *,
                       chunk: int | None = DEFAULT_CHUNK) -> torch.Tensor:
    """The summed next-token cross-entropy of ``batch`` (``input_ids``, ``labels``, and ``attention_mask`` or
    per-example ``position_ids``) over its labelled positions; the head runs only there, over ``chunk`` vocabulary
    rows at a time (``None``: all at once). A model whose head cannot be split off (see :func:`_plain_head`) runs
    whole, with its full logits."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    inputs["use_cache"] = False  # a cache would also hide packed rows' example boundaries from the mask
    labels = batch["labels"]
    shifted = labels[:, 1:]
    keep = shifted != IGNORE_INDEX
    head = _plain_head(model)
    if head is None:
        logits = model(**inputs).logits[:, :-1]
        return F.cross_entropy(logits[keep].float(), shifted[keep], reduction="sum")
    body = getattr(model, model.base_model_prefix)
    hidden = body(**inputs)[0][:, :-1][keep]  # (N, d): the labelled positions only
    targets = shifted[keep]
    if chunk is None:
        return F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    return chunked_cross_entropy(hidden, head.weight, targets, bias=head.bias, chunk=chunk)


__all__ = ["chunked_cross_entropy", "causal_lm_loss_sum", "label_count", "DEFAULT_CHUNK"]
