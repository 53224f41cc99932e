"""Result store, resume bookkeeping, per-method summaries, CSV files, and the Pareto front."""

from __future__ import annotations

import csv
import io
import json
import statistics

import pytest

from tests.bench.fake import RECORDS, record
from unipeft.bench import ResultStore, pareto_front, summarize
from unipeft.bench.results import runs_csv, summary_csv, write_results


def test_store_roundtrip_and_done_only_for_the_same_job(tmp_path):
    store = ResultStore(tmp_path)
    job = {"name": "lora", "config": {"lr": 0.002, "method_options": {"r": 8}}, "samples": 0}
    assert store.load("lora", 0) is None and not store.is_done("lora", 0, job)
    path = store.save("lora", 0, {**record("lora", 0, 0.85, params=10), "job": job})
    assert path == tmp_path / "results" / "lora" / "seed0.json"
    assert store.is_done("lora", 0, job)
    assert not store.is_done("lora", 0, {**job, "config": {"lr": 0.001, "method_options": {"r": 8}}})
    assert not store.is_done("lora", 1, job)
    assert [p.name for p in path.parent.iterdir()] == ["seed0.json"]  # no temporary file left behind


def test_json_has_no_nan(tmp_path):
    store = ResultStore(tmp_path)
    store.save("x", 0, {"metrics": {"pearson": float("nan")}})
    assert json.loads(store.path("x", 0).read_text())["metrics"]["pearson"] is None


def test_summary_means_and_sample_std_over_seeds():
    summary = summarize(RECORDS, ["full", "lora", "bitfit", "prefix", "missing"])
    assert [r["name"] for r in summary] == ["full", "lora", "bitfit", "prefix"]
    full = summary[0]
    assert full["metrics"]["accuracy"]["mean"] == pytest.approx(0.87)
    assert full["metrics"]["accuracy"]["std"] == pytest.approx(statistics.stdev([0.86, 0.88]))
    assert full["trainable_params"] == 22_713_986 and isinstance(full["trainable_params"], int)
    assert full["peak_rss_mib"] == pytest.approx(1400.5) and full["seeds"] == [0, 1]
    assert summary[3]["latency_merged_ms"] is None
    one = summarize([RECORDS[2]], ["lora"])[0]
    assert one["metrics"]["accuracy"] == {"mean": 0.85, "std": 0.0}


def test_csv_files_hold_the_summary_and_the_runs(tmp_path):
    summary = summarize(RECORDS, ["full", "lora", "bitfit", "prefix"])
    rows = list(csv.DictReader(io.StringIO(summary_csv(summary))))
    assert [r["name"] for r in rows] == ["full", "lora", "bitfit", "prefix"]
    assert float(rows[1]["accuracy_mean"]) == pytest.approx(0.845) and rows[3]["latency_merged_ms"] == ""
    runs = list(csv.DictReader(io.StringIO(runs_csv(RECORDS))))
    assert len(runs) == 8 and float(runs[0]["accuracy"]) == 0.86
    write_results(tmp_path, {"summary": summary, "records": RECORDS})
    assert {p.name for p in tmp_path.iterdir()} == {"results.json", "results.csv", "runs.csv"}


def test_pareto_front_on_hand_made_points():
    costs = [10, 20, 30, 40, 15, 50, None]
    quality = [0.5, 0.7, 0.6, 0.9, 0.5, 0.9, 1.0]
    # 30/0.6 is beaten by 20/0.7; 15/0.5 by 10/0.5; 50/0.9 by 40/0.9; None is never on the front
    assert pareto_front(costs, quality) == [0, 1, 3]
    # lower is better (perplexity): 10/0.5 is the best and cheapest
    assert pareto_front(costs, quality, greater_is_better=False) == [0]
    assert pareto_front([1, 1], [0.5, 0.5]) == [0, 1]  # equal points do not dominate each other
    assert pareto_front([], []) == []
    with pytest.raises(ValueError, match="2 costs but 1 qualities"):
        pareto_front([1, 2], [0.1])
