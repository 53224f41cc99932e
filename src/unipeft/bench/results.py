"""Benchmark results: one JSON record per finished (method, seed), a per-method summary, JSON and CSV files.

Layout of a benchmark folder::

    results/<method>/seed<k>.json   one record per finished run (written atomically: the run's "done" marker)
    runs/<method>/seed<k>/          the run's training outputs (adapter, metrics.json, curves.png, ...)
    results.json                    spec, environment, every record and the summary
    results.csv                     the summary, one row per method
    runs.csv                        one row per (method, seed)

A record stores the job it ran; a stored record counts as done only for the same job, so changing a method's
config reruns it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from unipeft.util.atomic import atomic_write_file


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``."""
    atomic_write_file(path, write)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON (NaN and inf as null), atomically."""
    text = json.dumps(_finite(data), indent=2, ensure_ascii=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


class ResultStore:
    """Finished runs of one benchmark folder, one JSON file per (method, seed)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path(self, name: str, seed: int) -> Path:
        """Where the record of ``(name, seed)`` lives."""
        return self.root / "results" / name / f"seed{seed}.json"

    def run_dir(self, name: str, seed: int) -> Path:
        """The training output folder of ``(name, seed)``."""
        return self.root / "runs" / name / f"seed{seed}"

    def load(self, name: str, seed: int) -> dict[str, Any] | None:
        """The stored record, or None if the run has not finished."""
        path = self.path(name, seed)
        if not path.is_file():
            return None
        return json.loads(path.read_text(encoding="utf-8"))

    def is_done(self, name: str, seed: int, job: Mapping[str, Any]) -> bool:
        """Whether ``(name, seed)`` finished with this very job (same config and measurement settings)."""
        record = self.load(name, seed)
        return record is not None and record.get("job") == _finite(dict(job))

    def save(self, name: str, seed: int, record: Mapping[str, Any]) -> Path:
        """Store a finished run's record atomically; returns its path."""
        path = self.path(name, seed)
        write_json_atomic(path, record)
        return path


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (0.0 for one value; None when there are none or any is not finite)."""
    if not values or any(v is None or not math.isfinite(v) for v in values):
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


SUMMARY_FIELDS = ("trainable_params", "trainable_percent", "adapter_params", "adapter_bytes", "peak_rss_mib",
                  "cuda_peak_mib", "train_time_s", "tokens_per_s", "latency_ms", "latency_merged_ms")


def summarize(records: Sequence[Mapping[str, Any]], order: Sequence[str]) -> list[dict[str, Any]]:
    """One row per method (in ``order``, methods without records left out): the mean of every measurement over its
    seeds and, per metric, ``mean`` and ``std`` over seeds."""
    rows = []
    for name in order:
        runs = sorted((r for r in records if r["name"] == name), key=lambda r: r["seed"])
        if not runs:
            continue
        row: dict[str, Any] = {"name": name, "method": runs[0]["method"], "seeds": [r["seed"] for r in runs],
                               "main_metric": runs[0]["main_metric"],
                               "greater_is_better": runs[0]["greater_is_better"]}
        values = {
            "trainable_params": [r["trainable_params"] for r in runs],
            "trainable_percent": [r["trainable_percent"] for r in runs],
            "adapter_params": [r["adapter_params"] for r in runs],
            "adapter_bytes": [r["adapter_bytes"] for r in runs],
            "peak_rss_mib": [r["peak_rss_mib"] for r in runs],
            "cuda_peak_mib": [r["cuda_peak_mib"] for r in runs],
            "train_time_s": [r["train_time_s"] for r in runs],
            "tokens_per_s": [r["tokens_per_s"] for r in runs],
            "latency_ms": [r["latency"]["unmerged_ms"] for r in runs],
            "latency_merged_ms": [r["latency"]["merged_ms"] for r in runs],
        }
        for key, vals in values.items():
            if any(v is None for v in vals):
                row[key] = None
            elif len(set(vals)) == 1:
                row[key] = vals[0]  # counts and sizes stay integers when every seed agrees
            else:
                row[key] = _mean_std(vals)[0]
        metrics = {}
        for metric in runs[0]["metrics"]:
            mean, std = _mean_std([r["metrics"].get(metric) for r in runs])
            metrics[metric] = {"mean": mean, "std": std}
        row["metrics"] = metrics
        rows.append(row)
    return rows


def _csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return buffer.getvalue()


def summary_csv(summary: Sequence[Mapping[str, Any]]) -> str:
    """The summary as CSV: one row per method, ``<metric>_mean`` and ``<metric>_std`` columns per metric."""
    metrics = list(dict.fromkeys(m for row in summary for m in row["metrics"]))
    header = ["name", "method", "n_seeds", *SUMMARY_FIELDS] + [f"{m}_{s}" for m in metrics for s in ("mean", "std")]
    rows = [[row["name"], row["method"], len(row["seeds"]), *(row[f] for f in SUMMARY_FIELDS)]
            + [row["metrics"].get(m, {}).get(s) for m in metrics for s in ("mean", "std")] for row in summary]
    return _csv(header, rows)


def runs_csv(records: Sequence[Mapping[str, Any]]) -> str:
    """Every record as CSV: one row per (method, seed)."""
    metrics = list(dict.fromkeys(m for r in records for m in r["metrics"]))
    header = ["name", "method", "seed", "steps", "trainable_params", "trainable_percent", "adapter_bytes",
              "peak_rss_mib", "process_peak_rss_mib", "train_time_s", "tokens_per_s", "latency_ms",
              "latency_merged_ms", *metrics]
    rows = [[r["name"], r["method"], r["seed"], r["steps"], r["trainable_params"], r["trainable_percent"],
             r["adapter_bytes"], r["peak_rss_mib"], r.get("process_peak_rss_mib"), r["train_time_s"],
             r["tokens_per_s"], r["latency"]["unmerged_ms"], r["latency"]["merged_ms"]]
            + [r["metrics"].get(m) for m in metrics] for r in records]
    return _csv(header, rows)


def write_results(root: Path, data: Mapping[str, Any]) -> None:
    """Write ``results.json`` (everything), ``results.csv`` (the summary) and ``runs.csv`` (the records)."""
    write_json_atomic(root / "results.json", data)
    write_text_atomic(root / "results.csv", summary_csv(data["summary"]))
    write_text_atomic(root / "runs.csv", runs_csv(data["records"]))


__all__ = ["ResultStore", "atomic_write", "summarize", "summary_csv", "runs_csv", "write_results", "write_json_atomic",
           "write_text_atomic", "SUMMARY_FIELDS"]
