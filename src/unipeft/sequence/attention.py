"""Prefix keys and values inside attention, through transformers' attention interface.

Every attention module of the five families (BERT, GPT-2, LLaMA, T5, BART; transformers 5) computes its queries,
keys and values, updates its KV cache, and then calls ``ALL_ATTENTION_FUNCTIONS.get_interface(
config._attn_implementation, eager_attention_forward)(module, query, key, value, mask, **kwargs)``. Binding a prefix
switches the attention module's config to an implementation registered here, ``unipeft_prefix_sdpa`` (or
``unipeft_prefix_eager``), which for a module with running prefixes computes

    key'   = [P_k ; key]                    (B, H_kv, l + S, d_head)
    value' = [P_v ; value]
    mask'  = [attend-all (l columns) ; mask]  (causal masks left implicit by sdpa are made explicit first)
    position_bias' = [0 (l columns) ; position_bias]   (T5: prefix positions carry no relative bias)

and then calls the original implementation (sdpa, or the model's own ``eager_attention_forward``). Modules without a
running prefix go straight to the original. The prefix never enters the KV cache, so generation with a cache sees the
same keys as generation without one; the real tokens' position ids are numbered after the prefix by
:mod:`unipeft.sequence.shift` (or left at 0..S-1 where the prefix asks so).

With a ``gated`` composition (UniPELT, Mao et al. 2022) both P_k and P_v are scaled by
g = mean_t σ(x_t W_g + b_g), x the attention module's input, as in Mao et al.'s code.
"""

from __future__ import annotations

import sys
import weakref
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from unipeft.core.compose import Gated
from unipeft.core.modules import module_dims
from unipeft.core.site import base_named_modules

if TYPE_CHECKING:
    from unipeft.core.positions import Site
    from unipeft.core.site import DeltaSite, Placed

#: Attention implementations a prefix can wrap (flash and flex attention take no additive key columns this way).
SUPPORTED = ("sdpa", "eager")
PREFIX_POSITIONS = ("attn", "xattn")
_NAME = "unipeft_prefix_{}"


def _implementation_name(config: Any) -> str | None:
    return getattr(config, "_attn_implementation", None)


def attention_module(model: nn.Module, site: "Site") -> nn.Module:
    """The attention module of an ``attn``/``xattn`` site (the entry of its sub-layer).

    Raises:
        ValueError: if ``site`` is not an attention sub-layer.
    """
    if site.position not in PREFIX_POSITIONS or site.entry is None:
        raise ValueError(f"a prefix goes at an attention sub-layer ({', '.join(PREFIX_POSITIONS)}), "
                         f"not at {site.position!r} ({site.module})")
    return dict(base_named_modules(model))[site.entry]


def attention_dims(model: nn.Module, site: "Site") -> tuple[int, int]:
    """(model width, key width) at an ``attn``/``xattn`` site: a prefix has l rows of the key width per block
    (num_key_value_heads · head_dim, narrower than the model with grouped-query attention).

    Raises:
        ValueError: for a site that is not an attention sub-layer, or an attention implementation a prefix cannot wrap.
    """
    from unipeft.core.positions import resolve_positions

    module = attention_module(model, site)
    implementation = _implementation_name(getattr(module, "config", None))
    ours = isinstance(implementation, str) and implementation.startswith(_NAME.format(""))
    if not hasattr(module, "config") or (implementation not in (None, *SUPPORTED) and not ours):
        raise ValueError(f"a prefix runs through transformers' attention interface with "
                         f"{' or '.join(SUPPORTED)}; {type(module).__name__} at {site.entry} uses "
                         f"{implementation!r} (load the model with attn_implementation='sdpa')")
    keys = resolve_positions(model, [f"{site.position}.k"], layers=[site.layer], stacks=[site.stack])
    if len(keys) != 1:
        raise ValueError(f"cannot find the key projection of the attention at {site.entry}")
    key, modules = keys[0], dict(base_named_modules(model))
    width = key.out_slice[1] - key.out_slice[0] if key.out_slice else module_dims(modules[key.module])[1]
    return module_dims(modules[site.module])[1], width


class _Prefixes:
    """The prefixes bound to one attention module: (host site, placed form) pairs, and the gates' input."""

    def __init__(self, module: nn.Module) -> None:
        self.module = weakref.ref(module)
        self.entries: list[tuple["DeltaSite", "Placed"]] = []
        self.hidden: torch.Tensor | None = None
        self._gate_hook: RemovableHandle | None = None

    def running(self) -> list["Placed"]:
        """The placed prefixes of active adapters, in adapter order."""
        return [placed for host, placed in self.entries if placed in host.sequence]

    def refresh_gate_hook(self) -> None:
        """Capture the module's input only while a gated prefix is bound."""
        gated = any(isinstance(p.compose, Gated) for _, p in self.entries)
        if gated and self._gate_hook is None:
            self._gate_hook = self.module().register_forward_pre_hook(self._capture, with_kwargs=True)
        elif not gated and self._gate_hook is not None:
            self._gate_hook.remove()
            self._gate_hook = None
            self.hidden = None

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.hidden = args[0] if args else kwargs["hidden_states"]


