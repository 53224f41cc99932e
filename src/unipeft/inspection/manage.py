"""Working with many adapters on one base model: list them, and hot-swap an adapter's weights from a saved folder.

Adding (:meth:`Peft.add`, :meth:`Peft.load`), activating several at once (:meth:`Peft.set_active`: the deltas of
stacked adapters are summed, h = W x + Σ_a Δ_a(x)), merging and deleting (:meth:`Peft.remove`) live on
:class:`unipeft.Peft`; this module holds the two operations that read across adapters or files.

Hot-swapping copies saved tensors into the *existing* parameters of an adapter with the same recipe: no module is
re-created or re-wrapped, so optimisers, ``torch.compile`` graphs and references to the parameters stay valid.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from unipeft.core.adapted import Handle

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class AdapterInfo:
    """One adapter of a :class:`Peft` handle, as listed by :func:`list_adapters`.

    Attributes:
        name: the adapter's name.
        method: its recipe's name (``lora``, ``ia3``, a combined adapter's ``combined-cat``, ...).
        forms: the delta forms it places, in recipe order.
        sites: how many deltas it places.
        parameters: its delta parameters (each shared tensor once): what trains when it is active, and what it saves.
        trainable: those of them that require grad now (0 while inactive).
        active: whether it runs in ``forward``.
        merged: whether it is folded into the base weights.
    """

    name: str
    method: str
    forms: tuple[str, ...]
    sites: int
    parameters: int
    trainable: int
    active: bool
    merged: bool

    def __str__(self) -> str:
        flags = ", ".join(f for f, on in (("active", self.active), ("merged", self.merged)) if on) or "inactive"
        return (f"{self.name}: {self.method} ({'+'.join(self.forms)}) at {self.sites} sites, "
                f"{self.parameters:,} parameters ({self.trainable:,} trainable), {flags}")


def list_adapters(peft: Handle) -> list[AdapterInfo]:
    """Every adapter of ``peft``, in the order they were added."""
    merged = set(peft.merged)
    out = []
    for name, recipe in peft.recipes.items():
        params = {id(p): p for _, placed in peft.delta_modules(name) for p in placed.parameters()}
        out.append(AdapterInfo(
            name=name, method=recipe.name, forms=tuple(dict.fromkeys(d.form.type for d in recipe.deltas)),
            sites=len(peft.records[name]), parameters=sum(p.numel() for p in params.values()),
            trainable=sum(p.numel() for p in params.values() if p.requires_grad),
            active=name in peft.active, merged=name in merged))
    return out


def swap_adapter(peft: Handle, name: str, path: str | os.PathLike) -> None:
    """Replace the weights of adapter ``name`` in place with those saved in folder ``path``.

    The saved adapter must have the same deltas (forms, hyperparameters, positions) on the same sites, so that its
    tensors have the same keys and shapes. A merged adapter is unmerged, updated and merged again; whether it is
    active, and which of its parameters require grad, are kept. Nothing changes if a check fails.

    Raises:
        FileNotFoundError: for a missing folder or file.
        ValueError: for an unknown adapter, another base model, a corrupted file, or a saved adapter whose deltas,
            sites or tensors differ (the message names the first difference).
    """
    from unipeft.persist.io import check_sites, check_state, read_adapter
    from unipeft.core.recipe import Recipe

    if name not in peft.recipes:
        raise ValueError(f"unknown adapter '{name}'; existing adapters: {', '.join(peft.recipes) or '(none)'}")
    config, state = read_adapter(path, peft.model)
    saved, current = Recipe.from_dict(config["recipe"]), peft.recipes[name]
    if saved.train_base or current.train_base:
        raise ValueError("hot-swapping an adapter that trains the base (full fine-tuning) is not supported; "
                         "load it as a new model instead")
    if saved.deltas != current.deltas:
        diff = next(((i, a, b) for i, (a, b) in enumerate(zip(saved.deltas, current.deltas)) if a != b), None)
        detail = (f"delta {diff[0]}: saved {diff[1].to_dict()} vs current {diff[2].to_dict()}" if diff else
                  f"saved {len(saved.deltas)} deltas vs current {len(current.deltas)}")
        raise ValueError(f"cannot hot-swap adapter '{name}' from {path}: the deltas differ ({detail}); "
                         "load it under a new name with Handle.load instead")
    check_sites(peft, name, config["sites"])
    own = peft.adapter_state_dict(name)
    check_state(own, state, path)
    merged = name in peft.merged
    if merged:
        peft.unmerge(name)
    with torch.no_grad():
        for key, tensor in own.items():
            tensor.copy_(state[key])
    if merged:
        peft.merge(name)
    log.info("hot-swapped the weights of adapter '%s' from %s", name, path)
