"""``save_pretrained`` / ``from_pretrained``: transformers-style adapter folders, in unipeft's or HF peft's format.

    peft.save_pretrained("out/")                         # the active adapter(s), unipeft format
    peft.save_pretrained("out-hf/", format="hf")         # loads with peft.PeftModel.from_pretrained(base, "out-hf/")
    peft = unipeft.from_pretrained(base_model, "out/")   # either format, detected from adapter_config.json

Layout: one adapter is saved at the folder's root (``adapter_config.json`` + ``adapter_model.safetensors``); several
are saved in ``<folder>/<name>/`` each, with ``unipeft_adapters.json`` listing them and the ones that were active.
Unlike :func:`unipeft.save_adapter`, the folder itself is not replaced — it may hold other files (a Trainer
checkpoint, a tokenizer) — so files are written atomically one by one, the weights before the config that holds
their checksum: an interrupted save fails loudly at load time, never silently.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from torch import nn

from unipeft.core.transaction import adding
from unipeft.util.atomic import atomic_write_json
from unipeft.persist.names import CONFIG_NAME, FORMAT, INDEX_NAME, WEIGHTS_NAME

if TYPE_CHECKING:
    from unipeft.core.adapted import Handle

Format = Literal["unipeft", "hf"]
FORMATS: tuple[str, ...] = ("unipeft", "hf")


def _write_into(folder: Path, write: Callable[[Path], object]) -> None:
    """Run ``write(tmp)`` on a fresh temporary folder next to ``folder``, then move its files into ``folder`` one by
    one (each ``os.replace`` is atomic), config last; other files in ``folder`` are left alone."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unipeft-save-", dir=folder))
    try:
        staged = tmp / "adapter"
        write(staged)  # the savers write a whole folder atomically; it lands here
        files = sorted((f for f in staged.iterdir() if f.is_file()), key=lambda f: f.name == CONFIG_NAME)
        for f in files:
            os.replace(f, folder / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_one(peft: Handle, folder: Path, name: str, format: Format) -> None:
    if format == "hf":
        from unipeft.interop import save_hf_adapter

        _write_into(folder, lambda staged: save_hf_adapter(peft, staged, name))
    else:
        from unipeft.persist.io import save_adapter

        _write_into(folder, lambda staged: save_adapter(peft, staged, name))


def save_pretrained(peft: Handle, directory: str | os.PathLike, adapters: Sequence[str] | None = None, *,
                    format: Format = "unipeft") -> Path:
    """Save adapters (default: the active ones) to ``directory`` (see the module docstring for the layout).

    Args:
        peft: the handle.
        directory: the folder (created if needed; other files in it are kept).
        adapters: names of the adapters to save.
        format: ``unipeft`` (any adapter) or ``hf`` (HF peft's format, for the methods it has).

    Returns:
        The folder.

    Raises:
        ValueError: for an unknown format or adapter name, no adapter to save, or (``hf``) an adapter HF peft's
            format cannot represent.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; valid: {', '.join(FORMATS)}")
    names = list(adapters) if adapters is not None else list(peft.active)
    if not names:
        raise ValueError(f"no adapter to save: none is active; name them (existing: {', '.join(peft.recipes) or '-'})")
    for name in names:
        if name not in peft.recipes:
            raise ValueError(f"unknown adapter '{name}'; existing adapters: {', '.join(peft.recipes) or '(none)'}")
    folder = Path(directory)
    if len(names) == 1:
        _save_one(peft, folder, names[0], format)
        (folder / INDEX_NAME).unlink(missing_ok=True)  # a stale index would hide the adapter at the root
        return folder
    for name in names:
        _save_one(peft, folder / name, name, format)
    for stale in (CONFIG_NAME, WEIGHTS_NAME):  # a stale root adapter would be loaded instead of the index
        (folder / stale).unlink(missing_ok=True)
    atomic_write_json(folder / INDEX_NAME, {"format": format, "adapters": names,
                                      "active": [n for n in peft.active if n in names]})
    return folder


def _config_format(folder: Path) -> Format:
    try:
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{folder / CONFIG_NAME} is not valid JSON ({err})") from err
    if config.get("format") == FORMAT:
        return "unipeft"
    if "peft_type" in config:
        return "hf"
    raise ValueError(f"{folder / CONFIG_NAME} is neither a unipeft nor an HF peft adapter config")


def _load_one(model: nn.Module, folder: Path, name: str | None, activate: bool) -> Handle:
    if _config_format(folder) == "hf":
        from unipeft.interop import load_hf_adapter

        return load_hf_adapter(model, folder, name, activate=activate)
    from unipeft.persist.io import load_adapter

    return load_adapter(model, folder, name, activate=activate)


def from_pretrained(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None, *,
                    activate: bool = True) -> Handle:
    """Load the adapter(s) saved by :func:`save_pretrained` (or by HF peft) onto ``model``.

    Args:
        model: the base model (plain, or with unipeft adapters already attached: the new ones join them).
        directory: a folder with ``adapter_config.json`` (unipeft or HF peft format), or with ``unipeft_adapters.json``.
        adapter_name: the name to give a single adapter (default: its saved name; ``default`` for HF peft); for a
            folder of several, load only this one.
        activate: make the loaded adapters active (for several: the ones that were active when saved), after the
            ones already active. Active adapters train: their parameters require grad.

    Returns:
        The model's :class:`unipeft.Peft` handle.

    Raises:
        FileNotFoundError: if the folder holds no adapter.
        ValueError: for a config of neither format, an unknown ``adapter_name``, or an adapter that does not fit
            ``model`` (see :func:`unipeft.load_adapter`).
    """
    folder = Path(directory)
    if (folder / CONFIG_NAME).is_file():
        return _load_one(model, folder, adapter_name, activate)
    if not (folder / INDEX_NAME).is_file():
        raise FileNotFoundError(f"{folder} holds no adapter: expected {CONFIG_NAME} (one adapter) or {INDEX_NAME} "
                                "(several), as written by Handle.save_pretrained")
    index = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8"))
    names = list(index["adapters"])
    if adapter_name is not None:
        if adapter_name not in names:
            raise ValueError(f"{folder} has no adapter '{adapter_name}'; it has: {', '.join(names)}")
        return _load_one(model, folder / adapter_name, adapter_name, activate)
    with adding(model):  # all or nothing
        for name in names:
            peft = _load_one(model, folder / name, name, activate=False)
    if activate:
        peft.set_active(*[a for a in peft.active if a not in names], *index.get("active", []))
    return peft


__all__ = ["FORMATS", "INDEX_NAME", "from_pretrained", "save_pretrained"]
