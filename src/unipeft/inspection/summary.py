"""Honest parameter counts: total, trainable, and the split per position and per delta form.

Counts follow HF peft's ``print_trainable_parameters``: ``total`` is every parameter of the adapted model (base plus
adapters, each shared tensor once); ``trainable`` those with ``requires_grad``; ``percent`` = 100·trainable/total.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from unipeft.core.adapted import Handle


@dataclass(frozen=True, kw_only=True)
class ParamSummary:
    """Parameter counts of an adapted model.

    Attributes:
        total: parameters of the whole adapted model.
        base: parameters of the base model alone.
        trainable: parameters that require grad.
        per_position: trainable delta parameters per canonical position (``attn.q``, ``ffn``, ...).
        per_form: trainable delta parameters per form (``lora``, ``bottleneck``, ...).
        per_adapter: delta parameters per adapter (trainable or not).
        training_only: trainable parameters of training-time reparameterisations (prefix tuning's MLP, Li & Liang
            2021), each shared tensor once. They are included in ``trainable`` but not in the ``per_*`` counts, which
            count what an adapter saves; a form lists them in its ``training_only_parameters()``.
    """

    total: int
    base: int
    trainable: int
    per_position: dict[str, int] = field(default_factory=dict)
    per_form: dict[str, int] = field(default_factory=dict)
    per_adapter: dict[str, int] = field(default_factory=dict)
    training_only: int = 0

    @property
    def percent(self) -> float:
        """100 · trainable / total."""
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        lines = [f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                 f"trainable%: {self.percent:.4f}  (base: {self.base:,})"]
        for title, table in (("per position", self.per_position), ("per form", self.per_form),
                             ("per adapter", self.per_adapter)):
            if table:
                lines.append(f"  {title}: " + ", ".join(f"{k}={v:,}" for k, v in table.items()))
        if self.training_only:
            lines.append(f"  training-only (reparameterisation, not saved): {self.training_only:,}")
        return "\n".join(lines)


def summarize(peft: Handle) -> ParamSummary:
    """Count the parameters of ``peft.model``."""
    unique = {id(p): p for p in peft.model.parameters()}
    total = sum(p.numel() for p in unique.values())
    base = sum(p.numel() for p in {id(p): p for p in peft.base_parameters()}.values())
    trainable = sum(p.numel() for p in unique.values() if p.requires_grad)
    per_position: Counter[str] = Counter()
    per_form: Counter[str] = Counter()
    per_adapter: Counter[str] = Counter()
    training_only: dict[int, object] = {}
    for name in peft.recipes:
        positions: dict[str, list[str]] = {}  # site module -> positions of its placements, in placement order
        for record in peft.records[name]:
            positions.setdefault(record.site.module, []).append(record.site.position)
        placed_at = {}
        for module, placed in peft.delta_modules(name):
            placed_at.setdefault(module, []).append(placed)
        seen: set[int] = set()  # tensors shared across sites (Compacter's rules) count once
        for module, placed, position in ((m, p, pos) for m in positions
                                         for p, pos in zip(placed_at[m], positions[m])):
            extra = {id(p): p for p in getattr(placed.form, "training_only_parameters", list)()}
            training_only.update(extra)
            own = [p for p in placed.parameters() if id(p) not in extra and id(p) not in seen]
            seen.update(id(p) for p in own)
            n_all = sum(p.numel() for p in own)
            n_train = sum(p.numel() for p in own if p.requires_grad)
            per_adapter[name] += n_all
            per_position[position] += n_train
            per_form[type(placed.form).__name__] += n_train
    return ParamSummary(total=total, base=base, trainable=trainable, per_position=dict(per_position),
                        per_form=dict(per_form), per_adapter=dict(per_adapter),
                        training_only=sum(p.numel() for p in training_only.values() if p.requires_grad))
