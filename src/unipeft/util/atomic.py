"""Atomic file writes: a crash never leaves a half-written file under the final name.

``write(tmp)`` fills a temporary file in the target's folder (same file system), which is then renamed over the
target with ``os.replace`` (atomic on POSIX and Windows); a folder of several files is written beside its target and
renamed into place (:func:`atomic_write_dir`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write_file(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path`` (creating the folder), then rename it to ``path``.

    The file gets the usual permissions (``0o666`` less the umask; ``mkstemp`` alone would make it private). On any
    error the temporary file is removed and ``path`` is left as it was. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    return atomic_write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON (and a final newline) to ``path`` atomically; returns ``path``.

    Raises:
        ValueError: for NaN or infinity, which JSON cannot hold (convert them first).
    """
    return atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def atomic_write_dir(target: str | os.PathLike[str], write: Callable[[Path], object]) -> None:
    """Create ``target`` by calling ``write(tmp_dir)`` on a temporary sibling folder, then renaming it into place.

    A crash at any point leaves either the old folder or the new one, never a half-written one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():  # folders inside (e.g. a nested adapter) cannot be opened as files
                with open(f, "rb") as handle:
                    os.fsync(handle.fileno())
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = ["atomic_write_file", "atomic_write_text", "atomic_write_json", "atomic_write_dir"]
