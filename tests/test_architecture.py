"""The layering contract (pyproject's [tool.importlinter], docs/architecture.md): import-linter finds no import from a
lower layer into a higher one — and it does find one when a core module imports a layer above it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(source_root: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(source_root))
    return subprocess.run([str(LINT), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_layers_run_one_way():
    result = _lint(ROOT / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    shutil.copytree(ROOT / "src" / "unipeft", tmp_path / "unipeft", ignore=shutil.ignore_patterns("__pycache__"))
    delta = tmp_path / "unipeft" / "core" / "delta.py"
    delta.write_text(delta.read_text() + "\n\ndef _upward():\n    from unipeft.ops import combine  # noqa\n")
    result = _lint(tmp_path)
    assert result.returncode != 0 and "BROKEN" in result.stdout
    assert "unipeft.core.delta -> unipeft.ops.combine" in result.stdout
