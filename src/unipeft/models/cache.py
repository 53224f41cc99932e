"""A local, atomically written cache of model folders converted from some source file.

A cache entry is a folder ``<root>/<name>`` holding a converted model plus a manifest
(``unipeft-cache.json``) that records the source file's path, size and modification time and the
size of every file in the entry. An entry is used only when the manifest matches both the source
and the folder's contents; otherwise it is rebuilt.

Entries are built in a temporary sibling folder (``.<name>.tmp-*``) and renamed into place in one
step, so a reader sees either no entry or a complete one, never a half-written folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import transformers

logger = logging.getLogger(__name__)

CACHE_ENV = "UNIPEFT_CACHE"
"""Environment variable naming the cache root (default ``~/.cache/unipeft/models``)."""

MANIFEST = "unipeft-cache.json"
CACHE_FORMAT = 1  # bump to invalidate every existing entry
_STALE_TMP_SECONDS = 3600  # temporary folders older than this are left over from a crash


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache root: ``cache_dir`` if given, else ``$UNIPEFT_CACHE``, else ``~/.cache/unipeft/models``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "unipeft" / "models"


def _fingerprint(source: Path) -> dict[str, object]:
    stat = source.stat()
    return {
        "format": CACHE_FORMAT,
        "source": str(source.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
    }


def _file_sizes(folder: Path) -> dict[str, int]:
    return {
        str(path.relative_to(folder)): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def cache_problem(folder: Path, source: Path) -> str | None:
    """Why the entry ``folder`` cannot serve ``source``, or ``None`` if it is valid."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return "no cache entry" if not folder.exists() else "entry has no manifest"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        return f"unreadable manifest ({error})"
    expected = _fingerprint(source)
    for key, value in expected.items():
        if manifest.get(key) != value:
            return f"source changed ({key}: cached {manifest.get(key)!r}, now {value!r})"
    if manifest.get("files") != _file_sizes(folder):
        return "entry's files differ from its manifest"
    return None


def _remove_stale_tmp(parent: Path, name: str) -> None:
    now = time.time()
    for path in parent.glob(f".{name}.*-*"):
        try:
            if now - path.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(path, ignore_errors=True)
        except FileNotFoundError:  # another process removed it first
            pass


def build_cached(folder: Path, source: Path, write: Callable[[Path], object]) -> Path:
    """Return the cache entry ``folder`` for ``source``, building it with ``write`` if needed.

    ``write(tmp)`` must fill the empty folder ``tmp`` with the converted model. The manifest is
    added after it returns, and ``tmp`` is then renamed to ``folder`` in one step; an existing
    invalid entry is moved aside first. If another process installs a valid entry meanwhile,
    that one is kept.

    Raises:
        FileNotFoundError: if ``source`` does not exist.
        Whatever ``write`` raises; the temporary folder is removed and no entry is left.
    """
    problem = cache_problem(folder, source)
    if problem is None:
        return folder
    logger.info("building cache entry %s for %s: %s", folder, source, problem)
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(parent, folder.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=parent))
    try:
        write(tmp)
        manifest = {**_fingerprint(source), "transformers": transformers.__version__, "files": _file_sizes(tmp)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; an entry is readable like any cache folder
        _install(tmp, folder, source)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a no-op once renamed into place
    return folder


def _install(tmp: Path, folder: Path, source: Path) -> None:
    """Rename the complete folder ``tmp`` to ``folder``, replacing an invalid entry."""
    if folder.exists() or folder.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
        try:
            os.replace(folder, old / "entry")
        except FileNotFoundError:  # another process moved it first
            pass
    else:
        old = None
    try:
        os.rename(tmp, folder)
    except OSError:
        # Another process installed an entry between our move and rename; keep it if valid.
        if cache_problem(folder, source) is not None:
            raise
        logger.info("another process installed %s first; using it", folder)
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
