"""A fully trainable copy of a module (HF peft's ``modules_to_save``), e.g. a new classification head.

    h = f'(x),    f' initialised as a copy of f

The base module stays untouched, so detaching restores it; merging swaps the trained weights into the base.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from unipeft.core.delta import Form, FormConfig, SiteShape, register_form


@register_form("copy")
@dataclass(frozen=True, kw_only=True)
class CopyConfig(FormConfig):
    """A trainable copy of the module at the site (no hyperparameters)."""

    insertions = ("replace",)

    def build(self, shape: SiteShape) -> "ModuleCopy":
        return ModuleCopy(shape.base)


class ModuleCopy(Form):
    """Runs a trainable deep copy of the base module instead of the base module."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(base)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.module(x, *args, **kwargs)

    def swap_(self, base: nn.Module) -> None:
        """Exchange the copy's and the base's tensors (merge and unmerge are both this swap)."""
        with torch.no_grad():
            for (_, mine), (_, theirs) in zip(self.module.state_dict().items(), base.state_dict().items()):
                tmp = mine.clone()
                mine.copy_(theirs)
                theirs.copy_(tmp)
