"""All or nothing: the one rollback mechanism for operations that add adapters.

Attaching, loading a saved adapter (one or a folder of several), reading an HF peft adapter and combining adapters
each add adapters and then do work that can fail (a missing tensor, a shape that does not match). Inside
``with adding(model) as tx:`` they take the model's handle from ``tx.handle`` (created on first use); if the block
raises, every adapter added in it is removed, the active adapters are restored, and a handle that the block created is
detached, so the model is exactly as it was::

    with adding(model) as tx:
        tx.handle.add(recipe, name)
        copy_weights(tx.handle, name)      # raises → the adapter is gone, the model as before
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from unipeft.core.adapted import Handle, find_handle, new_handle


class Adding:
    """The state of one :func:`adding` block: the model, whether it had a handle, what was there before."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._existing = find_handle(model)
        self._handle: Handle | None = self._existing
        self._before = list(self._existing.recipes) if self._existing is not None else []
        self._active = list(self._existing.active) if self._existing is not None else []

    @property
    def handle(self) -> Handle:
        """The model's handle (a new one on first use if the model had none)."""
        if self._handle is None:
            self._handle = new_handle(self.model)
        return self._handle

    def rollback(self) -> None:
        """Remove what the block added; detach a handle it created (also one created by a nested block)."""
        peft = find_handle(self.model)
        if peft is None:
            return
        if self._existing is None:
            peft.detach()
            return
        for name in [n for n in peft.recipes if n not in self._before]:
            peft.remove(name)
        peft.set_active(*[n for n in self._active if n in peft.recipes])


@contextmanager
def adding(model: nn.Module) -> Iterator[Adding]:
    """A block whose added adapters are all kept, or — if it raises — none (see the module docstring)."""
    tx = Adding(model)
    try:
        yield tx
    except BaseException:
        tx.rollback()
        raise


__all__ = ["adding", "Adding"]
