"""The two HF peft options shared by several methods: ``modules_to_save`` and ``bias``.

* ``modules_to_save`` ↔ unipeft's ``copy`` form (insertion ``replace``): a trainable copy of the whole module. HF peft
  0.21 saves the copy's tensors under the module's own name (``classifier.weight``); older versions under
  ``classifier.modules_to_save.weight``; both are read.
* ``bias`` (``all`` / ``lora_only``) ↔ unipeft's ``bias`` form (BitFit's Δb): HF trains the base biases in place and
  saves their absolute values (``m.bias``, or ``m.base_layer.bias`` on a module wrapped by the method); unipeft keeps
  Δb = saved − base. Writing, only the biases unipeft trains are saved (HF loads exactly the saved ones), as
  ``bias: lora_only`` when they are the biases of the method's modules, else ``bias: all``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from unipeft.core.compose import Add, Scaled
from unipeft.core.modules import module_dims
from unipeft.core.recipe import DeltaSpec
from unipeft.core.site import base_named_modules
from unipeft.interop.hf_match import compress_endswith, model_module_names, modules_to_save_names, unipeft_modules
from unipeft.interop.hf_method import HFMethod, Placement, TensorPool
from unipeft.methods.bitfit import BiasConfig
from unipeft.methods.module_copy import CopyConfig

BIAS_VALUES = ("none", "all")


# ------------------------------------------------------------------------------------------------ reading
def copy_specs(config: Mapping[str, Any], model: nn.Module) -> tuple[list[DeltaSpec], list[str]]:
    """The ``copy`` delta for ``modules_to_save``, and the full names of the copied modules."""
    names = modules_to_save_names(model, config.get("modules_to_save"))
    if config.get("modules_to_save") and not names:
        raise ValueError(f"modules_to_save {config['modules_to_save']!r} match no module of this model")
    if not names:
        return [], []
    modules = unipeft_modules(model, names, config["modules_to_save"])
    return [DeltaSpec(form=CopyConfig(), modules=modules, insertion="replace")], names


def _has_bias(module: nn.Module) -> bool:
    return isinstance(module._parameters.get("bias"), torch.Tensor)


def bias_specs(config: Mapping[str, Any], model: nn.Module, method: HFMethod, targets: Sequence[str],
               copied: Sequence[str]) -> list[DeltaSpec]:
    """The ``bias`` delta for HF's ``bias`` option (none for ``none``).

    Raises:
        ValueError: for a bias value the method does not have.
    """
    value = config.get("bias", "none") or "none"
    if value == "none":
        return []
    if not method.bias_only or value not in (*BIAS_VALUES, method.bias_only):
        valid = (*BIAS_VALUES, method.bias_only) if method.bias_only else ("none",)
        raise ValueError(f"HF peft option bias={value!r} is not supported for {method.peft_type}; valid: "
                         f"{', '.join(valid)}")
    modules = dict(base_named_modules(model))
    if value == "all":
        names = [n for n, m in modules.items() if n and _has_bias(m)
                 and not any(n == c or n.startswith(c + ".") for c in copied)]
    else:
        names = [n for n in targets if _has_bias(modules[n])]
    for name in names:
        try:
            module_dims(modules[name])
        except TypeError as err:
            raise ValueError(f"bias={value!r} trains the bias of {name}, which unipeft's bias delta cannot hold "
                             f"({err})") from err
    return [DeltaSpec(form=BiasConfig(), modules=unipeft_modules(model, names))] if names else []


def load_copy(p: Placement, pool: TensorPool) -> None:
    """Fill a ``copy`` form from HF's ``modules_to_save`` tensors (new or legacy key names)."""
    copy = p.placed.form.module
    with torch.no_grad():
        for key, tensor in copy.state_dict().items():
            new, legacy = f"{p.module}.{key}", f"{p.module}.modules_to_save.{key}"
            value = pool.take(new if pool.has(new) else legacy, tensor.shape)
            tensor.copy_(value)
            if pool.has(legacy) and legacy not in pool.used:  # HF's bias="all" saves the copy's bias twice
                _take_equal(pool, legacy, value)
            original = f"{p.module}.original_module.{key}"
            if pool.has(original):  # bias="all" also saves the unused original module's bias: it must be the base's
                _take_equal(pool, original, p.base.state_dict()[key])