_BOUND: "weakref.WeakKeyDictionary[nn.Module, _Prefixes]" = weakref.WeakKeyDictionary()
_SWITCHED: dict[int, list[Any]] = {}  # id(config) -> [config, original implementation, number of bound modules]


def bind_prefix(model: nn.Module, site: "Site", host: "DeltaSite", placed: "Placed") -> Callable[[], None]:
    """Route the attention module at ``site`` through the prefix implementation and register ``placed`` there.

    Returns:
        A function that undoes this binding (restoring the original attention implementation with the last prefix).
    """
    module = attention_module(model, site)
    _register()
    bound = _BOUND.get(module)
    if bound is None:
        bound = _BOUND[module] = _Prefixes(module)
        _switch(module.config)
    bound.entries.append((host, placed))
    bound.refresh_gate_hook()

    def release() -> None:
        if (host, placed) not in bound.entries:
            return
        bound.entries.remove((host, placed))
        bound.refresh_gate_hook()
        if not bound.entries:
            _BOUND.pop(module, None)
            _restore(module.config)

    return release


def _switch(config: Any) -> None:
    entry = _SWITCHED.get(id(config))
    if entry is None:
        original = _implementation_name(config)
        config._attn_implementation = _NAME.format(original or "eager")
        entry = _SWITCHED[id(config)] = [config, original, 0]
    entry[2] += 1


def _restore(config: Any) -> None:
    entry = _SWITCHED[id(config)]
    entry[2] -= 1
    if entry[2] == 0:
        config._attn_implementation = entry[1]
        del _SWITCHED[id(config)]


_REGISTERED: list[str] = []


def _register() -> None:
    """Register the prefix implementations (and their mask functions) with transformers, once."""
    if _REGISTERED:
        return
    for base in SUPPORTED:
        name = _NAME.format(base)
        AttentionInterface.register(name, _make_attention(base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
        _REGISTERED.append(name)


def _original(module: nn.Module, base: str) -> Callable[..., Any]:
    if base == "sdpa":
        return ALL_ATTENTION_FUNCTIONS["sdpa"]
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return eager if eager is not None else ALL_ATTENTION_FUNCTIONS["sdpa"]


def _make_attention(base: str) -> Callable[..., Any]:
    def prefix_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, **kwargs: Any) -> Any:
        """Attention with the module's running prefixes prepended to its keys and values."""
        bound = _BOUND.get(module)
        running = bound.running() if bound is not None else []
        if running:
            key, value, attention_mask = _extend(module, bound, running, query, key, value, attention_mask, kwargs,
                                                 causal_skip=base == "sdpa")
        return _original(module, base)(module, query, key, value, attention_mask, **kwargs)

    prefix_attention.__name__ = _NAME.format(base)
    return prefix_attention


def _extend(module: nn.Module, bound: _Prefixes, running: list["Placed"], query: torch.Tensor, key: torch.Tensor,
            value: torch.Tensor, mask: torch.Tensor | None, kwargs: dict[str, Any], *,
            causal_skip: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    batch, heads, q_len = query.shape[0], key.shape[1], query.shape[2]
    hidden, bound.hidden = bound.hidden, None
    keys, values = [], []
    for placed in running:
        p_k, p_v = placed.form()  # (l, d_kv) each
        length = p_k.shape[0]
        p_k = p_k.to(key.dtype).view(length, heads, -1).transpose(0, 1).expand(batch, -1, -1, -1)  # (B, H, l, d)
        p_v = p_v.to(value.dtype).view(length, heads, -1).transpose(0, 1).expand(batch, -1, -1, -1)
        if isinstance(placed.compose, Gated):
            gate = torch.sigmoid(placed.compose.gate(hidden)).mean(dim=1).view(batch, 1, 1, 1)  # (B, 1, 1, 1)
            p_k, p_v = p_k * gate.to(key.dtype), p_v * gate.to(value.dtype)
        keys.append(p_k)
        values.append(p_v)
    extra = sum(k.shape[2] for k in keys)
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    if mask is None and causal_skip and is_causal and q_len > 1:
        # sdpa left the causal mask implicit (then keys beyond the queries are empty static-cache slots, as in
        # transformers' sdpa_attention_forward); with prefix columns in front it must be explicit
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        if kwargs.get("position_bias") is not None:
            kwargs["position_bias"] = kwargs["position_bias"][..., :q_len]
        mask = torch.ones(q_len, q_len, dtype=torch.bool, device=query.device).tril().view(1, 1, q_len, q_len)
    if mask is not None:
        attend = torch.ones if mask.dtype == torch.bool else torch.zeros
        mask = torch.cat([attend(*mask.shape[:-1], extra, dtype=mask.dtype, device=mask.device), mask], dim=-1)
    bias = kwargs.get("position_bias")
    if bias is not None:
        kwargs["position_bias"] = torch.cat([bias.new_zeros(*bias.shape[:-1], extra), bias], dim=-1)
    return torch.cat([*keys, key], dim=2), torch.cat([*values, value], dim=2), mask


__all__ = ["attention_dims", "attention_module", "bind_prefix", "SUPPORTED", "PREFIX_POSITIONS"]
