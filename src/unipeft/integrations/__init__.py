"""Integrations with other libraries' training machinery (transformers' ``Trainer``).

A unipeft-adapted model is still the same transformers model, so ``Trainer``, ``generate``, gradient checkpointing and
``torch.compile`` work on it directly (see docs/integration.md). What this package adds is for saving: a ``Trainer``
that checkpoints the adapters only, and resumes from them.
"""

from unipeft.integrations.trainer import AdapterTrainer

__all__ = ["AdapterTrainer"]
