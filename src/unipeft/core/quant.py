"""Quantized base modules (QLoRA, Dettmers et al. 2023, arXiv 2305.14314): reading, rewriting and merging into them.

A quantized linear layer stores W as codes Q(W) plus scales; its forward computes ``x Deq(Q(W))ᵀ``. Deltas placed on
it run unchanged (they read x and add to the layer's output), so attaching LoRA to a 4-bit or 8-bit base is QLoRA.
Merging cannot add ΔW to the codes; it goes through the float weight instead:

    W_merged = Q( Deq(Q(W₀)) + Σ_a s_a ΔW_a )        over the adapters a merged at the site

and is therefore inexact: the merged layer differs from the unmerged one by the rounding of Q (see
docs/integration.md for measured errors). The site keeps the original codes Q(W₀) (and bias) while anything is merged
and always recomputes the merged weight from them, so merging several adapters does not accumulate rounding, and
unmerging the last one restores Q(W₀) bit for bit.

**Gradients through a 4-bit base on every CPU.** bitsandbytes (0.50) repacks a ``Linear4bit`` weight in place for an
AVX512-BF16 inference kernel (``gemv_4bit``) the first time the layer runs in eval mode on an input that needs no
gradient, and keeps using that kernel afterwards, in training too. That kernel has no autograd formula, so after one
evaluation no gradient crosses the layer and QLoRA trains nothing; the repacking also rounds the block scales to
bfloat16, so outputs move. :func:`hold_autograd_kernels` (called when a model gets its handle) undoes any repacking and
turns it off on every 4-bit layer of the model, so every forward takes bitsandbytes' dequantize-and-matmul path, which
has a backward on every device; :func:`release_autograd_kernels` (at detach) gives the layers their own setting back.

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

    def dequantize_snapshot(self, snapshot: object) -> torch.Tensor:
        """The weight saved by :meth:`snapshot` in float32, shape (out, in)."""

    def snapshot(self, module: nn.Module) -> object:
        """Whatever :meth:`restore` needs to put the module's current quantized weight back bit for bit."""

    def restore(self, module: nn.Module, snapshot: object) -> None:
        """Put back the weight saved by :meth:`snapshot`."""


class _Bnb4bit:
    """bitsandbytes ``Linear4bit``: blockwise NF4/FP4 codes packed two per byte, with a per-block absmax."""

    name = "bitsandbytes-4bit"

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        import bitsandbytes as bnb

        _unpack_cpu_layout(module)  # a layer outside a handle may have been repacked by an inference forward
        return self.dequantize_snapshot(module.weight)

    def dequantize_snapshot(self, snapshot: object) -> torch.Tensor:
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(snapshot.data, snapshot.quant_state).float()

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
        return self.dequantize_snapshot(self.snapshot(module))

    def dequantize_snapshot(self, snapshot: object) -> torch.Tensor:
        import bitsandbytes as bnb

        weight, scales = snapshot
        return bnb.functional.int8_vectorwise_dequant(weight.data, scales.to(weight.device)).float()

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
_BNB4 = _Bnb4bit()
SCHEMES: dict[str, QuantScheme] = {"Params4bit": _BNB4, "Int8Params": _Bnb8bit()}
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


#: The bitsandbytes ``Linear4bit`` attribute that allows its CPU inference repacking (see the module docstring).
_CPU_REPACK_FLAG = "support_avx512bf16_for_cpu"


def _unpack_cpu_layout(module: nn.Module) -> None:
    """Undo bitsandbytes' AVX512-BF16 repacking of a ``Linear4bit`` weight, as its own ``state_dict`` does."""
    weight = module.weight
    if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
        module.quant_state = weight.quant_state


def hold_autograd_kernels(model: nn.Module) -> dict[nn.Module, bool]:
    """Keep every 4-bit layer of ``model`` on a kernel with a backward: undo bitsandbytes' CPU inference repacking
    where it happened and turn it off (see the module docstring).

    A layer repacked before this call had its block scales rounded to bfloat16 by bitsandbytes; they stay so (the
    repacking cannot be undone exactly), and the layer computes with them from here on.

    Returns:
        Each changed layer → its own value of the flag, for :func:`release_autograd_kernels`.
    """
    held: dict[nn.Module, bool] = {}
    for module in model.modules():
        if _CPU_REPACK_FLAG in vars(module) and quant_scheme(module) is _BNB4:
            _unpack_cpu_layout(module)
            held[module] = bool(vars(module)[_CPU_REPACK_FLAG])
            setattr(module, _CPU_REPACK_FLAG, False)
    return held


def release_autograd_kernels(held: dict[nn.Module, bool]) -> None:
    """Give the layers changed by :func:`hold_autograd_kernels` their own repacking setting back."""
    for module, flag in held.items():
        setattr(module, _CPU_REPACK_FLAG, flag)


def _fold_into_float(base: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, placed: list) -> None:
    """Set a float ``base`` to ``weight`` + Σ ΔW (and ``bias`` + Σ Δb) over the ``placed`` deltas."""
    folded_bias = None if bias is None else bias.detach().float().clone()
    for p in placed:
        p.fold_(weight, folded_bias, +1)
    with torch.no_grad():
        base.weight.copy_(weight.to(base.weight.dtype))
        if folded_bias is not None and isinstance(getattr(base, "bias", None), torch.Tensor):
            base.bias.copy_(folded_bias.to(base.bias.dtype))


def refold_quantized(site: DeltaSite, merged: list[str]) -> None:
    """Make ``site.base``'s weight Q(Deq(Q(W₀)) + Σ ΔW) over the adapters ``merged`` (see the module docstring), or
    restore Q(W₀) and the bias exactly when the list is empty. The caller records ``merged`` in ``site.merged``.

    If the base was dequantized since the first merge (transformers' ``model.dequantize()`` swaps in a float layer
    holding the requantized merge), the float layer is set to Deq(Q(W₀)) + Σ ΔW instead: an exact merge, and an
    exact Deq(Q(W₀)) once nothing is merged.

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
    if not is_quantized(base):  # transformers' dequantize() put a float layer here: fold into it, from Deq(Q(W₀))
        _fold_into_float(base, scheme.dequantize_snapshot(original.weight), original.bias, placed)
        if not placed:
            site.quant_original = None
        return
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
    "hold_autograd_kernels",
    "release_autograd_kernels",
    "QuantScheme",
    "QuantizedOriginal",
    "is_quantized",
    "quant_scheme",
    "refold_quantized",
    "weight_shape",
]
