"""Sites: a frozen base module wrapped together with the deltas placed on it.

The insertion forms of He et al. (2022) are the small functions below; with f the base module, x its input, h = f(x)
its output, Δ(·) a form and g a composition:

* ``parallel``:              h' = g(h, Δ(x))       — x is the module's input, or the sub-layer's input for ``attn``/``ffn``
* ``sequential``:            h' = g(h, Δ(h))
* ``multiplicative``:        h' = h ⊙ l            ((IA)³ on keys, values)
* ``multiplicative_input``:  h' = f(x ⊙ l)         ((IA)³ on the FFN's inner activations)
* ``replace``:               h' = f'(x)            (a trainable copy of the module, HF peft's ``modules_to_save``)
* ``sequence``:              h' = h                (Δ extends the sequence instead: prefix keys/values inside attention,
                                                    prompt tokens at the input; see :mod:`unipeft.sequence`)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Literal

import torch
from torch import nn

from unipeft.core.delta import Form
from unipeft.core.modules import weight_out_in
from unipeft.core.quant import QuantizedOriginal, is_quantized, refold_quantized

if TYPE_CHECKING:
    from unipeft.core.positions import Site
    from unipeft.core.recipe import DeltaSpec

Insertion = Literal["parallel", "sequential", "multiplicative", "multiplicative_input", "replace", "sequence"]
INSERTIONS: tuple[str, ...] = ("parallel", "sequential", "multiplicative", "multiplicative_input", "replace",
                               "sequence")


class Placed(nn.Module):
    """One form placed at one site with an insertion form, a composition and an optional output slice — and where it
    sits, the one record of it: ``site`` (module, position, layer, stack, output slice), the recipe ``spec`` it came
    from and its index ``spec_index``, and ``base_shape``, the base weight's shape there (what a saved adapter checks).
    """

    def __init__(self, form: Form, compose: nn.Module, *, insertion: Insertion, source: Literal["module", "sublayer"],
                 site: "Site | None" = None, spec: "DeltaSpec | None" = None, spec_index: int = 0,
                 base_shape: tuple[int, ...] = (), out_slice: tuple[int, int] | None = None) -> None:
        super().__init__()
        if insertion not in INSERTIONS:
            raise ValueError(f"unknown insertion {insertion!r}; valid: {', '.join(INSERTIONS)}")
        self.form = form
        self.compose = compose
        self.insertion = insertion
        self.source = source
        self.site = site
        self.spec = spec
        self.spec_index = spec_index
        self.base_shape = tuple(base_shape)
        self.out_slice = site.out_slice if site is not None else out_slice  # a placement made outside a handle
        self.apply_delta: Callable[[Placed, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor] = \
            _INSERT[insertion]

    def extra_repr(self) -> str:
        where = f", out_slice={self.out_slice}" if self.out_slice else ""
        return f"insertion={self.insertion}, source={self.source}{where}"

    def _join(self, h: torch.Tensor, delta: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.out_slice is None:
            return self.compose(h, delta, z)
        start, stop = self.out_slice
        joined = self.compose(h[..., start:stop], delta, z)
        return torch.cat([h[..., :start], joined, h[..., stop:]], dim=-1)

    @property
    def mergeable(self) -> bool:
        """Whether this placement folds into the base weight exactly (linear in the weight, no gate).

        A sequential delta folds when its form does: an affine Δ(h) (SSF's scale and shift) folds into W and b."""
        if self.insertion in ("multiplicative", "multiplicative_input"):
            return self.form.mergeable
        if self.insertion not in ("parallel", "sequential") or self.source != "module":
            return False
        # a learned scale s is a number at merge time like a fixed one (only the gate depends on the input)
        return self.form.mergeable and type(self.compose).__name__ in ("Add", "Scaled")

    def merge_(self, base: nn.Module, sign: int) -> None:
        """Fold (sign=+1) or unfold (sign=-1) this delta into ``base``'s weight, in place.

        Raises:
            NotImplementedError: if the placement is not mergeable (see :attr:`mergeable`).
        """
        self._check_mergeable()
        bias = getattr(base, "bias", None)
        self.fold_(weight_out_in(base), bias.data if isinstance(bias, torch.Tensor) else None, sign)

    def fold_(self, weight: torch.Tensor, bias: torch.Tensor | None, sign: int) -> None:
        """Fold (sign=+1) or unfold (sign=-1) this delta into a float (out, in) ``weight`` and ``bias``, in place
        (the base module's own, or a dequantized copy of a quantized one: see :mod:`unipeft.core.quant`).

        Raises:
            NotImplementedError: if the placement is not mergeable (see :attr:`mergeable`).
        """
        self._check_mergeable()
        if self.out_slice is not None:
            start, stop = self.out_slice
            weight = weight[start:stop]
            bias = bias[start:stop] if bias is not None else None
        scale = float(getattr(self.compose, "scale", 1.0))
        with torch.no_grad():
            self.form.merge_(weight, bias, insertion=self.insertion, scale=scale, sign=sign)

    def _check_mergeable(self) -> None:
        if not self.mergeable:
            raise NotImplementedError(
                f"{type(self.form).__name__} with insertion '{self.insertion}' and composition "
                f"'{type(self.compose).__name__.lower()}' is not linear in the base weight and cannot be merged")

    def merge_problem(self, base: nn.Module) -> str | None:
        """Why this delta cannot be folded into ``base`` (None if it can)."""
        return self.form.merge_problem(base)


def _parallel(p: Placed, x: torch.Tensor, h: torch.Tensor, captured: torch.Tensor | None) -> torch.Tensor:
    z = captured if p.source == "sublayer" else x
    if z is None:
        raise RuntimeError("a parallel sub-layer delta ran before its sub-layer's input was seen")
    return p._join(h, p.form(z), z)


def _sequential(p: Placed, x: torch.Tensor, h: torch.Tensor, captured: torch.Tensor | None) -> torch.Tensor:
    z = h if p.out_slice is None else h[..., p.out_slice[0]:p.out_slice[1]]
    return p._join(h, p.form(z), z)


def _multiplicative(p: Placed, x: torch.Tensor, h: torch.Tensor, captured: torch.Tensor | None) -> torch.Tensor:
    scale = p.form()  # (d_out,)
    if p.out_slice is None:
        return h * scale
    start, stop = p.out_slice
    return torch.cat([h[..., :start], h[..., start:stop] * scale, h[..., stop:]], dim=-1)


def _identity(p: Placed, x: torch.Tensor, h: torch.Tensor, captured: torch.Tensor | None) -> torch.Tensor:
    return h  # multiplicative_input and replace act before/instead of the base module


#: Key in a base module's ``__dict__`` of its own (weight, bias) while a site that holds base-reading deltas has
#: something merged into it (see :meth:`DeltaSite._refold_from_original`).
UNMERGED_WEIGHT = "_unipeft_unmerged_weight"

_INSERT = {"parallel": _parallel, "sequential": _sequential, "multiplicative": _multiplicative,
           "multiplicative_input": _identity, "replace": _identity, "sequence": _identity}


class DeltaSite(nn.Module):
    """A base module and the deltas of every named adapter placed on it.

    ``adapters[name]`` is a ``ModuleList`` of :class:`Placed`. Only active, unmerged adapters run; the lists used in
    ``forward`` are precomputed by :meth:`set_active` so the hot path is a plain loop.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.captured: torch.Tensor | None = None
        self.merged: list[str] = []
        #: a quantized base's own weight while adapters are merged into it (see unipeft.core.quant)
        self.quant_original: QuantizedOriginal | None = None
        self._active: list[str] = []
        self._pre: list[Placed] = []
        self._post: list[Placed] = []
        self._replace: Placed | None = None
        #: running sequence-level deltas (prefix, prompt): read by unipeft.sequence, not run in forward
        self.sequence: list[Placed] = []
        #: while a mixed batch runs (unipeft.mixed): the per-row plan that forward calls instead
        self.mixed: Callable[..., object] | None = None

    # Some model code reads a projection's weight directly (T5 checks ``wo.weight.dtype``); expose the base's.
    @property
    def weight(self) -> torch.Tensor:
        """The base module's weight."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base module's bias."""
        return self.base.bias

    def add(self, adapter: str, placed: Placed) -> None:
        """Place a delta of ``adapter`` here (inactive until :meth:`set_active`)."""
        if adapter not in self.adapters:
            self.adapters[adapter] = nn.ModuleList()
        self.adapters[adapter].append(placed)

    def remove(self, adapter: str) -> None:
        """Remove every delta of ``adapter`` (it must not be merged)."""
        if adapter in self.merged:
            raise RuntimeError(f"adapter '{adapter}' is merged into the base; unmerge it before removing it")
        del self.adapters[adapter]
        self.set_active([a for a in self._active if a != adapter])

    def set_active(self, names: list[str]) -> None:
        """Run the deltas of these adapters (in this order) in ``forward``."""
        self._active = [n for n in names if n in self.adapters]
        running = [p for n in self._active if n not in self.merged for p in self.adapters[n]]
        self._pre = [p for p in running if p.insertion == "multiplicative_input"]
        replaced = [p for p in running if p.insertion == "replace"]
        if len(replaced) > 1:
            raise ValueError("two active adapters replace the same module; activate only one of them")
        # a plain attribute, not a second registration of a module already under ``adapters`` (which would put its
        # tensors in state_dict twice, and break transformers' save_pretrained on shared tensors)
        self.__dict__["_replace"] = replaced[0] if replaced else None
        self._post = [p for p in running if p.insertion not in ("multiplicative_input", "replace", "sequence")]
        self.sequence = [p for p in running if p.insertion == "sequence"]

    def merge(self, adapter: str) -> None:
        """Fold ``adapter`` into the base weight; it then costs nothing at run time."""
        if adapter in self.merged:
            return
        placed = list(self.adapters[adapter])
        for p in placed:
            if not p.mergeable and p.insertion != "replace":
                p.merge_(self.base, +1)  # raises the explanatory NotImplementedError
        if self.quant_original is not None or is_quantized(self.base):  # dequantize, add, requantize
            refold_quantized(self, [*self.merged, adapter])
        elif self._reads_base():
            self._refold_from_original([*self.merged, adapter])
        else:
            for p in placed:
                if p.insertion == "replace":
                    p.form.swap_(self.base)
                else:
                    p.merge_(self.base, +1)
        self.merged.append(adapter)
        self.set_active(self._active)

    def unmerge(self, adapter: str) -> None:
        """Undo :meth:`merge` (exact up to float rounding)."""
        if adapter not in self.merged:
            return
        if self.quant_original is not None or self._reads_base():  # recompute from the base's own weight
            remaining = [a for a in self.merged if a != adapter]
            if self.quant_original is not None:
                refold_quantized(self, remaining)
            else:
                self._refold_from_original(remaining)
            self.merged.remove(adapter)
            self.set_active(self._active)
            return
        for p in reversed(list(self.adapters[adapter])):
            if p.insertion == "replace":
                p.form.swap_(self.base)
            else:
                p.merge_(self.base, -1)
        self.merged.remove(adapter)
        self.set_active(self._active)

    def _reads_base(self) -> bool:
        """Whether a delta here reads the base weight (DoRA's norm): merges then go through :meth:`_refold_from_original`.
        A module copy (``replace``) swaps modules instead, and keeps the plain path."""
        placed = [p for deltas in self.adapters.values() for p in deltas]
        return any(p.form.reads_base_weight for p in placed) and not any(p.insertion == "replace" for p in placed)

    def _refold_from_original(self, merged: list[str]) -> None:
        """Make the base weight W₀ + the merged deltas, each computed at W₀ (the weight with nothing merged).

        Deltas that read the base weight (DoRA: W' = m ⊙ (W + sBA)/‖W + sBA‖_c) are defined at W₀ in the stacked
        model, so they are computed from W₀ first and added; the other deltas fold after them in order. W₀ is kept on
        the base module while anything is merged (:data:`UNMERGED_WEIGHT`, where base-reading deltas read it), so
        unmerging recomputes from it and the last unmerge restores it exactly.
        """
        weight = weight_out_in(self.base)
        bias = self.base.bias if isinstance(getattr(self.base, "bias", None), torch.Tensor) else None
        original = self.base.__dict__.get(UNMERGED_WEIGHT)
        if original is None:
            original = (weight.detach().clone(), None if bias is None else bias.detach().clone())
        w0, b0 = original
        placed = [p for name in merged for p in self.adapters[name]]
        with torch.no_grad():
            weight.copy_(w0)
            if bias is not None:
                bias.copy_(b0)
            if not placed:
                self.base.__dict__.pop(UNMERGED_WEIGHT, None)
                return
            self.base.__dict__[UNMERGED_WEIGHT] = original
            readers = [p for p in placed if p.form.reads_base_weight]
            updates = []
            for p in readers:  # each on its own copy of W₀
                w, b = w0.clone(), None if b0 is None else b0.clone()
                p.fold_(w, b, +1)
                updates.append((w - w0, None if b is None else b - b0))
            for dw, db in updates:
                weight.add_(dw)
                if bias is not None and db is not None:
                    bias.add_(db)
            for p in placed:
                if not p.form.reads_base_weight:
                    p.fold_(weight, None if bias is None else bias.data, +1)

    def capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook on a sub-layer's entry module: remember the sub-layer input for parallel deltas."""
        self.captured = args[0] if args else kwargs["hidden_states"]

    def forward(self, x: torch.Tensor, *args, **kwargs):  # noqa: D401 - same signature as the base module
        if self.mixed is not None:
            return self.mixed(x, *args, **kwargs)
        if self._replace is not None:
            h = self._replace.form(x, *args, **kwargs)
        elif self._pre:
            x_in = x
            for p in self._pre:
                x_in = x_in * p.form()
            h = self.base(x_in, *args, **kwargs)
        else:
            h = self.base(x, *args, **kwargs)
        if not self._post:
            return h
        captured, self.captured = self.captured, None
        if isinstance(h, tuple):  # a raw pattern may wrap a module that returns (hidden, ...)
            first = h[0]
            for p in self._post:
                first = p.apply_delta(p, x, first, captured)
            return (first, *h[1:])
        for p in self._post:
            h = p.apply_delta(p, x, h, captured)
        return h


def base_named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model.named_modules()`` as if no adapter were attached: wrapped modules under their original names, no deltas.

    Position tables and module patterns resolve against this view, so adding a second adapter finds the same sites.
    """
    out: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def walk(module: nn.Module, prefix: str) -> None:
        while isinstance(module, DeltaSite):
            module = module.base
        if id(module) in seen:
            return
        seen.add(id(module))
        out.append((prefix, module))
        for name, child in module._modules.items():
            if child is not None:
                walk(child, f"{prefix}.{name}" if prefix else name)

    walk(model, "")
    return out
