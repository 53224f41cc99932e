"""Real tokens after the prefix: position ids shifted by the prefix length l, as Li & Liang and HF peft have them.

Li & Liang (2021) run a prefix as past activations, and HF peft as a pre-filled KV cache, so a model numbers the real
tokens after it: positions l..l+T−1 where a plain model has 0..T−1 (and HF peft adds l to position ids it is given,
in ``forward`` and in ``generate``). unipeft puts the prefix inside attention (:mod:`unipeft.sequence.attention`),
outside the cache, so it reproduces the numbering explicitly: a forward pre-hook on the transformer body
(``model.base_model``) rewrites its call's ``position_ids`` to

    position_ids + l                                 when the call has position ids (``generate`` always passes them)
    l + cache_position, or l + past + arange(T)      when it has none (what the model itself would number, plus l)

where l is the largest total length of running shifted prefixes at one attention module. The shift matters wherever a
position enters more than differences between real tokens: learned absolute positions (GPT-2, BERT) and rotary
embeddings (LLaMA), whose queries meet the prefix keys — which carry no rotation — at an absolute angle. Models whose
body takes no ``position_ids`` (T5's relative bias, encoder-decoders) are left as they are.
"""

from __future__ import annotations

import inspect
import weakref
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from unipeft.sequence.inputs import call_kwargs

if TYPE_CHECKING:
    from unipeft.core.site import DeltaSite, Placed


def body(model: nn.Module) -> nn.Module | None:
    """The module whose ``position_ids`` number the real tokens (``model.base_model``), or None where a shift does not
    apply (no ``position_ids`` parameter, or an encoder-decoder model)."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    inner = getattr(model, "base_model", model)
    inner = inner if isinstance(inner, nn.Module) else model
    return inner if "position_ids" in inspect.signature(inner.forward).parameters else None


class _Shift:
    """The shifted prefixes of one model and the pre-hook on its body."""

    def __init__(self, inner: nn.Module) -> None:
        self.entries: list[tuple[int, "DeltaSite", "Placed", int]] = []  # (id of the attention module, ...)
        self.handle: RemovableHandle = inner.register_forward_pre_hook(self._before, with_kwargs=True)

    def length(self) -> int:
        """l: the largest total length of the running shifted prefixes at one attention module."""
        per_module: dict[int, int] = {}
        for module, host, placed, length in self.entries:
            if placed in host.sequence:
                per_module[module] = per_module.get(module, 0) + length
        return max(per_module.values(), default=0)

    def _before(self, inner: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        shift = self.length()
        if shift == 0:
            return None
        kw = call_kwargs(inner, args, kwargs)
        positions = kw.get("position_ids")
        if positions is None:
            positions = _default_positions(kw)
            if positions is None:
                return None
        kw["position_ids"] = positions + shift
        return (), kw


def _default_positions(kw: dict) -> torch.Tensor | None:
    """The positions the model numbers a call without ``position_ids`` by: cache_position, else past + arange(T)."""
    cache_position = kw.get("cache_position")
    if cache_position is not None:
        return cache_position.unsqueeze(0)
    tokens = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
    if tokens is None:
        return None
    past = kw.get("past_key_values")
    seen = past.get_seq_length() if past is not None and hasattr(past, "get_seq_length") else 0
    return torch.arange(seen, seen + tokens.shape[1], device=tokens.device).unsqueeze(0)


_BOUND: "weakref.WeakKeyDictionary[nn.Module, _Shift]" = weakref.WeakKeyDictionary()


def bind_shift(model: nn.Module, module: nn.Module, host: "DeltaSite", placed: "Placed",
               length: int) -> Callable[[], None]:
    """Number ``model``'s real tokens after ``placed``'s prefix of ``length`` at attention ``module`` while it runs.

    Returns:
        A function that undoes this binding (removing the pre-hook with the last shifted prefix); a no-op function
        where the model takes no shift (see :func:`body`).
    """
    inner = body(model)
    if inner is None:
        return lambda: None
    bound = _BOUND.get(inner)
    if bound is None:
        bound = _BOUND[inner] = _Shift(inner)
    entry = (id(module), host, placed, length)
    bound.entries.append(entry)

    def release() -> None:
        if entry not in bound.entries:
            return
        bound.entries.remove(entry)
        if not bound.entries:
            bound.handle.remove()
            _BOUND.pop(inner, None)

    return release


__all__ = ["bind_shift", "body"]
