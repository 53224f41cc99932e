"""Mixed batches: one forward pass in which each row of the batch uses its own adapter (or none), for inference.

    with peft.mixed_batch(["support", "legal", None, "support"]):
        logits = model(**batch).logits           # row 0 and 3 with adapter "support", row 2 with the base
        tokens = model.generate(**batch)         # the assignment holds for every decoding step

As Punica's BGMV (Chen et al. 2023, arXiv 2310.18547) and S-LoRA (Sheng et al. 2023, arXiv 2311.03285): the base
model runs once on the whole batch, and at each site the deltas of all the batch's adapters are stacked and gathered
per row, so the extra cost is one batched low-rank product per site whatever the number of adapters (for LoRA,
Δ_b = s_a B_a A_a x_b with a = a_b; see :mod:`unipeft.core.mixed.groups`). Row b's output equals the output of the
model run on that row alone with only a_b active (``peft.set_active(a_b)``, or ``peft.set_active()`` for None).

Supported: forms that implement :class:`~unipeft.core.mixed.factors.Batchable` (LoRA and its variants rsLoRA, PiSSA,
OLoRA, DoRA, VeRA, AdaLoRA; (IA)³; BitFit; SSF; bottleneck, parallel and scaled parallel adapters), composed with
``add`` or ``scaled``, and module copies (``replace``, e.g. classification heads; run once per adapter on its rows).
Refused with an error: sequence-level forms (prefix, prompt), gated compositions, other forms, merged adapters, a
model in training mode. The stacks are rebuilt every time a ``with`` block is entered, so they always hold the
adapters' current weights; they are copies, so no gradient reaches the adapters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from unipeft.core.compose import Add, Scaled
from unipeft.core.mixed.factors import MLP, Factors, LowRank, Scale
from unipeft.core.mixed.groups import build_group
from unipeft.core.mixed.plan import SitePlan, Step

if TYPE_CHECKING:
    from unipeft.core.adapted import Peft
    from unipeft.core.site import DeltaSite, Placed

#: Forms that run in mixed batches (their Form classes implement ``mixed_factors``), and module copies.
SUPPORTED_FORMS: tuple[str, ...] = ("lora", "dora", "vera", "adalora", "ia3", "bias", "ssf", "bottleneck", "copy")


class MixedBatch:
    """Context manager that runs the model of ``peft`` with one adapter per row (see the module docstring).

    Args:
        peft: the adapted model's handle.
        adapter_names: one entry per row of the batches run inside the block: an adapter name, or None for the
            base model.

    Raises:
        ValueError: for an empty list, an unknown name (the message lists the loaded adapters), a merged adapter, a
            model in training mode, or an adapter with a delta that cannot run in a mixed batch (the message names
            the form, where it is, and the supported forms). Inside the block, a batch whose size is not
            ``len(adapter_names)`` raises ValueError.
    """

    def __init__(self, peft: "Peft", adapter_names: Sequence[str | None]) -> None:
        names = list(adapter_names)
        if not names:
            raise ValueError("a mixed batch needs one adapter name (or None) per row; got an empty list")
        for n in names:
            if n is not None and n not in peft.recipes:
                raise ValueError(f"unknown adapter {n!r} in the mixed batch; loaded adapters: "
                                 f"{', '.join(peft.recipes) or '(none)'} (None runs the base model)")
        if peft.merged:
            raise ValueError(f"adapters {', '.join(peft.merged)} are merged into the base weights, so every row would "
                             "get them; unmerge them (peft.unmerge()) before running a mixed batch")
        self.peft = peft
        self.names = names
        self.adapters = [n for n in dict.fromkeys(names) if n is not None]
        problems = [p for a in self.adapters for p in _problems(peft, a)]
        if problems:
            raise ValueError(f"these deltas cannot run in a mixed batch: {'; '.join(problems[:5])}"
                             f"{' ...' if len(problems) > 5 else ''}. Supported forms: {', '.join(SUPPORTED_FORMS)} "
                             "(insertions parallel, sequential, multiplicative, multiplicative_input, replace; "
                             "compositions add, scaled)")
        self._plans: dict[str, SitePlan] = {}

    def __enter__(self) -> "MixedBatch":
        peft = self.peft
        if peft.model.training:
            raise ValueError("mixed batches are for inference (dropout is not applied per row); call model.eval()")
        if any(site.mixed is not None for site in peft._sites.values()):
            raise RuntimeError("a mixed batch is already running on this model; mixed batches do not nest")
        with torch.no_grad():
            self._plans = {module: self._plan(module, site) for module, site in peft._sites.items()
                           if any(a in site.adapters for a in self.adapters)}
        for site in peft._sites.values():  # nothing of the active adapters runs (prefixes, prompts included)
            site.set_active([])
        for module, plan in self._plans.items():
            peft._sites[module].mixed = plan
        return self

    def __exit__(self, *exc: object) -> None:
        for site in self.peft._sites.values():
            site.mixed = None
            site.set_active(self.peft.active)
        self._plans = {}

    def _rows_of(self, adapter: str) -> torch.Tensor:
        return torch.tensor([i for i, n in enumerate(self.names) if n == adapter], dtype=torch.long)

    def _plan(self, module: str, site: "DeltaSite") -> SitePlan:
        plan = SitePlan(site=site, name=module, rows=len(self.names))
        device = next((t.device for t in site.base.parameters()), torch.device("cpu"))
        stages: dict[tuple, list[tuple[str, "Placed", Factors]]] = {}
        replaced: set[str] = set()
        for adapter in (a for a in self.adapters if a in site.adapters):
            pre_index = post_index = 0
            for placed in site.adapters[adapter]:
                if placed.insertion == "replace":
                    plan.replace.append((placed.form, self._rows_of(adapter).to(device)))
                    replaced.add(adapter)
                    continue
                factors = placed.form.mixed_factors()  # type: ignore[union-attr]
                _check_factors(placed, factors, adapter, module)
                if placed.insertion == "multiplicative_input":
                    key: tuple = ("pre", pre_index)
                    pre_index += 1
                else:
                    key = ("post", post_index, type(factors), placed.insertion, placed.source, placed.out_slice,
                           _variant(factors))
                    post_index += 1
                stages.setdefault(key, []).append((adapter, placed, factors))
        plan.base_rows = any(n not in replaced for n in self.names)
        for key in sorted(stages, key=lambda k: (k[0], k[1])):  # dicts keep insertion order within a stage
            members = stages[key]
            slot_of = {adapter: slot for slot, (adapter, _, _) in enumerate(members, start=1)}
            slots = torch.tensor([slot_of.get(n, 0) for n in self.names], dtype=torch.long, device=device)
            factors = [f for _, _, f in members]
            scales = [_scale(p) for _, p, _ in members]
            group = build_group(factors, scales, slots)
            if key[0] == "pre":
                plan.pre.append(group)  # type: ignore[arg-type]
            else:
                first = members[0][1]
                plan.post.append(Step(group=group, insertion=first.insertion, source=first.source,  # type: ignore
                                      out_slice=first.out_slice))
        return plan


def _variant(factors: Factors) -> tuple:
    """What else must agree for adapters to share one stacked group."""
    if isinstance(factors, LowRank):
        return (factors.embedding, factors.base_gain is not None)
    if isinstance(factors, MLP):
        return (repr(factors.activation),)
    return ()


def _scale(placed: "Placed") -> float:
    """The composition's scale s of h + s·Δ (1 for ``add``; multiplicative insertions ignore it)."""
    if isinstance(placed.compose, Scaled) and placed.insertion in ("parallel", "sequential"):
        return float(placed.compose.scale)
    return 1.0


