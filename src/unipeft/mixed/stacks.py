"""What a site keeps between mixed batches: the stacked groups of all its adapters, rebuilt only when they change.

The stacks of a site hold every adapter placed there whose deltas at the site can run per row (see
:func:`placement_problem`), whatever the batch, so batches with other mixes of adapters reuse them; a batch only
gathers them per row (:meth:`~unipeft.mixed.groups.Group.bind`). They are rebuilt when the site's adapters or
their tensors change: an adapter added or removed (the placements are compared by identity), a weight updated in place
(a training step, a hot swap: the tensor's version counter moves), or a tensor moved to another device or dtype (its
storage changes). The base module's tensors count too (DoRA reads the base weight).

An adapter's k-th delta at the site joins a group of stage k (``pre`` for scalings of the module's input), so each row
sees its own adapter's deltas in its own order; within a stage, adapters whose deltas have the same kind and placement
share one group.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from unipeft.core.compose import Add, Scaled
from unipeft.core.factors import MLP, Factors, LowRank, Scale
from unipeft.mixed.groups import Group, build_group, differentiable

if TYPE_CHECKING:
    from unipeft.core.site import DeltaSite, Placed


@dataclass(eq=False)
class Stage:
    """One group of a site with where it acts.

    Attributes:
        group: the stacked deltas.
        slot_of: adapter name → its slot in the group (1-based; 0 is the zero adapter).
        insertion: ``multiplicative_input`` (before the module), ``parallel``, ``sequential`` or ``multiplicative``.
        source: ``module`` or ``sublayer`` (Δ reads the captured sub-layer input).
        out_slice: (start, stop) of the output features the deltas modify, or None.
    """

    group: Group
    slot_of: dict[str, int]
    insertion: str
    source: str
    out_slice: tuple[int, int] | None


@dataclass(eq=False)
class SiteStacks:
    """The cached stacks of one site (see the module docstring).

    Attributes:
        stages: the groups, in stage order (input scalings first).
        replace: adapter name → the module copy that replaces the base module for its rows.
        refused: adapter name → (form, insertion, reason) of each of its deltas here that cannot run per row.
        structure: (adapter, its list of placements, their number) of the site when the stacks were built (the lists
            are held, so identities stay unique).
        tensors: per adapter ("" for the base module) the (tensor, version, storage pointer) of every tensor the
            stacks were built from.
    """

    stages: list[Stage] = field(default_factory=list)
    replace: dict[str, nn.Module] = field(default_factory=dict)
    refused: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)
    structure: tuple = ()
    tensors: dict[str, list[tuple[torch.Tensor, int, int]]] = field(default_factory=dict)

    def current(self, site: "DeltaSite", adapters: "list[str] | None" = None) -> bool:
        """Whether the stacks still match the site's adapters and the tensors of ``adapters`` (default: all) and of
        the base module. Stale stacks of other adapters are never read: they are checked when a batch uses them."""
        if _structure(site) != self.structure:
            return False
        names = self.tensors if adapters is None else ["", *(a for a in adapters if a in self.tensors)]
        return all(t._version == version and t.data_ptr() == pointer
                   for name in names for t, version, pointer in self.tensors[name])


_CACHE: "weakref.WeakKeyDictionary[nn.Module, SiteStacks]" = weakref.WeakKeyDictionary()


def site_stacks(site: "DeltaSite", adapters: "list[str] | None" = None) -> SiteStacks:
    """The stacks of ``site``: the cached ones while :meth:`SiteStacks.current` for ``adapters``, else rebuilt."""
    cached = _CACHE.get(site)
    if cached is not None and cached.current(site, adapters):
        return cached
    with torch.no_grad():
        stacks = _build(site)
    _CACHE[site] = stacks
    return stacks


def training_stacks(site: "DeltaSite") -> SiteStacks:
    """Stacks of ``site`` that are differentiable functions of its adapters' tensors (for a training step: built
    afresh every time, never cached, since they hold the step's autograd graph)."""
    with differentiable():
        return _build(site)


def _structure(site: "DeltaSite") -> tuple:
    # ModuleDict/ModuleList without their Python-level accessors: this runs for every site on every batch
    return tuple((name, placements, len(placements._modules)) for name, placements in site.adapters._modules.items())


def _build(site: "DeltaSite") -> SiteStacks:
    stacks = SiteStacks(structure=_structure(site))
    tensors: dict[str, list[torch.Tensor]] = {"": [*site.base.parameters(), *site.base.buffers()]}
    staged: dict[tuple, list[tuple[str, "Placed", Factors]]] = {}
    for adapter, placements in site.adapters.items():
        factors_of: list[tuple["Placed", Factors | None]] = []
        for placed in placements:
            reason = placement_problem(placed)
            factors = None
            if reason is None and placed.insertion != "replace":
                factors = placed.form.mixed_factors()  # type: ignore[operator]
                reason = factors_problem(placed, factors)
            if reason is not None:
                stacks.refused.setdefault(adapter, []).append((type(placed.form).__name__, placed.insertion, reason))
            factors_of.append((placed, factors))
        if adapter in stacks.refused:
            continue
        pre = post = 0
        for placed, factors in factors_of:
            tensors.setdefault(adapter, []).extend([*placed.parameters(), *placed.buffers()])
            if placed.insertion == "replace":
                stacks.replace[adapter] = placed.form
                continue
            if placed.insertion == "multiplicative_input":
                key: tuple = ("0pre", pre)
                pre += 1
            else:
                key = ("1post", post, type(factors), placed.insertion, placed.source, placed.out_slice,
                       _variant(factors))
                post += 1
            staged.setdefault(key, []).append((adapter, placed, factors))
    for key in sorted(staged, key=lambda k: (k[0], k[1])):  # the sort is stable: kinds of a stage keep their order
        members = staged[key]
        first = members[0][1]
        group = build_group([f for _, _, f in members], [_scale(p) for _, p, _ in members])  # type: ignore[misc]
        stacks.stages.append(Stage(group=group, slot_of={a: k for k, (a, _, _) in enumerate(members, start=1)},
                                   insertion=first.insertion, source=first.source, out_slice=first.out_slice))
    stacks.tensors = {name: [(t, t._version, t.data_ptr()) for t in dict.fromkeys(ts)] for name, ts in tensors.items()}
    return stacks


def placement_problem(placed: "Placed") -> str | None:
    """Why this placed delta cannot run in a mixed batch (None if it can, as far as its placement tells)."""
    if placed.insertion == "replace":
        return None
    if placed.insertion == "sequence":
        return "sequence-level forms (prefix, prompt) change the sequence per adapter"
    if not callable(getattr(placed.form, "mixed_factors", None)):  # the Batchable protocol, checked cheaply
        return "the form gives no stackable factors"
    if not isinstance(placed.compose, (Add, Scaled)):
        return f"composition '{type(placed.compose).__name__.lower()}' is not supported"
    return None


def factors_problem(placed: "Placed", factors: Factors) -> str | None:
    """Why these factors cannot be stacked as the placement needs (None if they can)."""
    if isinstance(factors, MLP) and float(factors.activation(torch.zeros(1)).abs().max()) != 0.0:
        return f"its activation {factors.activation} is not 0 at 0, so hidden sizes cannot be zero-padded"
    if isinstance(factors, Scale) != (placed.insertion in ("multiplicative", "multiplicative_input")):
        return f"its factors ({type(factors).__name__}) do not fit the insertion"
    return None


def _variant(factors: Factors | None) -> tuple:
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
