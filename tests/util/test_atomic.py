"""unipeft.util.atomic: a failed write leaves the old file intact and no temporary file behind."""

from __future__ import annotations

import json
import os

import pytest

from unipeft.util.atomic import atomic_write_file, atomic_write_json, atomic_write_text


def test_write_replaces_and_keeps_usual_permissions(tmp_path):
    path = tmp_path / "sub" / "a.json"
    atomic_write_json(path, {"x": 1})
    atomic_write_json(path, {"x": 2})
    assert json.loads(path.read_text()) == {"x": 2}
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]


def test_failed_write_leaves_the_old_file(tmp_path):
    path = atomic_write_text(tmp_path / "a.txt", "old")

    def half(tmp):
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError, match="crash mid-write"):
        atomic_write_file(path, half)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_json_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "a.json", {"x": float("nan")})
    assert not (tmp_path / "a.json").exists()
