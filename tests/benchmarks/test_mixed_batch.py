"""Smoke test of benchmarks/mixed_batch.py on a tiny random LLaMA (one measured round, seconds; no timing checks).

The benchmark lives outside the package, so it is imported from its folder. unipeft and HF peft get the same adapters,
so the logits of unipeft/k and peft/k must agree at every k.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

TINY = dict(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def mixed_batch(import_benchmark):
    return import_benchmark("mixed_batch")


def test_run_benchmark_result_is_complete_and_outputs_agree(mixed_batch):
    setup = mixed_batch.Setup(model="tiny", config=TINY, batch=4, seq=5, decode_steps=2, adapters=(1, 2, 4),
                              rounds=1, warmup=1, threads=1)

    result = mixed_batch.run_benchmark(setup, log=lambda message: None)

    names = {"floor", "unipeft/single", "peft/single", *(f"{lib}/{k}" for lib in ("unipeft", "peft") for k in (1, 2, 4))}
    assert set(result["contenders"]) == names
    for name, r in result["contenders"].items():
        for phase in ("prefill", "decode"):
            p = r["phases"][phase]
            assert len(p["times_s"]) == 1 and p["times_s"][0] > 0, (name, phase)
            assert p["tokens_per_s"] == pytest.approx(result["tokens"][phase] / p["time"]["median_s"])
    assert result["tokens"] == {"prefill": 20, "decode": 8}
    assert set(result["output_check"]) == {"unipeft/1 vs peft/1", "unipeft/2 vs peft/2", "unipeft/4 vs peft/4",
                                           "unipeft/single vs peft/single", "single vs mixed/1 (unipeft)"}
    assert max(result["output_check"].values()) <= 1e-5
    for phase in ("prefill", "decode"):
        ratios = result["ratios"][phase]
        assert {f"peft/unipeft at {k}" for k in (1, 2, 4, "single")} <= set(ratios)
        assert ratios["unipeft 4 / unipeft single"] > 0
    text = mixed_batch.report(result)
    assert "peft/unipeft at" in text and "unipeft 4 / unipeft single" in text
    json.dumps(result)  # JSON-ready


def test_rows_take_adapters_round_robin_and_setup_is_validated(mixed_batch):
    setup = mixed_batch.Setup(model="tiny", config=TINY, batch=5, adapters=(2,))
    assert setup.names(2) == ["adapter0", "adapter1", "adapter0", "adapter1", "adapter0"]
    with pytest.raises(ValueError, match=r"adapters must be numbers in 1..batch \(4\)"):
        mixed_batch.Setup(batch=4, adapters=(8,))
    with pytest.raises(ValueError, match="unknown phase"):
        mixed_batch.Setup(phases=("train",))
