"""The adapters a server holds: load on demand from one allowed folder, a memory budget, least-recently-used eviction.

Loading goes through the public API (``unipeft.from_pretrained``: unipeft's or HF peft's format, safetensors and JSON
only, checked against the base); nothing outside ``adapter_dir`` is ever opened: a path is resolved (symlinks and
``..`` included) and must lie inside it. At most ``max_resident`` adapters are held; loading one more evicts the least
recently used adapter that is neither pinned (the startup adapters) nor in use by a running sequence. An evicted
adapter found under ``adapter_dir`` is loaded again on its next request. All methods run on the engine's thread, between
decoding steps, so the model is never changed under a forward pass.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import unipeft
from unipeft.peft import Peft
from unipeft.persist.names import CONFIG_NAME, WEIGHTS_NAME

log = logging.getLogger(__name__)


class AdapterError(ValueError):
    """A request about an adapter that cannot be served; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, param: str | None = "model") -> None:
        super().__init__(message)
        self.status = status
        self.param = param


@dataclass
class Entry:
    """One resident adapter."""

    name: str
    path: str
    pinned: bool
    last_used: float
    in_use: int = 0


class AdapterRegistry:
    """The adapters of one server (see the module docstring)."""

    def __init__(self, peft: Peft, *, adapter_dir: str | None, max_resident: int) -> None:
        self.peft = peft
        self.adapter_dir = Path(adapter_dir).resolve() if adapter_dir else None
        self.max_resident = max_resident
        self.entries: dict[str, Entry] = {}
        self.loads = 0
        self.evictions = 0

    # ------------------------------------------------------------------------------------------------ paths
    def resolve(self, path: str, *, allow_anywhere: bool = False) -> Path:
        """The adapter folder ``path`` names (relative paths are inside ``adapter_dir``), checked.

        Raises:
            AdapterError: for a path outside ``adapter_dir`` (403), or a folder that is not an adapter (400).
        """
        candidate = Path(path)
        if not allow_anywhere:
            if self.adapter_dir is None:
                raise AdapterError("this server loads no adapters at run time (start it with --adapter-dir)", 403,
                                   "lora_path")
            candidate = (self.adapter_dir / candidate) if not candidate.is_absolute() else candidate
            resolved = candidate.resolve()
            if resolved != self.adapter_dir and self.adapter_dir not in resolved.parents:
                raise AdapterError(f"adapter path {path!r} is outside the adapter directory", 403, "lora_path")
        else:
            resolved = candidate.resolve()
        if not (resolved / CONFIG_NAME).is_file() or not (resolved / WEIGHTS_NAME).is_file():
            raise AdapterError(f"adapter path {path!r} holds no adapter ({CONFIG_NAME} + {WEIGHTS_NAME})", 400,
                               "lora_path")
        return resolved

    def findable(self, name: str) -> Path | None:
        """The folder of adapter ``name`` under ``adapter_dir`` (a subfolder of that name), if there is one."""
        if self.adapter_dir is None or not name or "/" in name or "\\" in name or name.startswith("."):
            return None
        try:
            return self.resolve(name)
        except AdapterError:
            return None

    # ------------------------------------------------------------------------------------------------ lifecycle
    def load(self, name: str, path: str, *, pinned: bool = False, allow_anywhere: bool = False) -> Entry:
        """Load the adapter at ``path`` as ``name`` (evicting if the budget is full).

        Raises:
            AdapterError: for a name already loaded (400), a bad path (403/400), no room (507: every resident
                adapter is pinned or in use), or an adapter the base or the mixed batch cannot take (400).
        """
        if name in self.entries:
            raise AdapterError(f"adapter {name!r} is already loaded", 400, "lora_name")
        folder = self.resolve(path, allow_anywhere=allow_anywhere)
        self._make_room()
        try:
            unipeft.from_pretrained(self.peft.model, folder, adapter_name=name, activate=False)
            self.peft.mixed_batch([name])  # refuses forms that cannot run per row, naming them
        except (ValueError, OSError, NotImplementedError) as err:
            if name in self.peft.recipes:
                self.peft.remove(name)
            raise AdapterError(f"cannot serve adapter {name!r} from {path!r}: {err}", 400, "lora_path") from err
        entry = self.entries[name] = Entry(name=name, path=str(folder), pinned=pinned, last_used=time.monotonic())
        self.loads += 1
        log.info("loaded adapter %s from %s", name, folder)
        return entry

    def unload(self, name: str) -> None:
        """Remove adapter ``name`` (refused while a running sequence uses it).

        Raises:
            AdapterError: for an unknown adapter (404) or one in use (409).
        """
        entry = self.get(name)
        if entry.in_use:
            raise AdapterError(f"adapter {name!r} is in use by {entry.in_use} running sequence(s); retry", 409)
        self.peft.remove(name)
        del self.entries[name]
        log.info("unloaded adapter %s", name)

    def acquire(self, name: str | None) -> None:
        """Mark ``name`` (None: the base) used by one more running sequence, loading it on demand if evicted.

        Raises:
            AdapterError: 404 for a name that is neither loaded nor under ``adapter_dir`` (listing the loaded ones).
        """
        if name is None:
            return
        if name not in self.entries:
            folder = self.findable(name)
            if folder is None:
                raise AdapterError(f"the model {name!r} does not exist; loaded: {', '.join(self.names()) or '-'} (and "
                                   "the base, by its name)", 404)
            self.load(name, str(folder))
        entry = self.entries[name]
        entry.in_use += 1
        entry.last_used = time.monotonic()

    def release(self, name: str | None) -> None:
        """One running sequence of ``name`` ended."""
        if name is not None and name in self.entries:
            self.entries[name].in_use -= 1

    def get(self, name: str) -> Entry:
        if name not in self.entries:
            raise AdapterError(f"the model {name!r} does not exist; loaded: {', '.join(self.names()) or '-'}", 404)
        return self.entries[name]

    def names(self) -> list[str]:
        return list(self.entries)

    def _make_room(self) -> None:
        while len(self.entries) >= self.max_resident:
            idle = [e for e in self.entries.values() if not e.pinned and e.in_use == 0]
            if not idle:
                raise AdapterError(f"no room for another adapter: all {len(self.entries)} resident adapters are pinned "
                                   f"or in use (max_resident={self.max_resident})", 507)
            victim = min(idle, key=lambda e: e.last_used)
            self.peft.remove(victim.name)
            del self.entries[victim.name]
            self.evictions += 1
            log.info("evicted adapter %s (least recently used)", victim.name)


__all__ = ["AdapterRegistry", "AdapterError", "Entry"]
