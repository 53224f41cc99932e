"""The worker's measurements on small inputs: latency unmerged/merged, sizes, sample generations."""

from __future__ import annotations

import json

import torch

import unipeft
from unipeft.bench.measure import folder_bytes, measure_latency, safetensors_numel
from unipeft.bench.worker import _samples
from unipeft.data import encode, format_alpaca_prompt, jsonl_task, load_rows
from unipeft.models import load_model


def test_latency_merged_equals_unmerged_and_unmergeable_is_reported(tiny_llama_folder, tmp_path):
    torch.set_num_threads(1)
    model, tokenizer = load_model(tiny_llama_folder, kind="causal_lm")
    rows = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(4)]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    task = jsonl_task(train_path=path, eval_path=path, kind="causal_lm", prompt_field="q", response_field="a")
    examples = encode(load_rows(task, "eval"), task, tokenizer, 32)
    peft = unipeft.attach(model, "lora")
    with torch.no_grad():
        for _, placed in peft.delta_modules():
            for p in placed.parameters():
                p.add_(0.05)  # away from LoRA's B = 0 init, so merging changes the weights
    latency = measure_latency(peft, examples, tokenizer.pad_token_id, batch_size=3, warmup=1, repeats=2)
    assert latency.batch_size == 3 and latency.merged_ms is not None and latency.merge_max_abs_diff < 1e-4
    assert latency.tokens == sum(len(e["input_ids"]) for e in examples[:3]) and not peft.merged
    peft.detach()
    prefix = unipeft.attach(model, "prefix")
    latency = measure_latency(prefix, examples, tokenizer.pad_token_id, batch_size=2, warmup=0, repeats=1)
    assert latency.merged_ms is None and "cannot be merged" in latency.merge_error

    folder = prefix.save(str(tmp_path / "adapter"))
    assert folder_bytes(folder) == sum(p.stat().st_size for p in folder.iterdir())
    saved = sum(p.numel() for _, placed in prefix.delta_modules() for p in placed.state_dict().values())
    assert safetensors_numel(folder / "adapter_model.safetensors") == saved

    samples = _samples(task, model, tokenizer, rows, tmp_path, 2)
    assert [s["prompt"] for s in samples] == [format_alpaca_prompt("question 0"), format_alpaca_prompt("question 1")]
    assert samples[0]["references"] == ["answer 0"] and isinstance(samples[0]["output"], str)


def test_generation_samples_come_from_the_scored_outputs(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"s": "x", "t": "y"}) + "\n", encoding="utf-8")
    task = jsonl_task(train_path=path, eval_path=path, kind="generation", prompt_template="{s}", response_field="t")
    scored = [{"prompt": f"p{i}", "output": f"o{i}", "references": ["r"]} for i in range(5)]
    (tmp_path / "generations.json").write_text(json.dumps(scored), encoding="utf-8")
    assert _samples(task, None, None, [], tmp_path, 3) == scored[:3]
    assert _samples(task, None, None, [], tmp_path, 0) == []
