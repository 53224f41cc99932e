"""Helpers shared by the subcommands: resolving a task argument, loading a model for a task, printing tables."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from unipeft.data import TaskSpec


class UsageError(ValueError):
    """Bad input from the user: reported as one line, with exit code 2."""


def resolve_task(value: str) -> TaskSpec:
    """A built-in task name, or a training config YAML whose task (built-in or ``jsonl``) is used.

    Raises:
        ValueError: for an unknown task name (the message lists the valid ones).
        FileNotFoundError: for a missing config file.
    """
    from unipeft.data import get_task
    from unipeft.train.config import load_train_config

    if value.endswith((".yaml", ".yml")):
        return load_train_config(value).task_spec()
    return get_task(value)


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """``--data-dir`` and ``--max-length``."""
    parser.add_argument("--data-dir", help="data directory (default: $UNIPEFT_DATA_DIR or ../shared/data)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per example (default: 128)")


def table(rows: Sequence[Sequence[object]], header: Sequence[str] | None = None) -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    all_rows = [list(map(str, header))] if header else []
    all_rows += [[str(c) for c in row] for row in rows]
    if not all_rows:
        return ""
    widths = [max(len(r[i]) for r in all_rows if i < len(r)) for i in range(len(all_rows[0]))]
    lines = []
    for n, row in enumerate(all_rows):
        cells = [c.ljust(widths[i]) if i < len(row) - 1 else c for i, c in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
        if header and n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def existing_dir(value: str) -> Path:
    """An argparse type: a folder that must exist."""
    path = Path(value)
    if not path.is_dir():
        raise UsageError(f"folder {value!r} does not exist")
    return path
