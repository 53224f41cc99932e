"""The report: Markdown tables equal to the results data, the Pareto front, and plots that show the same numbers."""

from __future__ import annotations

import re

import pytest

from tests.bench.fake import RECORDS
from unipeft.bench import pareto_front, summarize
from unipeft.bench.plots import bars_figure, label_offsets, quality_figure
from unipeft.bench.report import fmt, render_report, write_report

ORDER = ["full", "lora", "bitfit", "prefix"]


def data():
    return {
        "spec": {"name": "t", "description": "a test", "train": {"model": "minilm", "task": "sst2"}, "seeds": [0, 1],
                 "methods": [{"name": n, "method": n} for n in ORDER], "latency": {}, "samples": 0},
        "command": "unipeft bench t.yaml", "started_at": "2026-11-23T00:00:00+00:00",
        "finished_at": "2026-11-23T01:00:00+00:00", "wall_time_s": 3600.0, "run_time_s": 3500.0,
        "load_average": {"start": [2.0, 2.0, 2.0], "end": [3.0, 2.5, 2.0]},
        "environment": {"versions": {"python": "3.11", "torch": "2.13.0"},
                        "machine": {"platform": "Linux", "cpu": "EPYC", "cpu_count": 2, "usable_cpus": 2,
                                    "memory_gib": 24.0, "cuda_device": None},
                        "git": {"commit": "abc", "dirty": False}, "load_average": [2.0, 2.0, 2.0]},
        "failures": [], "records": RECORDS, "summary": summarize(RECORDS, ORDER),
    }


def table_rows(markdown: str, first_header: str) -> list[dict[str, str]]:
    """The rows of the Markdown table whose header starts with ``first_header``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def test_results_table_equals_the_summary():
    d = data()
    rows = table_rows(render_report(d), "method")
    assert [r["method"] for r in rows] == ORDER
    for row, summary in zip(rows, d["summary"]):
        assert int(row["trainable params"].replace(",", "")) == summary["trainable_params"]
        assert float(row["trainable %"]) == pytest.approx(summary["trainable_percent"], abs=5e-5)
        assert float(row["peak RSS MiB"].replace(",", "")) == pytest.approx(summary["peak_rss_mib"], abs=0.5)
        assert float(row["train s"]) == pytest.approx(summary["train_time_s"], abs=0.05)
        mean, std = re.fullmatch(r"([\d.]+) ± ([\d.]+)", row["accuracy"]).groups()
        assert float(mean) == pytest.approx(summary["metrics"]["accuracy"]["mean"], abs=5e-5)
        assert float(std) == pytest.approx(summary["metrics"]["accuracy"]["std"], abs=5e-5)
        merged = summary["latency_merged_ms"]
        assert row["merged ms"] == ("–" if merged is None else fmt(merged, "f1"))
        assert row["seeds"] == "0,1"


def test_every_table_row_has_as_many_cells_as_its_header():
    lines = [line for line in render_report(data()).splitlines() if line.startswith("|")]
    header_cells = None
    for line in lines:
        cells = line.count("|")
        if line.startswith("|---"):
            continue
        if header_cells is None or line.startswith("| method |"):
            header_cells = cells
        assert cells == header_cells, line


def test_runs_table_has_every_record():
    rows = table_rows(render_report(data()), "method | seed")
    assert [(r["method"], int(r["seed"]), float(r["accuracy"])) for r in rows] == \
        [(r["name"], r["seed"], r["metrics"]["accuracy"]) for r in RECORDS]


def test_pareto_sentence_and_setup():
    d = data()
    text = render_report(d)
    # full (0.87, most params) is on the front; bitfit (0.805 at 100k) is beaten by lora (0.845 at 74k)
    assert "Pareto front of accuracy against trainable parameters: lora (0.8450 with 74,498 params), " \
           "full (0.8700 with 22,713,986 params)." in text
    assert "`unipeft bench t.yaml`" in text and "load average (1/5/15 min) at start [2.0, 2.0, 2.0]" in text
    assert "git: abc" in text and "torch 2.13.0" in text


def test_quality_plot_shows_the_table():
    summary = data()["summary"]
    fig = quality_figure(summary, "t")
    ax = fig.axes[0]
    points = next(line for line in ax.get_lines() if line.get_gid() == "methods")
    front = next(line for line in ax.get_lines() if line.get_gid() == "front")
    xs = [r["trainable_params"] for r in summary]
    ys = [r["metrics"]["accuracy"]["mean"] for r in summary]
    assert list(points.get_xdata()) == xs and list(points.get_ydata()) == pytest.approx(ys)
    idx = pareto_front(xs, ys)
    assert list(front.get_xdata()) == [xs[i] for i in idx]
    assert ax.get_xscale() == "log"


def test_bar_chart_shows_the_values():
    fig = bars_figure(["a", "b"], [10.0, None], "MiB", "t")
    ax = fig.axes[0]
    assert [p.get_width() for p in ax.patches] == [10.0, 0.0]
    labels = sorted(zip(ax.get_yticks(), (t.get_text() for t in ax.get_yticklabels())), reverse=True)
    assert [name for _, name in labels] == ["a", "b"]  # the first name on top
    assert {t.get_text() for t in ax.texts} == {"10", "n/a"}


def test_write_report_writes_markdown_and_small_pngs(tmp_path):
    path = write_report(tmp_path, data())
    assert path == tmp_path / "report.md" and path.read_text().startswith("# Benchmark `t`")
    for name in ("quality_vs_params.png", "memory.png", "time.png"):
        png = (tmp_path / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and 1000 < len(png) < 200_000
        assert f"]({name})" in path.read_text()


def _boxes(xs, ys, names, offsets, size=(480.0, 300.0)):
    import math
    us = [math.log10(x) for x in xs]
    px = [(u - min(us)) / ((max(us) - min(us)) or 1.0) * size[0] for u in us]
    py = [(y - min(ys)) / ((max(ys) - min(ys)) or 1.0) * size[1] for y in ys]
    return [(px[i] + dx, py[i] + dy, px[i] + dx + 4.2 * len(n), py[i] + dy + 9.0)
            for i, (n, (dx, dy)) in enumerate(zip(names, offsets))]


def test_point_labels_do_not_overlap():
    # ia3, compacter and bitfit of the NLU report: three points at almost the same place
    xs, ys = [14_594, 15_090, 26_114, 8_450, 22_713_986], [0.8028, 0.8028, 0.8028, 0.7053, 0.8360]
    names = ["ia3", "compacter", "bitfit", "prompt", "full"]
    offsets = label_offsets(xs, ys, names)
    boxes = _boxes(xs, ys, names, offsets)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
    assert offsets[3] == (4.0, 4.0) and offsets[4] == (4.0, 4.0)  # isolated labels stay where they were
    assert label_offsets([], [], []) == []


def test_setup_names_the_commit_of_resumed_runs():
    d = data()
    assert "git of each run" not in render_report(d)  # every run from this invocation's commit
    d["records"] = [dict(r, git={"commit": "abc", "dirty": False}) for r in d["records"]]
    assert "git of each run" not in render_report(d)
    d["records"][0] = dict(d["records"][0], git={"commit": "old", "dirty": True})
    first = d["records"][0]
    assert f"{first['name']} seed {first['seed']}: old (with uncommitted changes)" in render_report(d)
