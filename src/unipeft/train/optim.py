"""The optimizer over the trainable tensors: AdamW, or bitsandbytes' 8-bit AdamW (Dettmers et al., ICLR 2022,
"8-bit Optimizers via Block-wise Quantization": the two moments stored as 8-bit blocks with a per-block scale, a
quarter of AdamW's optimizer memory) and its paged variant (QLoRA's paged optimizers: the state in CUDA unified memory,
paged to the CPU under memory pressure; CUDA only).

Weight decay is not applied to biases and norm weights (1-D tensors), as in HF's Trainer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch

Optimizer = Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)


def check_optimizer(name: str, device: torch.device | None = None) -> None:
    """Raise a ValueError naming the valid choices unless ``name`` is an optimizer that runs on ``device``."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    if device is not None and name.startswith("paged_") and device.type != "cuda":
        raise ValueError(f"optimizer {name!r} pages its state through CUDA unified memory and needs a CUDA device "
                         f"(this run is on {device.type}); on a CPU use adamw or adamw_8bit")


def make_optimizer(params: Sequence[torch.nn.Parameter], name: str, *, lr: float, weight_decay: float,
                   device: torch.device) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``params``, with two groups: decayed (2-D and up) and not decayed (1-D).

    Raises:
        ValueError: for an unknown optimizer or one the device cannot run.
    """
    check_optimizer(name, device)
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "paged_adamw": bnb.optim.PagedAdamW}[name]
    return cls(groups, lr=lr)


__all__ = ["OPTIMIZERS", "check_optimizer", "make_optimizer"]
