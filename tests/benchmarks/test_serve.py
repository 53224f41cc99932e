"""benchmarks/serve.py at a small size: both ``unipeft serve`` modes and HF peft's static batches really run on
SmolLM2 with two adapters, and the report's ratios follow its own figures."""

from __future__ import annotations

import importlib.util
from collections import Counter

import pytest

from tests.benchmarks.conftest import BENCHMARKS


@pytest.fixture(scope="module")
def serve_bench():
    """benchmarks/serve.py by its path: the name ``serve`` is the tests/serve package's under pytest."""
    spec = importlib.util.spec_from_file_location("unipeft_bench_serve", BENCHMARKS / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_workload_follows_the_popularity_mixes(serve_bench):
    distinct = serve_bench.workload("distinct", 4, 8)
    assert [a for a, _, _ in distinct] == ["a0", "a1", "a2", "a3"] * 2
    assert {a for a, _, _ in serve_bench.workload("identical", 4, 8)} == {"a0"}
    skewed = Counter(a for a, _, _ in serve_bench.workload("skewed", 8, 200))
    assert skewed.most_common(1)[0][0] == "a0" and skewed["a0"] > 200 / 8 * 2  # a few adapters get most requests
    assert {t for _, _, t in serve_bench.workload("uniform", 4, 50)} <= {8, 16, 24, 32}
    assert serve_bench.workload("uniform", 4, 20) == serve_bench.workload("uniform", 4, 20)  # seeded


def test_every_contender_runs_and_the_ratios_are_its_own(serve_bench, tmp_path):
    results = serve_bench.main(["--adapters", "2", "--requests", "4", "--batch", "2", "--mixes", "distinct",
                                "identical", "--rounds", "2", "--dtype", "float32", "--out", str(tmp_path / "r.json")])
    assert results["setup"]["dtype_used"] == "float32"
    for mode in ("mixed", "one adapter per step", "hf peft static"):
        for mix in ("distinct", "identical"):
            run = results[f"{mode} / {mix}"]
            assert run["wall_s"] > 0 and len(run["rounds_tokens_per_s"]) == 2
            assert run["tokens_per_s"] == pytest.approx(sum(run["rounds_tokens_per_s"]) / 2)  # the median of two
    streamed = results["mixed / distinct"]
    assert 0 < streamed["ttft_p50_s"] <= streamed["ttft_p99_s"] < streamed["wall_s"]
    ratio = results["ratios"]["distinct"]
    assert ratio["mixed/hf_static"] == pytest.approx(
        streamed["tokens_per_s"] / results["hf peft static / distinct"]["tokens_per_s"])
    assert ratio["mixed/mixed_identical"] == pytest.approx(
        streamed["tokens_per_s"] / results["mixed / identical"]["tokens_per_s"])
    assert (tmp_path / "r.json").is_file()


def test_modes_picks_the_contenders_and_ratios_without_their_peer_are_none(serve_bench):
    """``--modes`` runs only the named contenders; a ratio whose peer did not run is None, not made up."""
    results = serve_bench.main(["--adapters", "2", "--requests", "2", "--batch", "2", "--mixes", "distinct",
                                "--rounds", "1", "--dtype", "float32", "--modes", "mixed", "hf peft static"])
    assert "one adapter per step / distinct" not in results
    ratio = results["ratios"]["distinct"]
    assert ratio["mixed/one_per_step"] is None and ratio["mixed/mixed_identical"] is None
    assert ratio["mixed/hf_static"] == pytest.approx(
        results["mixed / distinct"]["tokens_per_s"] / results["hf peft static / distinct"]["tokens_per_s"])
