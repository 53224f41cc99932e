"""``unipeft bench`` end to end: real MiniLM on SST-2 in worker processes, resume, a user's JSONL tasks."""

from __future__ import annotations

import json

import pytest
import yaml

from unipeft.bench import ResultStore, run_bench, spec_from_dict
from unipeft.bench import runner as runner_module
from unipeft.cli.main import main

TINY = {"max_steps": 3, "batch_size": 8, "eval_batch_size": 32, "max_length": 32, "train_limit": 64,
        "eval_limit": 32, "threads": 1}
LATENCY = {"batch_size": 8, "warmup": 1, "repeats": 2}


@pytest.fixture(scope="module")
def sst2_bench(tmp_path_factory, minilm):
    root = tmp_path_factory.mktemp("bench")
    spec = spec_from_dict({"name": "tiny", "train": {"model": minilm, "task": "sst2", **TINY}, "latency": LATENCY,
                           "methods": ["lora", {"bitfit": {"lr": 5e-3}}]})
    lines: list[str] = []
    outcome = run_bench(spec, root, command="pytest", echo=lines.append)
    return spec, root, outcome, lines


def test_every_method_ran_in_its_own_process_and_wrote_outputs(sst2_bench):
    spec, root, outcome, lines = sst2_bench
    assert outcome.ran == [("lora", 0), ("bitfit", 0)] and not outcome.failed and not outcome.skipped
    assert any("step 3/3" in line for line in lines)  # the workers' progress was relayed
    for name in ("results.json", "results.csv", "runs.csv", "report.md", "quality_vs_params.png", "memory.png",
                 "time.png"):
        assert (root / name).is_file()
    for method in ("lora", "bitfit"):
        run = root / "runs" / method / "seed0"
        assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "worker.log").is_file()


def test_numbers_come_from_the_runs_and_match_inspect(sst2_bench):
    from unipeft.cli.inspect_cmd import count_method
    from unipeft.models import load_model

    spec, root, outcome, _ = sst2_bench
    data = json.loads((root / "results.json").read_text())
    records = {r["name"]: r for r in data["records"]}
    model, _ = load_model("minilm", kind="classification", num_labels=2)
    for name, record in records.items():
        train_metrics = json.loads((root / "runs" / name / "seed0" / "metrics.json").read_text())
        assert record["metrics"] == train_metrics["metrics"] and record["steps"] == 3
        (row,) = count_method(model, "classification", name)
        assert f"{record['trainable_params']:,}" == row[1]
        assert f"{record['trainable_percent']:.4f}%" == row[2]
        latency = record["latency"]
        assert latency["merged_ms"] is not None and latency["merge_max_abs_diff"] < 1e-4
        assert record["process_peak_rss_mib"] >= record["peak_rss_with_eval_mib"] >= record["peak_rss_mib"] > 100
        assert record["malloc_mmap_threshold"] == "131072"  # the worker ran with the spec's allocator setting
        assert record["adapter_params"] == record["trainable_params"]  # LoRA + head copy / biases + head copy
        assert record["cuda_peak_mib"] is None
    summary = {r["name"]: r for r in data["summary"]}
    assert summary["lora"]["metrics"]["accuracy"]["mean"] == records["lora"]["metrics"]["accuracy"]


def test_a_second_run_skips_finished_methods(sst2_bench, monkeypatch):
    spec, root, _, _ = sst2_bench
    calls = []
    monkeypatch.setattr(runner_module, "run_worker", lambda job, run_dir, echo: calls.append(job) or (None, "x"))
    outcome = run_bench(spec, root, echo=lambda line: None)
    assert outcome.skipped == [("lora", 0), ("bitfit", 0)] and not outcome.ran and not calls
    assert len(outcome.data["records"]) == 2
    # each record keeps the commit of the invocation that ran it, taken before its first run
    assert all(r["git"] == outcome.data["environment"]["git"] for r in outcome.data["records"])


def test_a_changed_method_reruns_alone(sst2_bench, monkeypatch, tmp_path):
    spec, root, _, _ = sst2_bench
    store = ResultStore(tmp_path)  # a copy of the finished results, rebased to this folder
    for name in ("lora", "bitfit"):
        record = ResultStore(root).load(name, 0)
        record["job"] = runner_module.job_for(spec, spec.method(name), 0, store.run_dir(name, 0))
        store.save(name, 0, record)
    changed = spec_from_dict({**spec.to_dict(), "methods": [{"name": "lora", "method": "lora", "lr": 3e-3},
                                                            {"name": "bitfit", "method": "bitfit", "lr": 5e-3}]})
    calls = []
    monkeypatch.setattr(runner_module, "run_worker",
                        lambda job, run_dir, echo: calls.append(job["name"]) or (None, "boom"))
    outcome = run_bench(changed, tmp_path, echo=lambda line: None)
    assert calls == ["lora"] and outcome.skipped == [("bitfit", 0)]
    assert outcome.failed == [("lora", 0, "boom")]
    assert [r["name"] for r in outcome.data["records"]] == ["bitfit"]  # the stale lora record is not reported


def test_a_user_jsonl_task_through_the_command_line(tmp_path, minilm, capsys):
    rows = [{"review": f"{word} film , {word} acting", "stars": label}
            for word, label in [("great", "positive"), ("awful", "negative"), ("lovely", "positive"),
                                ("dull", "negative")] * 6]
    for split in ("train", "dev"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    spec = {"name": "reviews", "train": {"model": minilm, "task": "reviews", **TINY, "train_limit": None,
                                         "eval_limit": None,
                                         "jsonl": {"train_path": str(tmp_path / "train.jsonl"),
                                                   "eval_path": str(tmp_path / "dev.jsonl"), "kind": "classification",
                                                   "text_fields": ["review"], "label_field": "stars",
                                                   "label_names": ["negative", "positive"]}},
            "latency": LATENCY, "methods": ["lora"]}
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    assert main(["-q", "bench", str(tmp_path / "bench.yaml"), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "ran 1, skipped 0 (done before), failed 0" in printed
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    (record,) = data["records"]
    assert record["task"] == "reviews" and set(record["metrics"]) == {"accuracy", "f1", "matthews", "loss"}
    assert "| lora | lora |" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.slow  # a third worker process; generation and its scoring are also tested in tests/train
def test_a_user_generation_task_with_samples(tmp_path, tiny_llama_folder):
    rows = [{"mr": f"name[{n}], food[{f}]", "text": f"{n} serves {f} food ."}
            for n in ("Aromi", "Bibimbap", "Cotto") for f in ("Italian", "French")]
    path = tmp_path / "e2e.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    spec = spec_from_dict({"name": "gen", "samples": 2, "latency": LATENCY, "methods": ["lora"],
                           "train": {"model": tiny_llama_folder, "task": "mine", **TINY, "train_limit": None,
                                     "eval_limit": 4,
                                     "jsonl": {"train_path": str(path), "eval_path": str(path), "kind": "generation",
                                               "prompt_template": "{mr}\n", "response_field": "text",
                                               "max_new_tokens": 4}}})
    outcome = run_bench(spec, tmp_path / "out", echo=lambda line: None)
    assert not outcome.failed
    (record,) = outcome.data["records"]
    assert {"bleu", "rouge_l", "perplexity", "loss"} <= set(record["metrics"])
    assert len(record["samples"]) == 2 and record["samples"][0]["prompt"] == "name[Aromi], food[Italian]\n"
    assert "## Sample generations (greedy)" in (tmp_path / "out" / "report.md").read_text()
