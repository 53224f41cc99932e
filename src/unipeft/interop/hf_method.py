"""The registry of HF peft method mappings: one small class per ``peft_type``, in its own ``hf_<method>.py`` file.

A mapping knows three things about its method:

* reading: HF config → unipeft :class:`~unipeft.core.recipe.DeltaSpec` s (:meth:`HFMethod.to_specs`), and the saved
  tensors → the parameters of each placed form (:meth:`HFMethod.load`);
* writing: the placed forms of a unipeft adapter → HF config fields and tensors (:meth:`HFMethod.export`);
* which HF config options it understands: every other option must be at its neutral value, or the mapping refuses
  the config naming the option (:meth:`HFMethod.check_config`), so nothing is silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import nn

from unipeft.core.positions import Site
from unipeft.core.recipe import DeltaSpec
from unipeft.core.site import Placed

#: Config fields every HF adapter config may carry that do not change what the adapter computes.
METADATA_FIELDS = frozenset({"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path",
                             "revision", "inference_mode", "runtime_config", "modules_to_save"})


@dataclass(frozen=True, eq=False)
class Placement:
    """One placed delta of an adapter with the base module it sits on (a view: where it sits and the spec it came
    from are the placed delta's own ``site`` and ``spec``)."""

    placed: Placed
    base: nn.Module

    @property
    def site(self) -> Site:
        """Where the delta sits."""
        return self.placed.site

    @property
    def spec(self) -> DeltaSpec:
        """The recipe spec the delta came from."""
        return self.placed.spec

    @property
    def module(self) -> str:
        """Full name of the wrapped module."""
        return self.site.module

    @property
    def form_type(self) -> str:
        """The registered name of the form (``lora``, ``ia3``, ...)."""
        return self.spec.form.type

    @property
    def scale(self) -> float:
        """The fixed factor of the composition (1 for ``add``; s for ``scaled``, learned or not)."""
        return float(getattr(self.placed.compose, "scale", 1.0))


class TensorPool:
    """The tensors of an HF adapter file (keys without the ``base_model.model.`` prefix) and its config; tensors are
    taken one by one so that anything left over at the end is reported instead of ignored."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], source: str,
                 config: Mapping[str, Any] | None = None) -> None:
        self.tensors = dict(tensors)
        self.source = source
        self.config = dict(config or {})  # the adapter's HF config, for options that shape tensors (rank_pattern)
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        """Whether the file holds ``key``."""
        return key in self.tensors

    def take(self, key: str, shape: Sequence[int] | None = None) -> torch.Tensor:
        """The tensor ``key``, checked against ``shape`` if given.

        Raises:
            ValueError: if the file has no such tensor or its shape differs.
        """
        if key not in self.tensors:
            near = sorted(k for k in self.tensors if k.rsplit(".", 2)[0] == key.rsplit(".", 2)[0])[:4]
            raise ValueError(f"{self.source} has no tensor {key!r}" + (f" (it has {near})" if near else ""))
        tensor = self.tensors[key]
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"tensor {key!r} in {self.source} has shape {tuple(tensor.shape)}, "
                             f"but this model needs {tuple(shape)}")
        self.used.add(key)
        return tensor

    def left(self) -> list[str]:
        """Keys not taken yet."""
        return sorted(set(self.tensors) - self.used)


@dataclass
class MethodExport:
    """What a mapping writes for one adapter.

    Attributes:
        config: HF config fields of the method (``target_modules``, ``r``, ...).
        tensors: HF tensor keys (without ``base_model.model.``) → tensors.
        targets: full names of the modules HF peft will wrap with the method's layer.
        shared: tensors HF keeps outside the model's modules, keyed as saved without prefix (VeRA's ``vera_A``,
            prompt learning's ``prompt_embeddings``).
    """

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    targets: list[str] = field(default_factory=list)
    shared: dict[str, torch.Tensor] = field(default_factory=dict)


def is_neutral(value: Any) -> bool:
    """Whether an option value means "not used" (None, False, 0, empty)."""
    return value is None or value is False or value == 0 or value in ({}, [], "")


class HFMethod:
    """Base class of a mapping between one HF peft method and unipeft forms (see the module docstring)."""

    #: The HF ``peft_type`` (``LORA``, ``IA3``, ...).
    peft_type: ClassVar[str] = ""
    #: unipeft form types this mapping writes.
    forms: ClassVar[tuple[str, ...]] = ()
    #: Family of the recipe built from an HF config.
    family: ClassVar[str] = "reparameterized"
    #: The method's paper, for the recipe.
    paper: ClassVar[str] = ""
    #: Config options this mapping reads (besides :data:`METADATA_FIELDS`).
    handled: ClassVar[frozenset[str]] = frozenset()
    #: Options accepted at these non-neutral values only, e.g. ``{"megatron_core": ("megatron.core",)}``.
    accepted: ClassVar[Mapping[str, tuple[Any, ...]]] = {}
    #: Why an option is refused, where the generic reason does not fit (option → reason).
    why: ClassVar[Mapping[str, str]] = {}
    #: The ``<method>_only`` value of HF's ``bias`` option (``lora_only``); empty if the method has no ``bias`` option.
    bias_only: ClassVar[str] = ""
    #: Whether the method is a prompt-learning method (prompt encoder, no module targets).
    prompt_learning: ClassVar[bool] = False

    def check_config(self, config: Mapping[str, Any]) -> None:
        """Refuse a config using an option this mapping cannot represent.

        Raises:
            ValueError: naming the option and its value.
        """
        for key, value in config.items():
            if key in METADATA_FIELDS or key in self.handled or is_neutral(value):
                continue
            if key in self.accepted and value in self.accepted[key]:
                continue
            reason = self.why.get(key, "it changes what the adapter computes in a way unipeft does not represent")
            raise ValueError(f"HF peft option {key}={value!r} of this {self.peft_type} adapter is not supported by "
                             f"unipeft's conversion: {reason}; supported options: {', '.join(sorted(self.handled))}")

    def targets(self, config: Mapping[str, Any], model: nn.Module) -> list[str]:
        """Full names of the modules the config puts the method on."""
        raise NotImplementedError

    def to_specs(self, config: Mapping[str, Any], model: nn.Module) -> list[DeltaSpec]:
        """The unipeft deltas of the method part of an HF config (without modules_to_save / bias)."""
        raise NotImplementedError

    def begin_load(self, placements: Sequence[Placement], pool: TensorPool) -> None:
        """Called once before :meth:`load` with all of the method's placements (VeRA checks its shared matrices)."""

    def load(self, placement: Placement, pool: TensorPool) -> None:
        """Copy the HF tensors of one placed form into it."""
        raise NotImplementedError

    def export(self, placements: Sequence[Placement], model: nn.Module) -> MethodExport:
        """The HF config fields and tensors of the method's placed forms of one adapter.

        Raises:
            ValueError: if a placement cannot be represented in HF peft's format (the message says which and why).
        """
        raise NotImplementedError


_METHODS: dict[str, HFMethod] = {}


def register_hf_method(cls: type[HFMethod]) -> type[HFMethod]:
    """Class decorator adding a mapping to the registry under its ``peft_type``."""
    _METHODS[cls.peft_type] = cls()
    return cls


def hf_methods() -> dict[str, HFMethod]:
    """peft_type → mapping, for every mapping whose unipeft forms are available."""
    from unipeft.core.delta import form_names

    available = set(form_names())
    return {t: m for t, m in _METHODS.items() if set(m.forms) <= available}


def method_for_peft_type(peft_type: str) -> HFMethod:
    """The mapping of an HF ``peft_type``.

    Raises:
        NotImplementedError: for a method unipeft does not (yet) convert; the message lists the supported ones.
    """
    methods = hf_methods()
    if peft_type not in methods:
        why = (" (its unipeft form is not available in this installation)" if peft_type in _METHODS
               else "")
        raise NotImplementedError(f"HF peft adapters of peft_type {peft_type!r} cannot be converted{why}; "
                                  f"supported peft_types: {', '.join(sorted(methods))}")
    return methods[peft_type]


def method_for_form(form_type: str) -> HFMethod | None:
    """The mapping that writes a unipeft form type, or None."""
    for method in hf_methods().values():
        if form_type in method.forms:
            return method
    return None


__all__ = ["HFMethod", "METADATA_FIELDS", "MethodExport", "Placement", "TensorPool", "hf_methods", "is_neutral",
           "method_for_form", "method_for_peft_type", "register_hf_method"]
