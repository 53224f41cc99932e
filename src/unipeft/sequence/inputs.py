"""Virtual tokens prepended to the model's input, through forward pre-hooks that edit the call's keyword arguments.

For a decoder-only or encoder-only model one pre-hook on the model
(``register_forward_pre_hook(..., with_kwargs=True)``) turns ``input_ids`` into ``inputs_embeds`` with the running
prompts P (n, d) in front, and keeps the other inputs aligned with the n+T positions:

    inputs_embeds  = [P ; E(input_ids)]            (B, n + T, d)
    attention_mask = [1 … 1 ; attention_mask]      (B, n + T)
    labels         = [-100 … -100 ; labels]        token-level labels only (B, T); sequence labels are left alone
    token_type_ids = [0 … 0 ; token_type_ids]      position_ids = [0 … n-1 ; position_ids + n]

This happens only while the KV cache is empty (the first generation step, or every step without a cache); later steps
find the prompt in the cache and only get their attention mask and position ids extended.

For an encoder-decoder model the prompt goes in front of the encoder's input: a pre-hook on the encoder prepends it
(this also covers ``generate``, which runs the encoder on its own), and a pre-hook on the model extends the encoder
attention mask that the decoder's cross-attention reads.
"""

from __future__ import annotations

import inspect
import weakref
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

if TYPE_CHECKING:
    from unipeft.core.site import DeltaSite, Placed

IGNORE_INDEX = -100


class _Prompts:
    """The prompts bound to one model: (host site, placed form) pairs and the pre-hooks that insert them."""

    def __init__(self, model: nn.Module) -> None:
        self.entries: list[tuple["DeltaSite", "Placed"]] = []
        config = getattr(model, "config", None)
        self.encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        self.handles: list[RemovableHandle] = [model.register_forward_pre_hook(self._before_model, with_kwargs=True)]
        if self.encoder_decoder:
            encoder = model.get_encoder()
            self.handles.append(encoder.register_forward_pre_hook(self._before_encoder, with_kwargs=True))

    def prompts(self) -> torch.Tensor | None:
        """The running prompts of the active adapters, concatenated in adapter order: (n, d), or None."""
        running = [placed.form() for host, placed in self.entries if placed in host.sequence]
        return torch.cat(running, dim=0) if running else None

    def _before_model(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        prompts = self.prompts()
        if prompts is None:
            return None
        kw = call_kwargs(model, args, kwargs)
        n = prompts.shape[0]
        if self.encoder_decoder:
            _extend_encoder_mask(kw, n)
            return (), kw
        past = kw.get("past_key_values")
        seen = past.get_seq_length() if past is not None else 0
        if seen == 0:
            _prepend(kw, prompts, model.get_input_embeddings(), token_labels=True)
        else:
            tokens = kw["input_ids"] if kw.get("input_ids") is not None else kw["inputs_embeds"]
            mask = kw.get("attention_mask")
            if mask is not None and mask.dim() == 2 and mask.shape[1] == seen - n + tokens.shape[1]:
                kw["attention_mask"] = _ones_before(mask, n)
            if kw.get("position_ids") is not None:
                kw["position_ids"] = kw["position_ids"] + n
        return (), kw

    def _before_encoder(self, encoder: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        prompts = self.prompts()
        if prompts is None:
            return None
        kw = call_kwargs(encoder, args, kwargs)
        _prepend(kw, prompts, encoder.get_input_embeddings(), token_labels=False)
        return (), kw

    def remove(self) -> None:
        """Remove the pre-hooks."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def call_kwargs(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments as keywords, positional ones named after ``module.forward``'s parameters."""
    kw = dict(kwargs)
    if args:
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        names = [p.name for p in inspect.signature(module.forward).parameters.values() if p.kind in kinds]
        if len(args) > len(names):
            raise TypeError(f"{type(module).__name__} got {len(args)} positional arguments; expected at most "
                            f"{len(names)} ({', '.join(names)})")
        kw.update(zip(names, args))
    return kw


def _ones_before(mask: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)


def _prepend(kw: dict[str, Any], prompts: torch.Tensor, embed: nn.Module, *, token_labels: bool) -> None:
    """Put the prompts in front of the input embeddings and align the other per-token inputs (see the module doc)."""
    embeds = kw.get("inputs_embeds")
    if embeds is None:
        embeds = embed(kw["input_ids"])  # (B, T, d)
    batch, length = embeds.shape[:2]
    n = prompts.shape[0]
    kw["inputs_embeds"] = torch.cat([prompts.to(embeds.dtype).expand(batch, -1, -1), embeds], dim=1)
    kw["input_ids"] = None
    mask = kw.get("attention_mask")
    if mask is not None and mask.dim() == 2 and mask.shape[1] == length:
        kw["attention_mask"] = _ones_before(mask, n)
    labels = kw.get("labels")
    if token_labels and labels is not None and labels.dim() == 2 and labels.shape[1] == length:
        kw["labels"] = torch.cat([labels.new_full((batch, n), IGNORE_INDEX), labels], dim=1)
    types = kw.get("token_type_ids")
    if types is not None:
        kw["token_type_ids"] = torch.cat([types.new_zeros(types.shape[0], n), types], dim=1)
    positions = kw.get("position_ids")
    if positions is not None:
        first = torch.arange(n, device=positions.device, dtype=positions.dtype).expand(positions.shape[0], n)
        kw["position_ids"] = torch.cat([first, positions + n], dim=1)


def _extend_encoder_mask(kw: dict[str, Any], n: int) -> None:
    """Extend an encoder-decoder model's encoder attention mask to cover the prompt (once)."""
    mask = kw.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return
    encoded = kw.get("encoder_outputs")
    if encoded is not None:
        if mask.shape[1] == encoded[0].shape[1] - n:
            kw["attention_mask"] = _ones_before(mask, n)
        return
    source = kw["input_ids"] if kw.get("input_ids") is not None else kw.get("inputs_embeds")
    if source is not None and mask.shape[1] == source.shape[1]:
        kw["attention_mask"] = _ones_before(mask, n)


_BOUND: "weakref.WeakKeyDictionary[nn.Module, _Prompts]" = weakref.WeakKeyDictionary()


def bind_prompt(model: nn.Module, host: "DeltaSite", placed: "Placed") -> Callable[[], None]:
    """Insert ``placed``'s prompt in front of ``model``'s input while its adapter is active.

    Returns:
        A function that undoes this binding (removing the pre-hooks with the last prompt).
    """
    bound = _BOUND.get(model)
    if bound is None:
        bound = _BOUND[model] = _Prompts(model)
    bound.entries.append((host, placed))

    def release() -> None:
        if (host, placed) not in bound.entries:
            return
        bound.entries.remove((host, placed))
        if not bound.entries:
            bound.remove()
            _BOUND.pop(model, None)

    return release


__all__ = ["bind_prompt", "IGNORE_INDEX"]
