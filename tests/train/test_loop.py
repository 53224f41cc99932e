"""The training loop on the real MiniLM and SST-2 with tiny budgets: learning, outputs, exact resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import unipeft
from unipeft.data import collate, encode, get_task, load_rows
from unipeft.models import load_model
from unipeft.train import TrainConfig, train
from unipeft.train.loop import recipe_for, seed_everything

TINY = dict(model="minilm", task="sst2", train_limit=40, eval_limit=16, max_length=32, batch_size=8,
            eval_batch_size=16, lr=2e-3, threads=1, progress=False)


def config(tmp_path, **changes) -> TrainConfig:
    return TrainConfig(**{**TINY, "output_dir": str(tmp_path), **changes})


def adapter_tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


class Crash(RuntimeError):
    pass


def crash_at(step: int):
    def on_step(done: int, loss: float) -> None:
        if done == step:
            raise Crash(f"killed at step {done}")
    return on_step


@pytest.fixture
def one_thread():
    """One torch thread (tiny batches gain nothing from more, and a busy machine loses a lot), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_loss_goes_down_on_a_real_batch(minilm, one_thread):
    seed_everything(0)
    task = get_task("sst2")
    model, tokenizer = load_model(minilm, kind="classification", num_labels=2)
    peft = unipeft.attach(model, recipe_for(TrainConfig(), task))
    batch = collate(encode(load_rows(task, "train", limit=16), task, tokenizer, 32), tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(peft.trainable_parameters(), lr=3e-3)
    model.eval()  # no dropout: the same batch must fit better step after step
    losses = []
    for _ in range(6):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(not p.requires_grad for p in peft.base_parameters())


def test_outputs(tmp_path, minilm):
    result = train(config(tmp_path, max_steps=3, eval_every=2))
    assert result.steps == 3 and result.trainable_params == 74_498  # LoRA r=8 on q, v + the 2-class head
    assert 0.0 <= result.metrics["accuracy"] <= 1.0 and result.peak_rss_mib > 100
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["metrics"] == result.metrics and metrics["config"]["max_steps"] == 3
    assert metrics["trainable_percent"] == pytest.approx(100 * 74_498 / metrics["total_params"])
    assert set(metrics["throughput"]) == {"steps_per_s", "examples_per_s", "tokens_per_s"}
    history = json.loads((tmp_path / "history.json").read_text())
    assert [r["step"] for r in history["train"]] == [1, 2, 3] and [r["step"] for r in history["eval"]] == [2, 3]
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert not (tmp_path / "checkpoint").exists()  # removed once the run is complete
    # the saved adapter reloads onto a fresh model
    model, _ = load_model(minilm, kind="classification", num_labels=2)
    unipeft.load_adapter(model, result.adapter_dir)


def test_resume_after_a_crash_is_exact(tmp_path, minilm):
    # 24 examples / batch 8 = 3 batches per epoch: the resumed part crosses an epoch boundary; dropout is on.
    small = dict(train_limit=24, max_steps=5, save_every=2)
    straight = train(config(tmp_path / "straight", **small))
    with pytest.raises(Crash):
        train(config(tmp_path / "crashed", **small), on_step=crash_at(4))  # dies before saving step 4
    ckpt = tmp_path / "crashed" / "checkpoint"
    assert json.loads((ckpt / "state.json").read_text())["step"] == 2
    shutil.copytree(ckpt, tmp_path / "longer" / "checkpoint")
    resumed = train(config(tmp_path / "crashed", **small))
    assert resumed.steps == 5
    a, b = adapter_tensors(straight.adapter_dir), adapter_tensors(resumed.adapter_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metrics == straight.metrics
    history = json.loads((tmp_path / "crashed" / "history.json").read_text())
    assert [r["step"] for r in history["train"]] == [1, 2, 3, 4, 5]
    # a larger budget continues at step 3 and follows the new schedule
    longer = train(config(tmp_path / "longer", **{**small, "max_steps": 6}))
    steps = [r["step"] for r in json.loads((tmp_path / "longer" / "history.json").read_text())["train"]]
    assert longer.steps == 6 and steps == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_a_different_run(tmp_path, minilm):
    with pytest.raises(Crash):
        train(config(tmp_path, max_steps=3, save_every=1), on_step=crash_at(2))
    with pytest.raises(ValueError, match=r"cannot resume .*batch_size: checkpoint 8 vs now 4"):
        train(config(tmp_path, max_steps=3, batch_size=4))


def test_user_jsonl_regression_task(tmp_path, minilm):
    rows = [{"a": f"sentence number {i}", "b": "another one", "score": float(i % 5)} for i in range(12)]
    for name in ("train.jsonl", "dev.jsonl"):
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    jsonl = dict(train_path=str(tmp_path / "train.jsonl"), eval_path=str(tmp_path / "dev.jsonl"), kind="regression",
                 text_fields=["a", "b"], label_field="score")
    from unipeft.train import train_config_from_dict

    result = train(train_config_from_dict({**TINY, "task": "scores", "jsonl": jsonl, "max_steps": 2,
                                           "output_dir": str(tmp_path / "out")}))
    assert set(result.metrics) == {"pearson", "spearman", "loss"} and result.main_metric == "pearson"


def test_causal_lm(tmp_path, tiny_llama_folder):
    result = train(config(tmp_path, model=tiny_llama_folder, task="alpaca", max_steps=2, max_length=64,
                          train_limit=16, eval_limit=8))
    assert set(result.metrics) == {"perplexity", "loss"} and result.metrics["perplexity"] > 1
    assert result.trainable_params == 2 * (8 * 32 + 32 * 8) + 2 * (8 * 32 + 16 * 8)  # q: 32->32, v: 32->16 (GQA)


def test_qlora_from_the_config_resumes_exactly(tmp_path, tiny_llama_folder):
    """NF4 base with double quantization, 8-bit AdamW, packing and accumulation from the config: it trains, and a
    crash resumes on the same trajectory (the 8-bit optimizer state round-trips through the checkpoint)."""
    small = dict(model=tiny_llama_folder, task="alpaca", max_steps=4, max_length=64, train_limit=16, eval_limit=8,
                 quantization="nf4", optimizer="adamw_8bit", packing=True, grad_accum_steps=2, save_every=2,
                 method_options={"r": 64, "positions": ["attn.q", "attn.v", "ffn.up"]})
    straight = train(config(tmp_path / "straight", **small))
    assert straight.metrics["loss"] > 0 and straight.precision == "fp32" and straight.device == "cpu"
    metrics = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert metrics["throughput"]["tokens_per_s"] > 0 and metrics["config"]["quantization"] == "nf4"
    with pytest.raises(Crash):
        train(config(tmp_path / "crashed", **small), on_step=crash_at(3))
    resumed = train(config(tmp_path / "crashed", **small))
    a, b = adapter_tensors(straight.adapter_dir), adapter_tensors(resumed.adapter_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bad, message", [
    ({"precision": "fp8"}, r"unknown precision 'fp8'; valid: auto, fp32, bf16, fp16"),
    ({"device": "tpu"}, r"unknown device 'tpu'"),
    ({"optimizer": "lion"}, r"unknown optimizer 'lion'"),
    ({"quantization": "int4"}, r"unknown quantization 'int4'; valid: nf4, fp4, int8"),
    ({"packing": True}, r"packing is for causal-LM tasks .* 'sst2' is classification"),
    ({"grad_accum_steps": 9}, r"grad_accum_steps \(9\) cannot exceed batch_size \(8\)"),
    ({"grad_accum_steps": None}, r"grad_accum_steps must be a positive integer, got None"),
    ({"gradient_checkpointing": "yes"}, r"gradient_checkpointing must be true or false"),
])
def test_scaling_keys_are_checked(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **bad)
