"""Deltas: the functional forms of He et al. (2022), each a small module computing Δ for one site.

A *form* is the function f in Δh = f(z): ``ReLU(z W_down) W_up`` (bottleneck adapter), ``z W_down W_up`` (LoRA),
a scaling vector ((IA)³), a bias (BitFit), ... Where and how Δ enters the model (insertion: parallel, sequential,
multiplicative; composition: add, scaled, gated) is decided by :class:`unipeft.core.site.Placed`, not by the form.

Adding a method means writing one form and its config in ``unipeft/methods/`` and registering it with
:func:`register_form`; nothing in the core changes. A form that needs something from training (a regulariser, a look
at data before the optimizer exists, a step-wise schedule) says so through the training contract on :class:`Form`
(``loss_term``, ``needs_prepare``/``prepare``, ``on_step``), which :class:`unipeft.Peft` gathers and every training
loop calls; no loop knows a method by name.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar, Mapping, Sequence, TypeVar, get_type_hints

import torch
from torch import nn

#: Training batches a loop hands to :meth:`Form.prepare` (FishMask scores its Fisher information on them).
PREPARE_BATCHES = 8


@dataclass(frozen=True, kw_only=True)
class SiteShape:
    """What a form needs to know about its site to build its parameters.

    Attributes:
        d_in: features of the tensor the form reads (x for parallel, h for sequential); None for embeddings.
        d_out: features of the tensor it modifies.
        base: the wrapped base module (read-only use: shapes, dtype, an SVD-based init).
        out_slice: (start, stop) of the base's output features the form modifies (GPT-2's ``attn.q`` in the fused
            ``c_attn``), or None for all of them.
    """

    d_in: int | None
    d_out: int
    base: nn.Module
    out_slice: tuple[int, int] | None = None


@dataclass(frozen=True, kw_only=True)
class FormConfig:
    """Base class of a form's hyperparameters. Subclasses are frozen keyword-only dataclasses."""

    type: ClassVar[str] = ""
    #: Insertion forms this delta supports; the first is its default.
    insertions: ClassVar[tuple[str, ...]] = ("parallel",)

    def build(self, shape: SiteShape) -> "Form":
        """Create the form's module for one site."""
        raise NotImplementedError

    def share(self, forms: list["Form"]) -> None:
        """Called once per delta spec with the forms built for all its sites (in site order), before they are placed:
        forms that share parameters across sites tie them here (Compacter's A_i). Default: nothing is shared."""

    def to_dict(self) -> dict[str, Any]:
        """Plain-data view (for YAML/JSON), with the form's ``type`` first."""
        out: dict[str, Any] = {"type": self.type}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


