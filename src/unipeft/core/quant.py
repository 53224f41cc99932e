"""Quantized base modules (QLoRA, Dettmers et al. 2023, arXiv 2305.14314): reading, rewriting and merging into them.

A quantized linear layer stores W as codes Q(W) plus scales; its forward computes ``x Deq(Q(W))ᵀ``. Deltas placed on
it run unchanged (they read x and add to the layer's output), so attaching LoRA to a 4-bit or 8-bit base is QLoRA.
Merging cannot add ΔW to the codes; it goes through the float weight instead:

    W_merged = Q( Deq(Q(W₀)) + Σ_a s_a ΔW_a )        over the adapters a merged at the site

and is therefore inexact: the merged layer differs from the unmerged one by the rounding of Q (see
docs/integration.md for measured errors). The site keeps the original codes Q(W₀) (and bias) while anything is merged
and always recomputes the merged weight from them, so merging several adapters does not accumulate rounding, and
unmerging the last one restores Q(W₀) bit for bit.

Supported schemes are small :class:`QuantScheme` objects keyed by the weight's class name, so no quantization library
is imported unless a model uses it: bitsandbytes ``Linear4bit`` (``Params4bit``: NF4/FP4) and ``Linear8bitLt``
(``Int8Params``: LLM.int8() row-wise absmax).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from unipeft.core.site import DeltaSite


class QuantScheme(Protocol):
    """How to read and write one kind of quantized weight."""

    name: str

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        """The module's weight in float32, shape (out, in)."""

    def quantize_(self, module: nn.Module, weight: torch.Tensor) -> None:
        """Quantize the float (out, in) ``weight`` and make it the module's weight."""

    def snapshot(self, module: nn.Module) -> object:
        """Whatever :meth:`restore` needs to put the module's current quantized weight back bit for bit."""

    def restore(self, module: nn.Module, snapshot: object) -> None:
        """Put back the weight saved by :meth:`snapshot`."""


class _Bnb4bit:
    """bitsandbytes ``Linear4bit``: blockwise NF4/FP4 codes packed two per byte, with a per-block absmax."""

    name = "bitsandbytes-4bit"

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        import bitsandbytes as bnb

        weight = module.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            # repacked in place by an inference forward on a CPU with AVX512-BF16; undone as bnb's state_dict does
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
            module.quant_state = weight.quant_state
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()

    def quantize_(self, module: nn.Module, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb

        old = module.weight
        new = bnb.nn.Params4bit(weight.to("cpu", old.quant_state.dtype), requires_grad=False,
                                blocksize=old.blocksize, compress_statistics=old.compress_statistics,
                                quant_type=old.quant_type, quant_storage=old.quant_storage, module=module)
        module.weight = new.to(old.device)  # .to() quantizes

    def snapshot(self, module: nn.Module) -> object:
        self.dequantize(module)  # undoes a CPU repacking, so the snapshot is the plain layout
        return module.weight

    def restore(self, module: nn.Module, snapshot: object) -> None:
        module.weight = snapshot
        module.quant_state = snapshot.quant_state


class _Bnb8bit:
    """bitsandbytes ``Linear8bitLt`` (LLM.int8()): int8 codes with one absmax scale per output row (SCB)."""

    name = "bitsandbytes-8bit"

    @staticmethod
    def _scales(module: nn.Module) -> torch.Tensor:
        scales = module.weight.SCB if module.weight.SCB is not None else module.state.SCB  # moved by a forward
        if scales is None:
            raise RuntimeError(f"{type(module).__name__} has no quantization scales (SCB); is its weight quantized?")
        return scales

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        import bitsandbytes as bnb

        weight = module.weight
        return bnb.functional.int8_vectorwise_dequant(weight.data, self._scales(module).to(weight.device)).float()

    def quantize_(self, module: nn.Module, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb

        old = module.weight
        new = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, has_fp16_weights=old.has_fp16_weights)
        module.weight = new.to(old.device)  # .to() quantizes
        module.state.reset_grads()  # the next forward takes the new codes and scales from the weight

    def snapshot(self, module: nn.Module) -> object:
        return module.weight, self._scales(module)

    def restore(self, module: nn.Module, snapshot: object) -> None:
        weight, scales = snapshot
        weight.CB, weight.SCB = weight.data, scales
        module.weight = weight
        module.state.reset_grads()


#: Quantized weight classes (by name, so nothing is imported to recognise them) → their scheme.
SCHEMES: dict[str, QuantScheme] = {"Params4bit": _Bnb4bit(), "Int8Params": _Bnb8bit()}
SCHEMES_BY_NAME: dict[str, QuantScheme] = {s.name: s for s in SCHEMES.values()}


def quant_scheme(module: nn.Module) -> QuantScheme | None:
    """The scheme of ``module``'s quantized weight, or None for a float (or no) weight."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.is_floating_point():
        return None  # a bitsandbytes layer not quantized yet (or with has_fp16_weights) holds a float weight
    return SCHEMES.get(type(weight).__name__)


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` holds a quantized weight unipeft can dequantize."""
    return quant_scheme(module) is not None


def weight_shape(module: nn.Module) -> tuple[int, ...]:
    """The shape of the module's weight as the model sees it: (out, in) for a quantized linear layer (whose stored
    tensor is packed), else the weight's own shape; () without a weight."""
    if is_quantized(module):
        return (module.out_features, module.in_features)
    weight = getattr(module, "weight", None)
    return tuple(weight.shape) if isinstance(weight, torch.Tensor) else ()


@dataclass
class QuantizedOriginal:
    """A quantized base's own weight (as its scheme's snapshot) and bias, kept while adapters are merged into it."""

    scheme: str
    weight: object
    bias: torch.Tensor | None


def refold_quantized(site: DeltaSite, merged: list[str]) -> None:
    """Make ``site.base``'s weight Q(Deq(Q(W₀)) + Σ ΔW) over the adapters ``merged`` (see the module docstring), or
    restore Q(W₀) and the bias exactly when the list is empty. The caller records ``merged`` in ``site.merged``.

    Raises:
        NotImplementedError: if a merged delta replaces the module (a module copy cannot fold into quantized codes).
    """
    base = site.base
    bias = base.bias if isinstance(getattr(base, "bias", None), torch.Tensor) else None
    placed = [p for adapter in merged for p in site.adapters[adapter]]
    if any(p.insertion == "replace" for p in placed):
        raise NotImplementedError(f"a module copy cannot be merged into a quantized {type(base).__name__}; "
                                  "keep it unmerged")
    if site.quant_original is None:
        if not placed:
            return
        scheme = quant_scheme(base)
        site.quant_original = QuantizedOriginal(scheme=scheme.name, weight=scheme.snapshot(base),
                                                bias=None if bias is None else bias.detach().clone())
    original = site.quant_original
    scheme = SCHEMES_BY_NAME[original.scheme]
    scheme.restore(base, original.weight)
    if bias is not None and original.bias is not None:
        with torch.no_grad():
            bias.copy_(original.bias)
    if not placed:
        site.quant_original = None
        return
    weight = scheme.dequantize(base)  # (out, in) float32
    folded_bias = None if bias is None else bias.detach().float().clone()
    for p in placed:
        p.fold_(weight, folded_bias, +1)
    scheme.quantize_(base, weight)
    if bias is not None:
        with torch.no_grad():
            bias.copy_(folded_bias.to(bias.dtype))


__all__ = [
    "SCHEMES",
    "QuantScheme",
    "QuantizedOriginal",
    "is_quantized",
    "quant_scheme",
    "refold_quantized",
    "weight_shape",
]