def _problems(peft: "Peft", adapter: str) -> list[str]:
    """Why the deltas of ``adapter`` cannot run in a mixed batch (empty if they can), one line per reason."""
    where: dict[tuple[str, str, str], list[str]] = {}  # (form, insertion, reason) -> modules
    for module, placed in peft.delta_modules(adapter):
        reason = _problem(placed)
        if reason is not None:
            where.setdefault((type(placed.form).__name__, placed.insertion, reason), []).append(module)
    out = []
    for (form, insertion, reason), modules in where.items():
        more = f" and {len(modules) - 1} more" if len(modules) > 1 else ""
        out.append(f"{form} ({insertion}) of '{adapter}' at {modules[0]}{more}: {reason}")
    return out


def _problem(placed: "Placed") -> str | None:
    if placed.insertion == "replace":
        return None
    if placed.insertion == "sequence":
        return "sequence-level forms (prefix, prompt) change the sequence per adapter"
    if not callable(getattr(placed.form, "mixed_factors", None)):  # the Batchable protocol, checked cheaply
        return "the form gives no stackable factors"
    if not isinstance(placed.compose, (Add, Scaled)):
        return f"composition '{type(placed.compose).__name__.lower()}' is not supported"
    return None


def _check_factors(placed: "Placed", factors: Factors, adapter: str, module: str) -> None:
    """Refuse factors that cannot be stacked as this placement needs (checked while the stacks are built)."""
    problem = None
    if isinstance(factors, MLP) and float(factors.activation(torch.zeros(1)).abs().max()) != 0.0:
        problem = f"its activation {factors.activation} is not 0 at 0, so hidden sizes cannot be zero-padded"
    elif isinstance(factors, Scale) != (placed.insertion in ("multiplicative", "multiplicative_input")):
        problem = f"its factors ({type(factors).__name__}) do not fit the insertion"
    if problem is not None:
        raise ValueError(f"{type(placed.form).__name__} ({placed.insertion}) of '{adapter}' at {module} cannot run "
                         f"in a mixed batch: {problem}")


def mixed_batch(peft: "Peft", adapter_names: Sequence[str | None]) -> MixedBatch:
    """``with mixed_batch(peft, names): model(**batch)``: row b runs with adapter ``names[b]`` (None: the base).

    See :class:`MixedBatch` for what is supported and what raises.
    """
    return MixedBatch(peft, adapter_names)


__all__ = ["MixedBatch", "mixed_batch", "SUPPORTED_FORMS"]
