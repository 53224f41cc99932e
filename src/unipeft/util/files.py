"""Reading config files safely: JSON or YAML with safe loaders only (nothing is ever unpickled or executed).

Every config unipeft reads from a user — recipes, adapter configs (unipeft's and HF peft's), training configs — goes
through :func:`read_mapping`, so a missing file, invalid JSON/YAML or a file that is not a mapping gives one clear
error naming the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml


def read_mapping(path: str | os.PathLike[str], *, what: str = "config file") -> dict[str, Any]:
    """The mapping in ``path``: JSON for a ``.json`` file, else YAML (``yaml.safe_load``); an empty YAML file is {}.

    Raises:
        FileNotFoundError: if ``path`` is not a file (the message names ``what``).
        ValueError: for invalid JSON/YAML, or a file that holds something other than a mapping.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{what} {str(file)!r} does not exist")
    text = file.read_text(encoding="utf-8")
    if file.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{file} is not valid JSON ({err})") from None
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"{file} is not valid YAML: {err}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a mapping, got {type(data).__name__}")
    return data


__all__ = ["read_mapping"]
