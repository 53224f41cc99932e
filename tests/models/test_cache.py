"""The atomically written, validated cache of converted models (unipeft.models.cache)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from unipeft.models import cache
from unipeft.models.cache import MANIFEST, build_cached, cache_problem, cache_root


class Writer:
    """A stand-in conversion: writes ``weights.bin`` holding ``content`` and counts its calls."""

    def __init__(self, content: bytes = b"converted") -> None:
        self.content = content
        self.calls = 0

    def __call__(self, folder: Path) -> None:
        self.calls += 1
        assert not any(folder.iterdir()), "the conversion gets an empty folder"
        (folder / "weights.bin").write_bytes(self.content)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"source v1")
    return path


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_builds_once_then_reuses(tmp_path: Path, source: Path) -> None:
    folder, write = tmp_path / "cache" / "m", Writer()
    assert cache_problem(folder, source) == "no cache entry"
    assert build_cached(folder, source, write) == folder
    assert build_cached(folder, source, write) == folder
    assert write.calls == 1
    assert cache_problem(folder, source) is None
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["source"] == str(source.resolve())
    assert manifest["size"] == len(b"source v1")
    assert manifest["files"] == {"weights.bin": len(b"converted")}
    assert leftovers(folder.parent) == []


def test_source_change_rebuilds(tmp_path: Path, source: Path) -> None:
    folder, write = tmp_path / "cache" / "m", Writer()
    build_cached(folder, source, write)
    source.write_bytes(b"source v2, longer")
    assert "source changed (size" in cache_problem(folder, source)
    build_cached(folder, source, write)
    assert write.calls == 2

    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # same size, touched
    assert "source changed (mtime_ns" in cache_problem(folder, source)
    build_cached(folder, source, write)
    assert write.calls == 3
    assert cache_problem(folder, source) is None
    assert leftovers(folder.parent) == []


def test_failed_conversion_leaves_nothing(tmp_path: Path, source: Path) -> None:
    folder = tmp_path / "cache" / "m"

    def crash(tmp: Path) -> None:
        (tmp / "weights.bin").write_bytes(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="mid-write"):
        build_cached(folder, source, crash)
    assert not folder.exists()
    assert list(folder.parent.iterdir()) == []


def test_entry_without_manifest_or_with_changed_files_is_rebuilt(tmp_path: Path, source: Path) -> None:
    folder, write = tmp_path / "cache" / "m", Writer()
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_bytes(b"half-written by hand")
    assert cache_problem(folder, source) == "entry has no manifest"
    build_cached(folder, source, write)
    assert (folder / "weights.bin").read_bytes() == b"converted"

    (folder / "weights.bin").write_bytes(b"trunc")
    assert cache_problem(folder, source) == "entry's files differ from its manifest"
    build_cached(folder, source, write)
    assert write.calls == 2 and (folder / "weights.bin").read_bytes() == b"converted"

    (folder / MANIFEST).write_text("{not json")
    assert cache_problem(folder, source).startswith("unreadable manifest")
    assert leftovers(folder.parent) == []


def test_temporary_folders_are_never_used_and_stale_ones_are_removed(tmp_path: Path, source: Path) -> None:
    parent = tmp_path / "cache"
    fresh, stale = parent / ".m.tmp-fresh", parent / ".m.tmp-stale"
    for tmp in (fresh, stale):
        tmp.mkdir(parents=True)
        (tmp / "weights.bin").write_bytes(b"partial")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    write = Writer()
    build_cached(parent / "m", source, write)
    assert write.calls == 1  # a sibling temporary folder is not an entry
    assert fresh.exists()  # may belong to a running conversion
    assert not stale.exists()


def test_concurrent_install_keeps_the_valid_entry(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "cache" / "m"
    real_rename = os.rename

    def racing_rename(src: os.PathLike[str], dst: os.PathLike[str]) -> None:
        # Another process installs its own complete entry just before our rename.
        monkeypatch.setattr(cache.os, "rename", real_rename)
        build_cached(folder, source, Writer(b"theirs"))
        real_rename(src, dst)

    monkeypatch.setattr(cache.os, "rename", racing_rename)
    build_cached(folder, source, Writer(b"ours"))
    assert (folder / "weights.bin").read_bytes() == b"theirs"
    assert cache_problem(folder, source) is None
    assert leftovers(folder.parent) == []


def test_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(cache.CACHE_ENV, raising=False)
    assert cache_root() == Path.home() / ".cache" / "unipeft" / "models"
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "explicit") == tmp_path / "explicit"
