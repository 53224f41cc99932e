"""The public handle: :class:`Peft` is the core lifecycle (:class:`unipeft.core.adapted.Handle`) plus one-line calls
into the layers above it — saving and loading (:mod:`unipeft.persist`, :mod:`unipeft.interop`), checked merging and
combination (:mod:`unipeft.ops`), mixed batches (:mod:`unipeft.mixed`) and inspection (:mod:`unipeft.inspection`) —
and :func:`attach`, the two lines that adapt a model::

    peft = unipeft.attach(model, "lora", r=16)
    print(peft.summary())
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unipeft.core.adapted import Handle, use_handle_type
from unipeft.core.recipe import Recipe
from unipeft.core.transaction import adding
from unipeft.inspection.manage import AdapterInfo, list_adapters, swap_adapter
from unipeft.inspection.summary import ParamSummary, summarize
from unipeft.interop.pretrained import save_pretrained
from unipeft.mixed import MixedBatch
from unipeft.ops.combine import combine
from unipeft.ops.safe_merge import DEFAULT_TOLERANCE, checked_merge
from unipeft.persist.io import load_adapter, save_adapter


@use_handle_type
class Peft(Handle):
    """A model with unipeft adapters attached (see :class:`~unipeft.core.adapted.Handle` for the lifecycle:
    ``add``, ``set_active``, ``deactivate``, ``merge``, ``unmerge``, ``remove``, ``detach``, the state dicts and the
    training contract). Create it with :func:`attach`; the model is modified in place."""

    def merge(self, *names: str, check: bool = False, tolerance: float = DEFAULT_TOLERANCE,
              probe: Mapping[str, Any] | torch.Tensor | None = None) -> dict[str, float]:
        """Fold adapters (default: the active ones) into the base weights, for zero-overhead inference.

        Args:
            check: compare outputs before and after on probe inputs, and undo the merge if they differ by more
                than ``tolerance`` (see :mod:`unipeft.ops.safe_merge`).
            tolerance: the largest max-abs output difference a checked merge accepts.
            probe: an input of the whole model (dict of keyword arguments, or a tensor) to check too; implies check.

        Returns:
            With a check: the max abs output difference per probed site (and ``"model"``); else an empty dict.

        Raises:
            NotImplementedError: if a delta of the adapter is not linear in the weight (nothing is changed then).
            unipeft.ops.safe_merge.MergeCheckError: (a ValueError) if a checked merge fails (it is undone).
        """
        names = names or tuple(self.active)
        if check or probe is not None:
            self.check_mergeable(*names)
            return checked_merge(self, list(names), tolerance=tolerance, probe=probe)
        super().merge(*names)
        return {}

    def summary(self) -> ParamSummary:
        """Parameter counts: total, trainable, % and the split per position, form and adapter."""
        return summarize(self)

    def save(self, path: str, name: str | None = None) -> Path:
        """Save adapter ``name`` (default: the active one) to folder ``path`` (see :func:`unipeft.save_adapter`)."""
        return save_adapter(self, path, name)

    def save_pretrained(self, directory: str, adapters: Sequence[str] | None = None, *,
                        format: str = "unipeft") -> Path:
        """Save adapters (default: the active ones) transformers-style, in unipeft's or HF peft's (``format="hf"``)
        format; load them with :func:`unipeft.from_pretrained` (see :mod:`unipeft.interop.pretrained`)."""
        return save_pretrained(self, directory, adapters, format=format)

    def load(self, path: str, name: str | None = None, *, activate: bool = False) -> "Peft":
        """Load a saved adapter onto this model as adapter ``name`` (default: its saved name), next to the others;
        inactive unless ``activate`` (then it joins the active ones). See :func:`unipeft.load_adapter`."""
        return load_adapter(self.model, path, name, activate=activate)

    def swap(self, name: str, path: str) -> None:
        """Hot-swap: replace adapter ``name``'s weights in place from a saved adapter with the same deltas
        (see :func:`unipeft.inspection.manage.swap_adapter`)."""
        swap_adapter(self, name, path)

    def adapters(self) -> list[AdapterInfo]:
        """Name, method, parameter counts, active and merged state of every adapter (see :class:`AdapterInfo`)."""
        return list_adapters(self)

    def combine(self, adapters: list[str], weights: list[float] | None = None, *, method: str = "cat",
                new_name: str = "combined", **options: Any) -> "Peft":
        """Add ``new_name``, a LoRA combining ``adapters`` (cat, linear, svd, ties, dare_*, magnitude_prune, ...;
        see :func:`unipeft.ops.combine.combine` for the methods and ``options``)."""
        combine(self, adapters, weights, method=method, new_name=new_name, **options)
        return self

    def mixed_batch(self, adapter_names: Sequence[str | None], *, train: bool = False) -> MixedBatch:
        """A context in which row b of every batch runs with adapter ``adapter_names[b]`` (None: the base model), in
        one forward pass, for inference and ``generate`` (see :mod:`unipeft.mixed`)::

            with peft.mixed_batch(["a", None, "b"]):
                logits = model(**batch).logits

        With ``train=True`` (the model in training mode, one context per forward) the rows train their own
        adapters: the backward gives each adapter the gradient of its own rows' loss.

        Raises:
            ValueError: for an unknown name, a merged adapter or a delta that cannot run per row (see
                :class:`~unipeft.mixed.MixedBatch`).
        """
        return MixedBatch(self, adapter_names, train=train)


def attach(model: nn.Module, recipe: Recipe | str = "lora", name: str = "default", **options: Any) -> Peft:
    """Attach a recipe to ``model`` in place, freeze the base, and make it the active adapter.

    Two lines to adapt a model::

        peft = unipeft.attach(model, "lora", r=16)
        peft.summary()

    Args:
        model: any ``nn.Module`` (transformers models get canonical positions; others use module patterns).
        recipe: a Recipe, a built-in recipe name (see ``unipeft methods``) or a YAML/JSON file.
        name: the adapter's name.
        **options: hyperparameter overrides for the recipe's deltas.

    Returns:
        The model's :class:`Peft` handle (created on the first call).

    Raises:
        ValueError: as :meth:`Handle.add`; the model is then left as it was.
    """
    with adding(model) as tx:
        tx.handle.add(recipe, name, **options)
    tx.handle.set_active(name)
    return tx.handle  # type: ignore[return-value]


__all__ = ["Peft", "attach"]
