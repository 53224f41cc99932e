"""Saving and loading adapters: ``adapter_model.safetensors`` + ``adapter_config.json``, written atomically.

The config holds the recipe, an architecture fingerprint of the base model, and the size and SHA-256 of the weights
file, so that loading onto the wrong model, or a truncated or tampered file, fails with a clear message. Only
safetensors and JSON are read: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from unipeft.core.adapted import Handle
from unipeft.core.transaction import adding
from unipeft.core.positions import model_arch_map
from unipeft.core.recipe import Recipe

from unipeft._version import __version__
from unipeft.persist.names import CONFIG_NAME, FORMAT, FORMAT_VERSION, WEIGHTS_NAME
from unipeft.util.atomic import atomic_write_dir
from unipeft.util.files import read_mapping


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """What identifies a base architecture: family, model type and the main sizes of its config."""
    config = getattr(model, "config", None)
    keys = ("model_type", "hidden_size", "d_model", "n_embd", "num_hidden_layers", "num_layers", "n_layer",
            "num_attention_heads", "intermediate_size", "vocab_size")
    out: dict[str, Any] = {"family": model_arch_map(model).family if config is not None else None}
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, (int, str)):
            out[key] = value
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_adapter(peft: Handle, path: str | os.PathLike, name: str | None = None) -> Path:
    """Save one adapter (default: the only active one) to the folder ``path``, atomically.

    Returns:
        The folder written.
    """
    if name is None:
        if len(peft.active) != 1:
            raise ValueError(f"give the adapter to save; active adapters: {', '.join(peft.active) or '(none)'}")
        name = peft.active[0]
    swapped = name in peft.merged and any(p.insertion == "replace" for _, p in peft.delta_modules(name))
    if swapped:  # a merged module copy holds the base's original weights (merging swaps them): swap back to read
        peft.unmerge(name)
    try:
        state = {k: v.detach().contiguous().cpu().clone() for k, v in peft.adapter_state_dict(name).items()}
    finally:
        if swapped:
            peft.merge(name)
    recipe = peft.recipes[name]
    records = peft.records[name]

    def write(folder: Path) -> None:
        weights = folder / WEIGHTS_NAME
        save_file(state, str(weights), metadata={"format": FORMAT})
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "unipeft_version": __version__,
            "adapter_name": name,
            "recipe": recipe.to_dict(),
            "base": fingerprint(peft.model),
            "sites": [{"module": r.site.module, "position": r.site.position, "base_shape": list(r.base_shape)}
                      for r in records],
            "weights": {"file": WEIGHTS_NAME, "bytes": weights.stat().st_size, "sha256": _sha256(weights)},
        }
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    target = Path(path)
    atomic_write_dir(target, write)
    return target


def read_folder_config(folder: Path, *, kind: str) -> dict[str, Any]:
    """The ``adapter_config.json`` of an adapter folder (unipeft's or HF peft's: the caller checks which).

    Raises:
        FileNotFoundError: if the folder or its config is missing (the message says it is not a ``kind`` folder).
        ValueError: for a config that is not a JSON mapping.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{kind} folder {folder} does not exist")
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}; is it an {kind} folder?")
    return read_mapping(folder / CONFIG_NAME, what=f"{kind} config")


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check an adapter folder's config.

    Raises:
        FileNotFoundError: if the folder or one of its two files is missing.
        ValueError: if the config is not a unipeft adapter config.
    """
    folder = Path(path)
    config = read_folder_config(folder, kind="adapter")
    config_path = folder / CONFIG_NAME
    if config.get("format") != FORMAT:
        hint = " (it looks like a Hugging Face peft adapter)" if "peft_type" in config else ""
        raise ValueError(f"{config_path} is not a unipeft adapter config{hint}")
    return config


def read_adapter(path: str | os.PathLike, model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read an adapter folder's config and tensors, checking the file's size and checksum and the base model.

    Raises:
        FileNotFoundError: for a missing folder or file.
        ValueError: if the base model does not match the one the adapter was trained on, or the weights file is
            truncated, corrupted or unreadable.
    """
    folder = Path(path)
    config = read_adapter_config(folder)
    weights = folder / config["weights"]["file"]
    if not weights.is_file():
        raise FileNotFoundError(f"adapter weights {weights} are missing")
    size = weights.stat().st_size
    if size != config["weights"]["bytes"]:
        raise ValueError(f"{weights} has {size} bytes but {config['weights']['bytes']} were saved: "
                         "the file is truncated or was replaced")
    if _sha256(weights) != config["weights"]["sha256"]:
        raise ValueError(f"{weights} does not match the checksum in {CONFIG_NAME}: the file is corrupted")
    expected, found = config["base"], fingerprint(model)
    diffs = [f"{k}: adapter {expected[k]!r} vs model {found.get(k)!r}" for k in expected if expected[k] != found.get(k)]
    if diffs:
        raise ValueError("this adapter was trained on a different base model (" + "; ".join(diffs) + ")")
    try:
        state = load_file(str(weights))
    except SafetensorError as err:
        raise ValueError(f"cannot read {weights}: {err}") from err
    return config, state


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None, *,
                 activate: bool = True) -> Handle:
    """Load an adapter saved by :func:`save_adapter` onto ``model`` (attaching it if needed).

    Raises:
        FileNotFoundError: for a missing folder or file.
        ValueError: if the base model does not match the one the adapter was trained on, or the weights file is
            truncated, corrupted or does not hold the expected tensors.
    """
    folder = Path(path)
    config, state = read_adapter(folder, model)
    name = name or config["adapter_name"]
    recipe = Recipe.from_dict(config["recipe"])
    with adding(model) as tx:
        peft = tx.handle
        peft.add(recipe, name)
        check_sites(peft, name, config["sites"])
        _resize_forms(peft, name, state)
        own = peft.adapter_state_dict(name)
        check_state(own, state, folder)
        with torch.no_grad():
            for key, tensor in own.items():
                tensor.copy_(state[key])
    if activate:
        peft.set_active(*[a for a in peft.active if a != name], name)
    return peft


