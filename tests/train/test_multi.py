"""Multi-job training (unipeft.train.multi): several adapters trained at once on one base follow, each, the run of
the same job alone; jobs end at their own steps; a crashed run resumes every job."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from unipeft.train import TrainConfig, train
from unipeft.train.multi import train_jobs
from unipeft.train.multi_config import MultiTrainConfig, multi_config_from_dict


def two_llama_jobs(tmp_path, tiny_llama_folder, data_dir, **top) -> MultiTrainConfig:
    return multi_config_from_dict({
        "model": tiny_llama_folder, "task": "alpaca", "max_length": 64, "eval_limit": 6, "eval_batch_size": 8,
        "threads": 1, "progress": False, "data_dir": str(data_dir), "output_dir": str(tmp_path / "multi"), **top,
        "jobs": [
            {"name": "lora", "method": "lora", "lr": 5e-3, "batch_size": 6, "max_steps": 4, "train_limit": 24},
            {"name": "ia3", "method": "ia3", "lr": 2e-2, "batch_size": 4, "max_steps": 6, "train_limit": 30,
             "seed": 3, "scheduler": "cosine"},
        ]})


def adapter(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def alone(job, tmp_path) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The job trained by itself with the single-job trainer."""
    out = tmp_path / f"alone_{job.name}"
    train(TrainConfig(**{**job.config.to_dict(), "output_dir": str(out)}))
    return [r["loss"] for r in json.loads((out / "history.json").read_text())["train"]], adapter(out)


def history(folder) -> list[float]:
    return [r["loss"] for r in json.loads((folder / "history.json").read_text())["train"]]


