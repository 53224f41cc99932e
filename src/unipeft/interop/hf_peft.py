"""Reading and writing Hugging Face peft adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``).

    peft = unipeft.interop.load_hf_adapter(model, "path/to/hf_adapter")      # an adapter trained with HF peft
    unipeft.interop.save_hf_adapter(peft, "out/")                              # loads with PeftModel.from_pretrained

The method-specific parts are small mappings registered per ``peft_type`` (``hf_lora.py``, ``hf_ia3.py``, ...; see
:mod:`unipeft.interop.hf_method`); ``modules_to_save`` and ``bias`` are shared (:mod:`unipeft.interop.hf_extras`).
Whatever one format can express and the other cannot is refused with a message naming it, never dropped: an HF
option unipeft does not reproduce, a unipeft form HF peft has no method for, a tensor in the file nothing reads.
Only safetensors and JSON are read: nothing is unpickled.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import pkgutil
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from unipeft.core.adapted import Handle, site_base
from unipeft.core.transaction import adding
from unipeft.persist.io import read_folder_config
from unipeft.persist.names import CONFIG_NAME, FORMAT, WEIGHTS_NAME
from unipeft.util.atomic import atomic_write_dir
from unipeft.core.recipe import Recipe
from unipeft.interop.hf_extras import (bias_specs, copy_specs, export_bias, export_copies, load_bias, load_copy)
from unipeft.interop.hf_match import in_modules_to_save
from unipeft.interop.hf_method import HFMethod, Placement, TensorPool, hf_methods, method_for_form, method_for_peft_type

log = logging.getLogger(__name__)

PICKLE_NAME = "adapter_model.bin"
#: Prefixes of HF peft's tensor keys: module tensors of tuner methods (PeftModel → tuner → transformers model), and
#: tensors of the tuner itself (VeRA's shared projections) or, for prompt learning, of the transformers model.
PREFIX = "base_model.model."
TUNER_PREFIX = "base_model."
#: The per-method mapping modules; each registers itself. A new method is one new file and one entry here.
#: Why some unipeft forms have no HF peft counterpart, for the refusal message.
NO_EQUIVALENT = {
    "bottleneck": "HF peft has no bottleneck adapter method (Houlsby, Pfeiffer, parallel adapters live in the "
                  "separate `adapters` library)",
    "mh_adapter": "HF peft has no multi-head parallel adapter method",
    "compacter": "HF peft has no Compacter (Kronecker-factored bottleneck adapter) method",
    "ssf": "HF peft has no SSF (scale-and-shift) method",
    "diff_prune": "HF peft has no diff-pruning method",
    "fishmask": "HF peft has no FishMask (sparse Fisher-mask) method",
}


def _register_methods() -> None:
    """Import every ``hf_*`` module of this package: the method mappings register themselves with
    ``register_hf_method`` (as the methods do with ``register_form``), so a new mapping is one new file."""
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        module = info.name
        if not module.startswith("hf_") or f"unipeft.interop.{module}" == __name__:
            continue
        try:
            importlib.import_module(f"unipeft.interop.{module}")
        except ModuleNotFoundError as err:  # the unipeft form of this method is not in this installation
            if not (err.name or "").startswith("unipeft.methods."):
                raise
            log.debug("HF peft mapping %s unavailable: %s", module, err)


_register_methods()


def supported_peft_types() -> list[str]:
    """The HF ``peft_type`` s this installation converts, both ways."""
    return sorted(hf_methods())


# ------------------------------------------------------------------------------------------------ reading
def read_hf_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config and tensors of an HF peft adapter folder (tensor keys without ``base_model.model.``).

    Raises:
        FileNotFoundError: if the folder, its config or its safetensors file is missing.
        ValueError: for a config that is not an HF peft config, a pickle-only adapter or an unreadable file.
    """
    folder = Path(path)
    config = read_folder_config(folder, kind="HF peft adapter")
    config_path = folder / CONFIG_NAME
    if config.get("format") == FORMAT:
        raise ValueError(f"{folder} is a unipeft adapter, not an HF peft one; load it with unipeft.load_adapter")
    if "peft_type" not in config:
        raise ValueError(f"{config_path} has no peft_type: it is not an HF peft adapter config")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        if (folder / PICKLE_NAME).is_file():
            raise ValueError(f"{folder} holds only {PICKLE_NAME}, a pickle; unipeft never unpickles files. Convert "
                             f"it to {WEIGHTS_NAME} with a trusted tool first")
        raise FileNotFoundError(f"{folder} has no {WEIGHTS_NAME}")
    try:
        tensors = load_file(str(weights))
    except SafetensorError as err:
        raise ValueError(f"cannot read {weights}: {err}") from err
    return config, {_strip(k): v for k, v in tensors.items()}