def check_state(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Check that the saved tensors ``state`` (read from ``source``) have exactly the keys and shapes of ``own``.

    Raises:
        ValueError: naming the missing or unexpected tensors, or the first tensor whose shape differs.
    """
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{source} does not fit this model: missing tensors {missing[:5]}, "
                         f"unexpected tensors {unexpected[:5]}")
    for key, tensor in own.items():
        if tuple(tensor.shape) != tuple(state[key].shape):
            raise ValueError(f"tensor {key}: saved shape {tuple(state[key].shape)} but the model needs "
                             f"{tuple(tensor.shape)}")


def _resize_forms(peft: Handle, name: str, state: dict[str, torch.Tensor]) -> None:
    """Give forms whose tensor shapes depend on data (see ``Form.resize_``) the saved shapes before loading."""
    for prefix, placed in peft.state_prefixes(name):
        prefix += "form."
        placed.form.resize_({k[len(prefix):]: v.shape for k, v in state.items() if k.startswith(prefix)})


def check_sites(peft: Handle, name: str, saved: list[dict[str, Any]]) -> None:
    """Check that adapter ``name`` sits on the modules (and base weight shapes) listed in a saved config's ``sites``.

    Raises:
        ValueError: naming the first site that differs.
    """
    now = [(r.site.module, list(r.base_shape)) for r in peft.records[name]]
    then = [(s["module"], s["base_shape"]) for s in saved]
    if now != then:
        diff = next(((a, b) for a, b in zip(then, now) if a != b), (then[len(now):][:1], now[len(then):][:1]))
        raise ValueError(f"the adapter's sites do not match this model: saved {diff[0]} vs model {diff[1]}")


__all__ = ["save_adapter", "load_adapter", "read_adapter", "read_adapter_config", "fingerprint"]