def _take_equal(pool: TensorPool, key: str, expected: torch.Tensor) -> None:
    if not torch.equal(pool.take(key, expected.shape), expected):
        raise ValueError(f"tensor {key!r} in {pool.source} differs from the value it should repeat; "
                         "the file is inconsistent")


def bias_key(module: str, targets: Sequence[str]) -> str:
    """HF's key of a module's bias: under ``base_layer`` when the method wraps the module."""
    return f"{module}.base_layer.bias" if module in targets else f"{module}.bias"


def load_bias(p: Placement, pool: TensorPool, targets: Sequence[str]) -> None:
    """Set Δb = saved bias − base bias (0 when the file has none: HF keeps the base bias then)."""
    base_bias = p.base.bias
    key = bias_key(p.module, targets)
    if pool.has(key):
        with torch.no_grad():
            p.placed.form.bias.copy_(pool.take(key, base_bias.shape) - base_bias)


# ------------------------------------------------------------------------------------------------ writing
def export_copies(placements: Sequence[Placement], model: nn.Module) -> tuple[list[str] | None, dict[str, torch.Tensor]]:
    """HF ``modules_to_save`` and its tensors for the ``copy`` deltas.

    Raises:
        ValueError: if no ``modules_to_save`` list selects exactly the copied modules.
    """
    if not placements:
        return None, {}
    names = [p.module for p in placements]
    value = compress_endswith(names, model_module_names(model))
    if isinstance(value, str) or sorted(modules_to_save_names(model, value)) != sorted(names):
        raise ValueError(f"HF peft's modules_to_save cannot select exactly the copied modules {names}")
    tensors = {f"{p.module}.{k}": v.detach() for p in placements for k, v in p.placed.form.module.state_dict().items()}
    return value, tensors


def export_bias(placements: Sequence[Placement], model: nn.Module, method: HFMethod, targets: Sequence[str],
                copied: Sequence[str]) -> tuple[str, dict[str, torch.Tensor]]:
    """HF ``bias`` and the absolute bias tensors for the ``bias`` deltas.

    Raises:
        ValueError: if the method has no bias option, a delta is not a plain added Δb, or the module has no bias.
    """
    if not placements:
        return "none", {}
    if not method.bias_only:
        raise ValueError(f"this adapter trains biases (form 'bias' at {placements[0].module}, ...), but HF peft's "
                         f"{method.peft_type} has no bias option")
    tensors = {}
    for p in placements:
        if p.module in copied:
            raise ValueError(f"{p.module} is both copied (modules_to_save) and given a bias delta; HF peft saves "
                             "one or the other")
        if p.placed.insertion != "parallel" or not isinstance(p.placed.compose, (Add, Scaled)):
            raise ValueError(f"the bias delta at {p.module} uses insertion '{p.placed.insertion}' / composition "
                             f"'{type(p.placed.compose).__name__.lower()}'; HF peft's bias option adds to the "
                             "module's own bias only")
        if not _has_bias(p.base):
            raise ValueError(f"the bias delta at {p.module} has no base bias to live in: HF peft's bias option "
                             "trains existing biases only")
        key = bias_key(p.module, targets)
        if key in tensors:
            raise ValueError(f"{p.module} has two bias deltas; HF peft has one trained bias per module")
        tensors[key] = (p.base.bias + p.scale * p.placed.form.bias).detach()
    modules = dict(base_named_modules(model))
    biased_targets = {m for m in targets if _has_bias(modules[m])}
    only = [p.module for p in placements]
    return (method.bias_only if set(only) == biased_targets and len(set(only)) == len(only) else "all"), tensors


__all__ = ["bias_key", "bias_specs", "copy_specs", "export_bias", "export_copies", "load_bias", "load_copy"]