def _strip(key: str) -> str:
    return key[len(PREFIX):] if key.startswith(PREFIX) else key.removeprefix(TUNER_PREFIX)


def hf_config_to_recipe(config: Mapping[str, Any], model: nn.Module) -> Recipe:
    """The unipeft recipe of an HF peft adapter config on ``model`` (module names resolve against this model).

    Raises:
        NotImplementedError: for a peft_type unipeft does not convert (the message lists the supported ones).
        ValueError: for an option unipeft cannot represent (the message names it), or targets matching nothing.
    """
    peft_type = config.get("peft_type")
    if not peft_type:
        raise ValueError("the config has no peft_type: it is not an HF peft adapter config")
    method = method_for_peft_type(str(peft_type))
    method.check_config(config)
    specs = method.to_specs(config, model)
    copies, copied = copy_specs(config, model)
    specs += copies
    if not method.prompt_learning:
        specs += bias_specs(config, model, method, method.targets(config, model), copied)
    return Recipe(name=f"hf_{str(peft_type).lower()}", family=method.family, paper=method.paper,
                  description=f"converted from a Hugging Face peft {peft_type} adapter", deltas=tuple(specs))


def adapter_placements(peft: Handle, name: str) -> list[Placement]:
    """Every placed delta of adapter ``name`` with its base module, in the order the adapter was added."""
    return [Placement(placed=placed, base=site_base(peft, placed.site.module)) for placed in peft.records[name]]


def load_hf_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None, *,
                    activate: bool = True) -> Handle:
    """Load an adapter saved by HF peft onto ``model`` (attaching unipeft if needed) as adapter ``name``.

    Args:
        model: the base model the adapter was trained on.
        path: the HF adapter folder.
        name: the adapter's name in unipeft (default ``default``).
        activate: make it active (added to the active adapters).

    Raises:
        FileNotFoundError: for a missing folder or file.
        NotImplementedError: for a peft_type unipeft does not convert.
        ValueError: for an unsupported option, a tensor that does not fit, or a tensor nothing reads.
    """
    config, tensors = read_hf_adapter(path)
    recipe = hf_config_to_recipe(config, model)
    method = method_for_peft_type(config["peft_type"])
    targets = [] if method.prompt_learning else method.targets(config, model)
    name = name or "default"
    with adding(model) as tx:
        peft = tx.handle
        peft.add(recipe, name)
        pool = TensorPool(tensors, str(Path(path) / WEIGHTS_NAME), config)
        placements = adapter_placements(peft, name)
        method.begin_load([p for p in placements if p.form_type not in ("copy", "bias")], pool)
        for p in placements:
            if p.form_type == "copy":
                load_copy(p, pool)
            elif p.form_type == "bias":
                load_bias(p, pool, targets)
            else:
                method.load(p, pool)
        _take_unchanged_base(pool, peft)
        left = pool.left()
        if left:
            raise ValueError(f"{pool.source} holds tensors that nothing in this {config['peft_type']} conversion "
                             f"reads: {left[:5]}{' ...' if len(left) > 5 else ''}")
    if activate:
        peft.set_active(*[a for a in peft.active if a != name], name)
    log.info("loaded HF peft %s adapter %s as '%s'", config["peft_type"], path, name)
    return peft


def _take_unchanged_base(pool: TensorPool, peft: Handle) -> None:
    """Accept base weights HF saved alongside (``save_embedding_layers``) if they equal the model's; refuse others."""
    base = peft.base_state_dict()
    for key in pool.left():
        original = key.replace(".base_layer.", ".")
        if original not in base:
            continue
        if not torch.equal(pool.tensors[key], base[original]):
            raise ValueError(f"{pool.source} carries a changed base weight {key!r} (HF peft's save_embedding_layers, "
                             "e.g. after resizing the vocabulary); unipeft adapters do not replace base weights")
        pool.take(key)


