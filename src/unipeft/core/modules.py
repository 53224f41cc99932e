"""Small helpers on modules: feature dimensions, a weight seen as (out, in), replacing a submodule."""

from __future__ import annotations

import torch
from torch import nn

from unipeft.core.quant import quant_scheme


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2), a linear layer whose weight is stored as (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def module_dims(module: nn.Module) -> tuple[int | None, int]:
    """(input features, output features) of a linear-like, embedding or norm module.

    Raises:
        TypeError: for a module kind with no known feature dimensions.
    """
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    if isinstance(module, nn.Embedding):
        return None, module.embedding_dim
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:  # LayerNorm, RMSNorm and friends
        return weight.shape[0], weight.shape[0]
    raise TypeError(f"cannot tell the feature dimensions of {type(module).__name__}; "
                    "supported: Linear, Conv1D, Embedding, and norms with a 1-D weight")


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The module's weight as an (out, in) view (transposed view for Conv1D); writes go to the module.

    Raises:
        TypeError: for a quantized weight, which has no float view (see :mod:`unipeft.core.quant`).
    """
    scheme = quant_scheme(module)
    if scheme is not None:
        raise TypeError(f"{type(module).__name__} holds a quantized weight ({scheme.name}) with no float view to "
                        "write into; dequantize it (unipeft.core.quant)")
    if is_conv1d(module):
        return module.weight.data.T
    if isinstance(module, nn.Embedding):
        return module.weight.data.T  # (dim, vocab): output features first
    return module.weight.data


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