class Form(nn.Module):
    """A functional form: ``forward(z)`` returns Δ (or, for multiplicative forms, the scale vector)."""

    #: Whether Δ depends on the site's base weight (DoRA's row norms). Such a form reads W₀, the weight with nothing
    #: merged, and the site computes its merge at W₀ whatever else is merged there.
    reads_base_weight: ClassVar[bool] = False

    def merge_(self, weight: torch.Tensor, bias: torch.Tensor | None, *, insertion: str, scale: float,
               sign: int) -> None:
        """Fold (sign=+1) or take out (sign=-1) ``scale * ΔW`` of an (out, in) weight view and bias, in place.

        Raises:
            NotImplementedError: if the form is not linear in the weight.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into the base weight")

    def on_attach(self, base: nn.Module) -> None:
        """Called once after the form is placed on ``base``. Forms that re-initialise the base (PiSSA, OLoRA)
        change it here and must undo it in :meth:`on_detach`."""

    def on_detach(self, base: nn.Module) -> None:
        """Called when the form is removed from ``base`` (adapter removed or model detached)."""

    # ------------------------------------------------------------------ the training contract (every loop calls it)
    def loss_term(self) -> torch.Tensor | None:
        """A regulariser this form adds to the training loss (AdaLoRA's orthogonality term), or None."""
        return None

    def needs_prepare(self) -> bool:
        """Whether :meth:`prepare` still has to run before training (FishMask, until it has chosen its entries)."""
        return False

    def prepare(self, model: nn.Module, batches: Sequence[Any], loss_fn: Callable[..., torch.Tensor] | None) -> bool:
        """Before the optimizer is built: look at a few real training ``batches`` of ``model`` (FishMask scores the
        Fisher information on them; ``loss_fn(model, batch)`` gives the loss, None: ``model(**batch).loss``).

        Returns:
            True if the trainable tensors were replaced (build the optimizer afterwards).
        """
        return False

    def on_step(self, step: int, total_steps: int) -> bool:
        """After optimizer step ``step`` (1-based) of ``total_steps``, with the gradients still present (AdaLoRA
        reallocates its rank budget, diff pruning prunes at ``prune_at``).

        Returns:
            True if the trainable tensors were replaced (the optimizer must be given the new ones).
        """
        return False

    def resize_(self, shapes: Mapping[str, torch.Size]) -> None:
        """Called by :func:`unipeft.load_adapter` before the saved tensors are copied in, with their shapes (keys as in
        this form's state dict). Forms whose tensor shapes depend on data (FishMask's chosen entries) reallocate to
        them here; the default keeps the built shapes, so the loader reports any mismatch."""

    @property
    def rewrites_base(self) -> bool:
        """Whether the form changed its base weight at attach (PiSSA/OLoRA move the top singular directions into the
        factors), so that its factors alone are not its delta from the original weight."""
        return False

    def merge_problem(self, base: nn.Module) -> str | None:
        """Why this form cannot be folded into this particular ``base`` module (None if it can)."""
        return None

    @property
    def mergeable(self) -> bool:
        """Whether :meth:`merge_` is implemented."""
        return type(self).merge_ is not Form.merge_


_FORMS: dict[str, type[FormConfig]] = {}
C = TypeVar("C", bound=type[FormConfig])


def register_form(name: str) -> Callable[[C], C]:
    """Class decorator registering a :class:`FormConfig` subclass under ``name``."""

    def decorate(cls: C) -> C:
        if name in _FORMS and _FORMS[name] is not cls:
            raise ValueError(f"form '{name}' is already registered by {_FORMS[name].__name__}")
        cls.type = name
        _FORMS[name] = cls
        return cls

    return decorate


def form_names() -> list[str]:
    """Names of all registered forms (``import unipeft`` registers the built-in ones)."""
    return sorted(_FORMS)


def form_config_class(name: str) -> type[FormConfig]:
    """The registered config class of form ``name``.

    Raises:
        ValueError: for an unknown form name.
    """
    if name not in _FORMS:
        raise ValueError(f"unknown delta form {name!r}; valid forms: {', '.join(sorted(_FORMS))}")
    return _FORMS[name]


def form_class(name: str) -> type[Form]:
    """The :class:`Form` class that form ``name``'s config builds (read from ``build``'s return annotation).

    Raises:
        ValueError: for an unknown form name.
    """
    built = get_type_hints(form_config_class(name).build).get("return")
    if not (isinstance(built, type) and issubclass(built, Form)):
        raise TypeError(f"{_FORMS[name].__name__}.build must be annotated with the Form class it returns")
    return built


def form_config(data: Mapping[str, Any] | FormConfig) -> FormConfig:
    """Build a form config from ``{"type": name, **hyperparameters}``.

    Raises:
        ValueError: for an unknown type or an unknown hyperparameter (the message lists the valid ones).
    """
    if isinstance(data, FormConfig):
        return data
    data = dict(data)
    name = data.pop("type", None)
    if name not in _FORMS:
        raise ValueError(f"unknown delta form {name!r}; valid forms: {', '.join(sorted(_FORMS))}")
    cls = _FORMS[name]
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - valid)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for form '{name}'; valid: {', '.join(sorted(valid))}")
    for f in fields(cls):
        if f.name in data and isinstance(data[f.name], list):
            data[f.name] = tuple(data[f.name])
    return cls(**data)
