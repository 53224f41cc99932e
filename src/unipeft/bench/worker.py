"""One benchmark run in its own process: ``python -m unipeft.bench.worker JOB.json OUT.json``.

The job holds a training config (:meth:`~unipeft.train.TrainConfig.to_dict`) and the measurement settings. The
worker trains (:func:`unipeft.train.train`), then reloads the base model with the saved adapter — so every
measurement is of what was saved — and measures inference latency unmerged and merged, the adapter's size and,
for text tasks, sample generations. It writes everything to ``OUT.json`` atomically and exits 0; on an error it
exits 1 with the traceback on stderr. Running each method in a fresh process keeps peak-memory figures apart.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("unipeft.bench.worker")


def _samples(task: Any, model: Any, tokenizer: Any, rows: list[dict[str, Any]], output_dir: Path,
             count: int) -> list[dict[str, Any]]:
    """Up to ``count`` generations: a generation task's scored outputs, or greedy answers to causal_lm prompts."""
    from unipeft.data import prompt_text
    from unipeft.train.generation import generate

    if count == 0 or task.kind not in ("generation", "causal_lm"):
        return []
    if task.kind == "generation":
        path = output_dir / "generations.json"
        return json.loads(path.read_text(encoding="utf-8"))[:count] if path.is_file() else []
    chosen = rows[:count]
    prompts = [prompt_text(r, task, i) for i, r in enumerate(chosen)]
    outputs = generate(model, tokenizer, prompts, max_new_tokens=task.max_new_tokens, batch_size=count)
    return [{"prompt": p, "output": o.strip(), "references": [str(r[task.response_field])]}
            for p, o, r in zip(prompts, outputs, chosen)]


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train and measure one job; returns the result record (see :mod:`unipeft.bench.results`)."""
    import torch

    import unipeft
    from unipeft.bench.measure import cuda_peak_mib, folder_bytes, measure_latency, safetensors_numel
    from unipeft.data import encode, load_rows
    from unipeft.models import load_model
    from unipeft.train import train, train_config_from_dict
    from unipeft.train.loop import ADAPTER_NAME, model_kind

    from unipeft.train.report import peak_rss_mib

    config = train_config_from_dict(job["config"])
    training_peak = [0.0]  # the process's peak RSS after the last training step, before the final evaluation

    def on_step(step: int, loss: float) -> None:
        training_peak[0] = peak_rss_mib()

    result = train(config, on_step=on_step)
    metrics = json.loads((result.output_dir / "metrics.json").read_text(encoding="utf-8"))

    torch.set_num_threads(config.threads or len(os.sched_getaffinity(0)))
    task = config.task_spec()
    kind, num_labels = model_kind(task)
    model, tokenizer = load_model(config.model, kind=kind, num_labels=num_labels, seed=config.seed)  # type: ignore
    peft = unipeft.load_adapter(model, result.adapter_dir, name=ADAPTER_NAME)
    rows = load_rows(task, "eval", config.data_dir, config.eval_limit)
    latency_cfg = job["latency"]
    examples = encode(rows[: latency_cfg["batch_size"] * 4], task, tokenizer, config.max_length)
    latency = measure_latency(peft, examples, tokenizer.pad_token_id, batch_size=latency_cfg["batch_size"],
                              warmup=latency_cfg["warmup"], repeats=latency_cfg["repeats"])
    samples = _samples(task, model, tokenizer, rows, result.output_dir, int(job.get("samples", 0)))
    adapter_file = result.adapter_dir / "adapter_model.safetensors"
    throughput = metrics["throughput"]
    return {
        "name": job["name"], "method": config.method, "seed": config.seed, "model": config.model,
        "task": task.name, "main_metric": task.main_metric, "greater_is_better": task.greater_is_better,
        "metrics": result.metrics, "steps": result.steps, "epochs": metrics["epochs"],
        "trainable_params": result.trainable_params, "total_params": result.total_params,
        "trainable_percent": result.trainable_percent,
        "adapter_bytes": folder_bytes(result.adapter_dir),
        "adapter_params": safetensors_numel(adapter_file) if adapter_file.is_file() else None,
        "peak_rss_mib": training_peak[0], "peak_rss_with_eval_mib": result.peak_rss_mib,
        "cuda_peak_mib": cuda_peak_mib(), "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "train_time_s": result.train_time_s, "train_wall_s": result.wall_time_s,
        "steps_per_s": throughput["steps_per_s"], "examples_per_s": throughput["examples_per_s"],
        "tokens_per_s": throughput["tokens_per_s"], "threads": metrics["threads"],
        "latency": {**latency.__dict__, "warmup": latency_cfg["warmup"], "repeats": latency_cfg["repeats"]},
        "samples": samples, "output_dir": str(result.output_dir), "recipe": metrics["recipe"],
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``JOB.json OUT.json``; exit 0 on success, 1 on an error (traceback on stderr)."""
    from unipeft.bench.results import write_json_atomic

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m unipeft.bench.worker JOB.json OUT.json", file=sys.stderr)
        return 2
    job = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("unipeft.train").setLevel(logging.INFO if job.get("verbose", True) else logging.WARNING)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    record = run_job(job)
    write_json_atomic(Path(args[1]), record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
