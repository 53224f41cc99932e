"""benchmarks/multi_train.py at tiny sizes: every contender runs real ``unipeft train`` processes and the report's
ratios follow its own figures."""

from __future__ import annotations


import pytest



@pytest.fixture(scope="module")
def multi_train(import_benchmark):
    return import_benchmark("multi_train")


def test_every_contender_at_tiny_sizes(multi_train, tiny_llama_folder, tmp_path):
    results = multi_train.main(["--model", tiny_llama_folder, "--jobs", "2", "--steps", "2", "--batch", "2",
                                "--seq", "128", "--threads", "1", "--jobs-per-pass", "1",
                                "--out", str(tmp_path / "r.json")])
    runs = {(r["jobs"], r["contender"]): r for r in results["runs"]}
    assert set(runs) == {(1, "multi"), (1, "sequential"), (2, "multi"), (2, "multi p=1"), (2, "sequential"),
                         (2, "processes")}
    for r in runs.values():
        assert r["train_s"] > 0 and r["tokens"] > 0 and r["peak_mib"] > 0
    assert runs[(2, "sequential")]["tokens"] == pytest.approx(runs[(2, "multi")]["tokens"])  # the same work
    assert runs[(2, "multi p=1")]["tokens"] == pytest.approx(runs[(2, "multi")]["tokens"])
    assert runs[(2, "processes")]["peak_mib"] > runs[(1, "sequential")]["peak_mib"]  # two bases resident
    multi = runs[(2, "multi")]
    assert multi["memory_vs_one_job"] == pytest.approx(multi["peak_mib"] / runs[(1, "sequential")]["peak_mib"])
    assert results["goal"]["jobs"] == 2 and (tmp_path / "r.json").is_file()
    assert results["goal"]["contender"] in ("multi", "multi p=1")
    assert all("goal_met" in runs[(2, name)] for name in ("multi", "multi p=1"))
