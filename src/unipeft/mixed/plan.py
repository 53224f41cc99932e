"""The per-site plan of a mixed batch: which stacked groups run at one :class:`~unipeft.core.site.DeltaSite`.

For every row b the plan computes exactly what the site computes with only adapter a_b active (or none):

    x_b' = x_b ⊙ l_{a_b}                                 multiplicative_input groups ((IA)³ at the FFN)
    h_b  = f'_{a_b}(x_b)  if a_b replaces f here,  else f(x_b')
    h_b ← g(h_b, Δ_{a_b}(z_b)) for each of a_b's deltas here, in a_b's order (z = x, the sub-layer input, or h)

An adapter's k-th delta at the site goes into a group of stage k, so each row sees its own adapter's deltas in its
own order; a group is the identity (Δ = 0, l = 1) for rows outside it, so groups of one stage commute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from unipeft.mixed.groups import Bound


@dataclass(eq=False)
class Step:
    """One group applied after the base module, with the placement it came from.

    Attributes:
        group: the stacked deltas, bound to the batch's rows.
        insertion: ``parallel``, ``sequential`` or ``multiplicative``.
        source: ``module`` (Δ reads the module's input) or ``sublayer`` (the captured sub-layer input).
        out_slice: (start, stop) of the output features it modifies, or None.
    """

    group: Bound
    insertion: Literal["parallel", "sequential", "multiplicative"]
    source: Literal["module", "sublayer"]
    out_slice: tuple[int, int] | None

    def apply(self, x: torch.Tensor, h: torch.Tensor, captured: torch.Tensor | None) -> torch.Tensor:
        """h after this step, for every row."""
        part = h if self.out_slice is None else h[..., self.out_slice[0]:self.out_slice[1]]
        if self.insertion == "multiplicative":
            joined = self.group.scale(part)
        else:
            if self.insertion == "sequential":
                z = part
            elif self.source == "sublayer":
                if captured is None:
                    raise RuntimeError("a parallel sub-layer delta ran before its sub-layer's input was seen")
                z = captured
            else:
                z = x
            joined = part + self.group.delta(z).to(part.dtype)
        if self.out_slice is None:
            return joined
        start, stop = self.out_slice
        return torch.cat([h[..., :start], joined, h[..., stop:]], dim=-1)


@dataclass(eq=False)
class SitePlan:
    """What one site runs during a mixed batch (see the module docstring); called in place of the site's forward.

    Attributes:
        site: the :class:`~unipeft.core.site.DeltaSite`.
        name: its module name (for messages).
        rows: the batch size the plan was built for.
        pre: scalings of the module's input.
        replace: (module copy, row indices) for adapters that replace the module here.
        base_rows: whether some rows run the base module (not every row is replaced).
        post: the steps after the module, in stage order.
    """

    site: nn.Module
    name: str
    rows: int
    pre: list[Bound] = field(default_factory=list)
    replace: list[tuple[nn.Module, torch.Tensor]] = field(default_factory=list)
    base_rows: bool = True
    post: list[Step] = field(default_factory=list)

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        site = self.site
        if x.shape[0] != self.rows:
            raise ValueError(f"the mixed batch has {self.rows} adapter names but {self.name} got a batch of "
                             f"{x.shape[0]} rows; give one name per row (beam search and num_return_sequences "
                             "multiply the rows: repeat the names to match)")
        if site._active:
            raise RuntimeError("adapters were activated inside a mixed batch; leave the `with` block first")
        h = self._module(x, args, kwargs)
        captured, site.captured = site.captured, None
        if not self.post:
            return h
        if isinstance(h, tuple):  # a raw pattern may wrap a module that returns (hidden, ...)
            first = h[0]
            for step in self.post:
                first = step.apply(x, first, captured)
            return (first, *h[1:])
        for step in self.post:
            h = step.apply(x, h, captured)
        return h

    def _module(self, x: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        x_in = x
        for group in self.pre:
            x_in = group.scale(x_in)
        if not self.replace:
            return self.site.base(x_in, *args, **kwargs)
        if args or kwargs:
            raise ValueError(f"a replaced module at {self.name} takes extra arguments; mixed batches replace only "
                             "modules called with one input (classification heads)")
        h = self.site.base(x_in) if self.base_rows else None
        for module, rows in self.replace:  # one call per replacing adapter, on its rows (heads are small)
            part = module(x.index_select(0, rows))
            if h is None:
                h = part.new_empty((x.shape[0], *part.shape[1:]))
            h = h.index_copy(0, rows, part.to(h.dtype))
        return h
