"""benchmarks/search_compare.py: the verdict of issue 14's goal follows from a bench folder's records (written here
as ``unipeft bench`` writes them): margin against the larger seed range, the budget filter, found vs shipped, and
methods of different seeds or steps refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest



@pytest.fixture(scope="module")
def search_compare(import_benchmark):
    return import_benchmark("search_compare")


def write(folder: Path, name: str, percent: float, values: list[float], steps: int = 150) -> None:
    for seed, value in enumerate(values):
        path = folder / "results" / name / f"seed{seed}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"name": name, "seed": seed, "main_metric": "accuracy", "greater_is_better": True,
                                    "metrics": {"accuracy": value, "loss": 0.4}, "trainable_percent": percent,
                                    "steps": steps}))


def test_the_verdict_follows_from_the_figures(tmp_path, search_compare, capsys):
    write(tmp_path, "lora", 0.33, [0.80, 0.81, 0.79])         # range 0.02
    write(tmp_path, "ssf", 0.23, [0.78, 0.79, 0.78])
    write(tmp_path, "houlsby", 0.99, [0.90, 0.90, 0.90])      # over the budget: not a competitor
    write(tmp_path, "found_a", 0.40, [0.83, 0.835, 0.84])     # mean 0.835: +0.035 > 0.02
    methods, metric, greater = search_compare.load_methods(tmp_path)
    verdict = search_compare.compare(methods, None, 0.5, greater)
    assert metric == "accuracy" and verdict["shipped"].name == "lora" and verdict["found"].name == "found_a"
    assert verdict["margin"] == pytest.approx(0.035) and verdict["spread"] == pytest.approx(0.02) and verdict["beats"]
    assert search_compare.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "verdict: the found recipe BEATS" in out and "houlsby" not in out

    write(tmp_path, "found_a", 0.40, [0.80, 0.83, 0.82])      # mean 0.8167: +0.0167 < its own range 0.03
    verdict = search_compare.compare(search_compare.load_methods(tmp_path)[0], None, 0.5, True)
    assert not verdict["beats"] and verdict["spread"] == pytest.approx(0.03)
    verdict = search_compare.compare(search_compare.load_methods(tmp_path)[0], None, 1.0, True)
    assert verdict["shipped"].name == "houlsby" and not verdict["beats"]  # a larger budget admits houlsby


def test_incomparable_folders_are_refused(tmp_path, search_compare):
    write(tmp_path, "lora", 0.33, [0.80, 0.81])
    write(tmp_path, "found_a", 0.40, [0.83, 0.84], steps=100)
    with pytest.raises(SystemExit, match="different seeds .* or steps"):
        search_compare.compare(search_compare.load_methods(tmp_path)[0], None, 0.5, True)
    with pytest.raises(SystemExit, match="need found and shipped"):
        search_compare.compare(search_compare.load_methods(tmp_path)[0], {"nothing"}, 0.5, True)
    with pytest.raises(SystemExit, match="no bench records"):
        search_compare.load_methods(tmp_path / "empty")
