"""Where the datasets live, and reading their gzip JSON Lines files.

The data directory holds one folder per dataset and one ``<split>.jsonl.gz`` file per split
(``glue/sst2/validation.jsonl.gz``). It is found, in order, from an explicit argument (the CLI's
``--data-dir``), the ``UNIPEFT_DATA_DIR`` environment variable, or the first existing default
location (``../shared/data`` next to the working directory or the repository). Users without a local
copy but with the Hugging Face ``datasets`` package and a network get the same tasks from the hub.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "UNIPEFT_DATA_DIR"

# Local folder -> (hub dataset path, hub config or None). The hub copies use the same field names and
# label conventions as the local files. The hub Alpaca set is the full 52k-row file, not the 5k sample.
HUB_NAMES: dict[str, tuple[str, str | None]] = {
    "glue/sst2": ("nyu-mll/glue", "sst2"),
    "glue/cola": ("nyu-mll/glue", "cola"),
    "glue/mrpc": ("nyu-mll/glue", "mrpc"),
    "glue/rte": ("nyu-mll/glue", "rte"),
    "glue/stsb": ("nyu-mll/glue", "stsb"),
    "instruct/alpaca_5k": ("tatsu-lab/alpaca", None),
}


def default_data_dirs() -> list[Path]:
    """The default data directories, in the order they are tried.

    Returns:
        ``cwd/../shared/data``, ``<repository>/../shared/data`` (the repository being the folder that
        holds ``src/unipeft``), and ``cwd/shared/data``.
    """
    repo_root = Path(__file__).resolve().parents[3]
    return [
        Path.cwd() / ".." / "shared" / "data",
        repo_root.parent / "shared" / "data",
        Path.cwd() / "shared" / "data",
    ]


def resolve_data_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Find the data directory.

    Order: ``explicit`` > the ``UNIPEFT_DATA_DIR`` environment variable > the first existing entry
    of :func:`default_data_dirs`. An explicit directory or environment variable that does not exist
    is an error rather than being skipped, so a typo never silently reads other data.

    Args:
        explicit: a directory given by the caller (e.g. ``--data-dir``), or ``None``.

    Returns:
        The data directory, resolved to an absolute path.

    Raises:
        FileNotFoundError: the chosen directory does not exist, or no default location exists
            (the message lists every place tried).
    """
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"data directory {str(path)!r} (given explicitly) does not exist")
        return path.resolve()
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"data directory {str(path)!r} (from ${DATA_DIR_ENV}) does not exist")
        return path.resolve()
    tried = default_data_dirs()
    for path in tried:
        if path.is_dir():
            return path.resolve()
    places = ", ".join(repr(str(p)) for p in tried)
    raise FileNotFoundError(
        f"no data directory found; tried {places}. Set ${DATA_DIR_ENV} or pass --data-dir "
        "to point at a folder holding <task>/<split>.jsonl.gz files"
    )


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSON Lines file (plain ``.jsonl`` or gzip ``.jsonl.gz``, UTF-8) into a list of dicts.

    Blank lines are skipped.

    Args:
        path: the file.

    Returns:
        One dict per non-blank line, in file order.

    Raises:
        FileNotFoundError: the file does not exist (the message names it).
        ValueError: a line is not valid JSON or not a JSON object (the message names the line number).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file {str(path)!r} does not exist")
    opener = gzip.open if path.name.endswith(".gz") else open
    rows: list[dict[str, Any]] = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise ValueError(f"{path}: line {lineno} is a JSON {type(row).__name__}, expected an object")
            rows.append(row)
    return rows


def _datasets_available() -> bool:
    """Whether the Hugging Face ``datasets`` package can be imported."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        return False
    return True


def _load_from_hub(task_folder: str, split: str) -> list[dict[str, Any]]:
    """Load one split of a known task from the Hugging Face hub (needs ``datasets`` and a network)."""
    import datasets

    hub_path, config = HUB_NAMES[task_folder]
    logger.info("loading %s split %r from the Hugging Face hub (%s, %s)", task_folder, split, hub_path, config)
    ds = datasets.load_dataset(hub_path, config, split=split)
    return [dict(row) for row in ds]


def available_splits(folder: Path) -> list[str]:
    """The split names present in a dataset folder (``train``, ``validation``, ...), sorted."""
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(".jsonl.gz")] for p in folder.glob("*.jsonl.gz"))


def load_split(
    task_folder: str,
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
) -> list[dict[str, Any]]:
    """Read ``<data_dir>/<task_folder>/<split>.jsonl.gz``.

    If no data directory can be found (none given, no environment variable, no default location)
    and the ``datasets`` package is importable and ``task_folder`` has a hub name in
    :data:`HUB_NAMES`, the split is loaded from the Hugging Face hub instead.

    Args:
        task_folder: the dataset folder relative to the data directory, e.g. ``"glue/sst2"``.
        split: the split name, e.g. ``"train"`` or ``"validation"``.
        data_dir: the data directory; ``None`` resolves it with :func:`resolve_data_dir`.

    Returns:
        The rows as dicts, in file order.

    Raises:
        FileNotFoundError: no data directory and no usable hub fallback, or the split file is missing
            (the message names the file and the splits that do exist).
    """
    explicit = data_dir is not None or bool(os.environ.get(DATA_DIR_ENV))
    try:
        root = resolve_data_dir(data_dir)
    except FileNotFoundError:
        if not explicit and task_folder in HUB_NAMES and _datasets_available():
            return _load_from_hub(task_folder, split)
        raise
    folder = root / task_folder
    path = folder / f"{split}.jsonl.gz"
    if not path.is_file():
        splits = available_splits(folder)
        have = f"splits present: {', '.join(splits)}" if splits else f"folder {str(folder)!r} has no splits"
        raise FileNotFoundError(f"split file {str(path)!r} does not exist; {have}")
    return read_jsonl(path)


def take(rows: Sequence[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    """The first ``limit`` rows (all of them when ``limit`` is ``None``).

    Raises:
        ValueError: ``limit`` is negative.
    """
    if limit is None:
        return list(rows)
    if limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    return list(rows[:limit])
