"""Hand-made benchmark records (no training), for the result, report and plot tests."""

from __future__ import annotations

from typing import Any


def record(name: str, seed: int, accuracy: float, *, params: int, method: str | None = None, peak: float = 900.0,
           train_s: float = 100.0, merged: float | None = 20.0) -> dict[str, Any]:
    """A finished run's record as the worker writes it (the fields the results and the report read)."""
    return {
        "name": name, "method": method or name, "seed": seed, "model": "minilm", "task": "sst2",
        "main_metric": "accuracy", "greater_is_better": True, "metrics": {"accuracy": accuracy, "loss": 1 - accuracy},
        "steps": 200, "epochs": 0.3, "trainable_params": params, "total_params": 22_713_986 + params,
        "trainable_percent": 100 * params / (22_713_986 + params), "adapter_bytes": 4 * params + 1000,
        "adapter_params": params, "peak_rss_mib": peak + seed, "cuda_peak_mib": None, "train_time_s": train_s + seed,
        "train_wall_s": train_s + 20, "steps_per_s": 2.0, "examples_per_s": 64.0, "tokens_per_s": 1000.0 + seed,
        "threads": 1, "peak_rss_with_eval_mib": peak + 20, "process_peak_rss_mib": peak + 50, "process_wall_s": train_s + 30,
        "latency": {"batch_size": 32, "tokens": 500, "unmerged_ms": 25.0 + seed, "merged_ms": merged,
                    "merge_max_abs_diff": 1e-6 if merged is not None else None, "merge_error": None,
                    "warmup": 2, "repeats": 10},
        "samples": [], "output_dir": f"runs/{name}/seed{seed}", "recipe": {}, "job": {"name": name},
    }


RECORDS = [
    record("full", 0, 0.86, params=22_713_986, peak=1400.0, train_s=400.0),
    record("full", 1, 0.88, params=22_713_986, peak=1400.0, train_s=400.0),
    record("lora", 0, 0.85, params=74_498),
    record("lora", 1, 0.84, params=74_498),
    record("bitfit", 0, 0.80, params=100_000),
    record("bitfit", 1, 0.81, params=100_000),
    record("prefix", 0, 0.70, params=2_611_714, merged=None),
    record("prefix", 1, 0.72, params=2_611_714, merged=None),
]