def assert_same_adapter(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_each_job_follows_its_run_alone(tmp_path, tiny_llama_folder, data_dir):
    """LoRA and (IA)3 jobs with their own lr, schedule, batch size, seed, data and step count, trained together:
    every step's loss and the final adapter equal each job trained alone (rtol 1e-4); the shorter job ends first."""
    config = two_llama_jobs(tmp_path, tiny_llama_folder, data_dir)
    results = train_jobs(config)
    assert {n: r.steps for n, r in results.items()} == {"lora": 4, "ia3": 6}
    for job in config.jobs:
        losses, weights = alone(job, tmp_path)
        folder = tmp_path / "multi" / job.name
        assert history(folder) == pytest.approx(losses, rel=1e-4)
        assert_same_adapter(adapter(folder), weights)
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["method"] == job.config.method and metrics["steps"] == job.config.max_steps
    run = json.loads((tmp_path / "multi" / "multi.json").read_text())
    assert run["steps"] == 6 and [j["name"] for j in run["jobs"]] == ["lora", "ia3"]


def test_gradient_checkpointing_recomputes_through_the_mixed_batch(tmp_path, tiny_llama_folder, data_dir):
    """With checkpointing the backward recomputes each block's forward: it must run each row through its own adapter
    again, so the jobs still follow their runs alone (here: with checkpointing too)."""
    config = two_llama_jobs(tmp_path, tiny_llama_folder, data_dir, gradient_checkpointing=True)
    train_jobs(config)
    for job in config.jobs:
        losses, weights = alone(job, tmp_path)
        assert history(tmp_path / "multi" / job.name) == pytest.approx(losses, rel=1e-4)
        assert_same_adapter(adapter(tmp_path / "multi" / job.name), weights)


def test_jobs_in_passes_of_one_follow_their_runs_alone(tmp_path, tiny_llama_folder, data_dir):
    """``jobs_per_pass: 1``: each job's rows get their own forward and backward (less activation memory at once),
    and every job still follows its run alone; the run records the setting."""
    config = two_llama_jobs(tmp_path, tiny_llama_folder, data_dir, jobs_per_pass=1)
    assert config.jobs_per_pass == 1
    train_jobs(config)
    for job in config.jobs:
        losses, weights = alone(job, tmp_path)
        assert history(tmp_path / "multi" / job.name) == pytest.approx(losses, rel=1e-4)
        assert_same_adapter(adapter(tmp_path / "multi" / job.name), weights)
    assert json.loads((tmp_path / "multi" / "multi.json").read_text())["jobs_per_pass"] == 1


def test_classification_jobs_with_their_own_heads(tmp_path, tiny_bert_folder, data_dir):
    """Two GLUE jobs (SST-2 with LoRA, RTE with a bottleneck adapter), each with its own head copy, trained together
    on a BERT without dropout (the base's own dropout would draw other masks in a shared batch): each equals its run
    alone."""
    config = multi_config_from_dict({
        "model": tiny_bert_folder, "max_length": 48, "eval_limit": 16, "threads": 1, "progress": False,
        "data_dir": str(data_dir), "output_dir": str(tmp_path / "multi"), "max_steps": 3, "batch_size": 4,
        "jobs": [{"name": "sst2", "task": "sst2", "method": "lora", "train_limit": 16},
                 {"name": "rte", "task": "rte", "method": "pfeiffer", "lr": 2e-3, "train_limit": 16}]})
    train_jobs(config)
    for job in config.jobs:
        losses, weights = alone(job, tmp_path)
        assert history(tmp_path / "multi" / job.name) == pytest.approx(losses, rel=1e-4)
        assert_same_adapter(adapter(tmp_path / "multi" / job.name), weights)


def test_a_crashed_run_resumes_every_job(tmp_path, tiny_llama_folder, data_dir):
    config = two_llama_jobs(tmp_path, tiny_llama_folder, data_dir, save_every=2)
    reference = two_llama_jobs(tmp_path / "ref", tiny_llama_folder, data_dir, save_every=2)
    train_jobs(reference)

    def crash(job: str, step: int, loss: float) -> None:
        if job == "ia3" and step == 3:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train_jobs(config, on_step=crash)
    assert all((tmp_path / "multi" / name / "checkpoint").is_dir() for name in ("lora", "ia3"))
    train_jobs(config)
    for job in config.jobs:
        folder, ref = tmp_path / "multi" / job.name, tmp_path / "ref" / "multi" / job.name
        assert history(folder) == pytest.approx(history(ref), rel=1e-5)
        assert_same_adapter(adapter(folder), adapter(ref))
        assert not (folder / "checkpoint").exists()


def test_on_eval_stops_one_job_and_the_others_go_on(tmp_path, tiny_llama_folder, data_dir):
    """``on_eval`` returning True for one job stops it at that evaluation (no final outputs, left out of the
    results); the other job still follows the run in which nothing was stopped."""
    config = two_llama_jobs(tmp_path, tiny_llama_folder, data_dir, eval_every=2)
    reference = two_llama_jobs(tmp_path / "ref", tiny_llama_folder, data_dir, eval_every=2)
    train_jobs(reference)
    seen: list[tuple[str, int]] = []

    def stop_lora(job: str, step: int, metrics: dict[str, float]) -> bool:
        seen.append((job, step))
        assert metrics and all(isinstance(v, float) for v in metrics.values())
        return job == "lora"

    steps: dict[str, int] = {}
    results = train_jobs(config, on_eval=stop_lora, on_step=lambda job, step, loss: steps.__setitem__(job, step))
    assert set(results) == {"ia3"} and results["ia3"].steps == 6
    assert steps == {"lora": 2, "ia3": 6}
    assert seen == [("lora", 2), ("ia3", 2), ("ia3", 4)]  # the final evaluation (step 6) is not reported
    assert not (tmp_path / "multi" / "lora" / "metrics.json").exists()
    assert history(tmp_path / "multi" / "ia3") == pytest.approx(history(tmp_path / "ref" / "multi" / "ia3"), rel=1e-5)
    assert_same_adapter(adapter(tmp_path / "multi" / "ia3"), adapter(tmp_path / "ref" / "multi" / "ia3"))
    run = json.loads((tmp_path / "multi" / "multi.json").read_text())
    assert run["jobs_metrics"]["lora"] is None and run["jobs_metrics"]["ia3"]


@pytest.mark.parametrize("change, match", [
    ({"jobs": [{"name": "a"}, {"name": "a"}]}, r"job names must be unique; repeated: a"),
    ({"jobs": [{"name": "a/b"}]}, r"jobs\[0\]: name must be letters"),
    ({"jobs": [{"name": "a"}, {"name": "b", "model": "smollm2-135m"}]}, r"job 'b': model='smollm2-135m' differs"),
    ({"jobs": [{"name": "a", "packing": True, "task": "alpaca"}]}, r"job 'a': packing=True is not available"),
    ({"jobs": [{"name": "a", "lr": -1}]}, r"job 'a': lr must be > 0"),
    ({"jobs": "a"}, r"jobs must be a list of mappings"),
    ({"jobs_per_pass": 0, "jobs": [{"name": "a"}]}, r"jobs_per_pass must be an integer >= 1 or null"),
    ({"jobs_per_pass": "two", "jobs": [{"name": "a"}]}, r"jobs_per_pass must be an integer >= 1 or null .*, got 'two'"),
    ({"jobs": [{"name": "a", "output_dir": "x"}]}, r"output_dir is set for the whole run"),
])
def test_bad_multi_configs_name_the_job_and_the_problem(change, match):
    with pytest.raises(ValueError, match=match):
        multi_config_from_dict({"model": "minilm", **change})


def test_jobs_of_different_model_kinds_are_refused(tmp_path, minilm, data_dir):
    config = multi_config_from_dict({"model": minilm, "data_dir": str(data_dir), "output_dir": str(tmp_path),
                                     "jobs": [{"name": "a", "task": "sst2"}, {"name": "b", "task": "stsb"}]})
    with pytest.raises(ValueError, match=r"same model kind and label count; got a: classification \(2 labels\), "
                                         r"b: regression"):
        train_jobs(config)


def test_dropout_is_refused(tmp_path, tiny_llama_folder, data_dir):
    config = two_llama_jobs(tmp_path, tiny_llama_folder, data_dir)
    jobs = config.to_dict()["jobs"]
    jobs[0]["method_options"] = {"dropout": 0.1}
    for job in jobs:
        del job["output_dir"]
    config = multi_config_from_dict({"output_dir": str(tmp_path / "multi"), "jobs": jobs})
    with pytest.raises(ValueError, match=r"adapter 'lora' has dropout 0.1 .*dropout 0"):
        train_jobs(config)


def test_the_cli_trains_a_jobs_config(tmp_path, tiny_llama_folder, data_dir):
    import subprocess
    import sys

    import yaml

    data = two_llama_jobs(tmp_path, tiny_llama_folder, data_dir).to_dict()
    for job in data["jobs"]:
        del job["output_dir"]
    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump(data))
    done = subprocess.run([sys.executable, "-m", "unipeft", "train", str(path), "max_steps=2"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "lora  2 steps" in done.stdout and "ia3   2 steps" in done.stdout
    assert (tmp_path / "multi" / "ia3" / "adapter").is_dir() and (tmp_path / "multi" / "multi.json").is_file()
    refused = subprocess.run([sys.executable, "-m", "unipeft", "train", "--nproc", "2", str(path)],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "a multi-job config trains its jobs in one process" in refused.stderr