# ------------------------------------------------------------------------------------------------ writing
def _method_of(recipe: Recipe) -> HFMethod:
    """The one HF method a recipe's forms map to (pure: looks at form types only).

    Raises:
        ValueError: for a form HF peft has no method for, a full fine-tuning recipe, or several methods.
    """
    if recipe.train_base:
        raise ValueError(f"recipe '{recipe.name}' trains the whole base model (full fine-tuning); HF peft's adapter "
                         "format cannot hold it")
    found: dict[str, HFMethod] = {}
    for spec in recipe.deltas:
        form = spec.form.type
        if form in ("copy", "bias"):
            continue
        method = method_for_form(form)
        if method is None:
            reason = NO_EQUIVALENT.get(form, "unipeft has no mapping of it to an HF peft method")
            forms = sorted(f for m in hf_methods().values() for f in m.forms)
            raise ValueError(f"form '{form}' of recipe '{recipe.name}' cannot be saved in HF peft's format: {reason}; "
                             f"forms that can: {', '.join(forms)} (plus copy → modules_to_save, bias → bias). "
                             "Save it with unipeft.save_adapter instead")
        found[method.peft_type] = method
    if not found:
        raise ValueError(f"recipe '{recipe.name}' has only copy/bias deltas; HF peft stores modules_to_save and "
                         "trained biases only alongside a method such as LoRA")
    if len(found) > 1:
        raise ValueError(f"recipe '{recipe.name}' combines {', '.join(sorted(found))}; an HF peft adapter holds one "
                         "method — save each part as its own adapter")
    return next(iter(found.values()))


def export_hf_adapter(peft: Handle, name: str, recipe: Recipe | None = None) -> tuple[dict[str, Any],
                                                                                    dict[str, torch.Tensor]]:
    """The HF config and tensors (keys as HF saves them) of adapter ``name``.

    Raises:
        ValueError: for anything HF peft's format cannot represent (the message says what and why).
    """
    recipe = recipe or peft.recipes[name]
    method = _method_of(recipe)
    placements = adapter_placements(peft, name)
    copies = [p for p in placements if p.form_type == "copy"]
    biases = [p for p in placements if p.form_type == "bias"]
    main = [p for p in placements if p.form_type not in ("copy", "bias")]
    modules_to_save, copy_tensors = export_copies(copies, peft.model)
    inside = [p.module for p in main if in_modules_to_save(p.module, modules_to_save)]
    if inside:
        raise ValueError(f"{inside[0]} has a {method.peft_type} delta inside a copied module; HF peft never puts an "
                         "adapter inside a modules_to_save module")
    exported = method.export(main, peft.model, modules_to_save=modules_to_save)
    copied = [p.module for p in copies]
    bias, bias_tensors = export_bias(biases, peft.model, method, exported.targets, copied)
    config: dict[str, Any] = {
        "peft_type": method.peft_type,
        "task_type": None,
        "base_model_name_or_path": getattr(getattr(peft.model, "config", None), "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        **exported.config,
        "modules_to_save": modules_to_save,
    }
    if method.bias_only:
        config["bias"] = bias
    module_prefix, shared_prefix = (TUNER_PREFIX, "") if method.prompt_learning else (PREFIX, TUNER_PREFIX)
    tensors = {**{module_prefix + k: v for k, v in {**exported.tensors, **copy_tensors, **bias_tensors}.items()},
               **{shared_prefix + k: v for k, v in exported.shared.items()}}
    return config, {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def recipe_to_hf_config(recipe: Recipe, peft: Handle, name: str) -> dict[str, Any]:
    """The HF ``adapter_config.json`` content for adapter ``name`` of ``peft`` (built from ``recipe``).

    Raises:
        ValueError: for anything HF peft's format cannot represent.
    """
    return export_hf_adapter(peft, name, recipe)[0]


def save_hf_adapter(peft: Handle, path: str | os.PathLike, name: str | None = None) -> Path:
    """Save adapter ``name`` (default: the only active one) as an HF peft adapter folder, atomically.

    ``PeftModel.from_pretrained(base_model, path)`` then computes the same outputs as unipeft.

    Raises:
        ValueError: for anything HF peft's format cannot represent (nothing is written then).
    """
    if name is None:
        if len(peft.active) != 1:
            raise ValueError(f"give the adapter to save; active adapters: {', '.join(peft.active) or '(none)'}")
        name = peft.active[0]
    if name not in peft.recipes:
        raise ValueError(f"unknown adapter '{name}'; existing adapters: {', '.join(peft.recipes) or '(none)'}")
    config, tensors = export_hf_adapter(peft, name)

    def write(folder: Path) -> None:
        save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    target = Path(path)
    atomic_write_dir(target, write)
    return target


__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "adapter_placements", "export_hf_adapter", "hf_config_to_recipe",
           "load_hf_adapter", "read_hf_adapter", "recipe_to_hf_config", "save_hf_adapter", "supported_peft_types"]
