"""Task registry, real-data loading, data-directory resolution and JSONL reading."""

from __future__ import annotations

import dataclasses
import gzip
import json
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

from unipeft.data import (
    DATA_DIR_ENV,
    TASKS,
    TaskSpec,
    default_data_dirs,
    get_task,
    jsonl_task,
    load_rows,
    load_split,
    read_jsonl,
    resolve_data_dir,
)
from unipeft.data import datadir

# (task, split) -> (rows, {label: count}) from the data README (the published GLUE figures).
GLUE_COUNTS = {
    ("sst2", "train"): (67349, {0: 29780, 1: 37569}),
    ("sst2", "validation"): (872, {0: 428, 1: 444}),
    ("cola", "train"): (8551, {0: 2528, 1: 6023}),
    ("cola", "validation"): (1043, {0: 322, 1: 721}),
    ("mrpc", "train"): (3668, {0: 1194, 1: 2474}),
    ("mrpc", "validation"): (408, {0: 129, 1: 279}),
    ("rte", "train"): (2490, {0: 1249, 1: 1241}),
    ("rte", "validation"): (277, {0: 146, 1: 131}),
}


# ---------------------------------------------------------------- registry


def test_registry_and_official_metrics() -> None:
    assert set(TASKS) == {"sst2", "cola", "mrpc", "rte", "stsb", "alpaca", "e2e", "ro_en"}
    expected = {
        "sst2": (("accuracy",), "accuracy"),
        "cola": (("matthews",), "matthews"),
        "mrpc": (("f1", "accuracy"), "f1"),
        "rte": (("accuracy",), "accuracy"),
        "stsb": (("pearson", "spearman"), "pearson"),
        "alpaca": (("perplexity",), "perplexity"),
    }
    for name, (metrics, main) in expected.items():
        spec = get_task(name)
        assert spec.name == name
        assert (spec.metrics, spec.main_metric) == (metrics, main)
    assert get_task("stsb").kind == "regression" and get_task("stsb").num_labels == 1
    assert get_task("mrpc").is_pair and not get_task("sst2").is_pair
    assert get_task("alpaca").kind == "causal_lm" and not get_task("alpaca").greater_is_better
    assert get_task("cola").greater_is_better


def test_get_task_unknown_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown task 'sst-2'.*sst2, cola, mrpc, rte, stsb, alpaca"):
        get_task("sst-2")


def test_taskspec_is_frozen_and_keyword_only() -> None:
    spec = get_task("sst2")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.num_labels = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        TaskSpec("x", "classification")  # type: ignore[misc]


_GOOD = dict(name="t", kind="classification", folder="f", text_fields=("s",), label_field="label",
             num_labels=2, metrics=("accuracy",), main_metric="accuracy")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kind": "ranking"}, "unknown kind 'ranking'; valid kinds: classification, regression, causal_lm"),
        ({"main_metric": "f1"}, "main_metric 'f1' is not one of its metrics: accuracy"),
        ({"metrics": ("pearson",), "main_metric": "pearson"}, "metric 'pearson' does not fit kind 'classification'"),
        ({"metrics": ("meteor",), "main_metric": "meteor"}, "'meteor' \\(unknown metric\\)"),
        ({"num_labels": 1}, "num_labels >= 2, got 1"),
        ({"text_fields": ("a", "b", "c")}, "one or two text_fields"),
        ({"label_field": None}, "needs a label_field"),
        ({"label_names": ("a", "b", "c")}, "3 label_names"),
        ({"train_path": "a.jsonl", "eval_path": "b.jsonl"}, "not both or neither"),
        ({"folder": None}, "not both or neither"),
        ({"eval_split": None}, "eval_holdout must be > 0"),
        ({"prompt_field": "q"}, "causal_lm/generation tasks only"),
    ],
)
def test_taskspec_validation_names_the_problem(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TaskSpec(**{**_GOOD, **changes})


def test_taskspec_validation_regression_and_causal_lm() -> None:
    with pytest.raises(ValueError, match="regression needs num_labels == 1, got 2"):
        TaskSpec(**{**_GOOD, "kind": "regression", "metrics": ("pearson",), "main_metric": "pearson"})
    with pytest.raises(ValueError, match="causal_lm needs prompt_field and response_field"):
        TaskSpec(name="lm", kind="causal_lm", folder="f", metrics=("perplexity",), main_metric="perplexity",
                 prompt_field="q")


# ---------------------------------------------------------------- real data


@pytest.mark.parametrize(("task", "split"), list(GLUE_COUNTS))
def test_glue_row_counts_and_labels(data_dir: Path, task: str, split: str) -> None:
    n_rows, label_counts = GLUE_COUNTS[(task, split)]
    spec = get_task(task)
    rows = load_split(spec.folder, split, data_dir)
    assert len(rows) == n_rows
    assert dict(Counter(r[spec.label_field] for r in rows)) == label_counts
    assert all(isinstance(r[f], str) and r[f] for r in rows[:50] for f in spec.text_fields)


def test_task_eval_rows_match_counts(data_dir: Path) -> None:
    expected = {"sst2": 872, "rte": 277, "mrpc": 408, "stsb": 1500, "cola": 1043}
    for name, n in expected.items():
        assert len(load_rows(get_task(name), "eval", data_dir)) == n
    assert len(load_rows(get_task("sst2"), "eval", data_dir, limit=10)) == 10


def test_stsb_labels_are_float_scores(data_dir: Path) -> None:
    for split, n in (("train", 5749), ("validation", 1500)):
        rows = load_split("glue/stsb", split, data_dir)
        assert len(rows) == n
        labels = [r["label"] for r in rows]
        assert all(isinstance(x, float) for x in labels)
        assert min(labels) == 0.0 and max(labels) == 5.0
        assert len(set(labels)) > 50  # continuous scores, not classes
        assert 2.0 < sum(labels) / n < 3.2


def test_alpaca_rows_and_holdout(data_dir: Path) -> None:
    spec = get_task("alpaca")
    everything = load_split(spec.folder, "train", data_dir)
    assert len(everything) == 5000
    assert set(everything[0]) >= {"instruction", "input", "output"}
    assert sum(1 for r in everything if r["input"]) == 1943  # README: 1,943 have a non-empty input
    train = load_rows(spec, "train", data_dir)
    held_out = load_rows(spec, "eval", data_dir)
    assert (len(train), len(held_out)) == (4800, 200)
    assert train + held_out == everything


# ---------------------------------------------------------------- data directory


def test_explicit_beats_env_beats_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit, env = tmp_path / "explicit", tmp_path / "env"
    explicit.mkdir()
    env.mkdir()
    monkeypatch.setenv(DATA_DIR_ENV, str(env))
    assert resolve_data_dir(explicit) == explicit.resolve()
    assert resolve_data_dir(str(explicit)) == explicit.resolve()
    assert resolve_data_dir() == env.resolve()


def test_defaults_order_and_cwd_parent_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    project = tmp_path / "work" / "project"
    sibling = tmp_path / "work" / "shared" / "data"
    inside = project / "shared" / "data"
    sibling.mkdir(parents=True)
    inside.mkdir(parents=True)
    monkeypatch.chdir(project)
    dirs = default_data_dirs()
    repo_root = Path(datadir.__file__).resolve().parents[3]
    assert dirs == [project / ".." / "shared" / "data", repo_root.parent / "shared" / "data",
                    project / "shared" / "data"]
    assert resolve_data_dir() == sibling.resolve()  # cwd/../shared/data comes first


def test_first_existing_default_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    b.mkdir()
    c.mkdir()
    monkeypatch.setattr(datadir, "default_data_dirs", lambda: [a, b, c])
    assert resolve_data_dir() == b.resolve()


def test_no_data_dir_error_names_every_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    missing = [tmp_path / "x", tmp_path / "y", tmp_path / "z"]
    monkeypatch.setattr(datadir, "default_data_dirs", lambda: missing)
    with pytest.raises(FileNotFoundError) as info:
        resolve_data_dir()
    message = str(info.value)
    for path in missing:
        assert str(path) in message
    assert DATA_DIR_ENV in message and "--data-dir" in message


def test_missing_explicit_or_env_dir_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="nope.*given explicitly"):
        resolve_data_dir(tmp_path / "nope")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "gone"))
    with pytest.raises(FileNotFoundError, match=f"gone.*{DATA_DIR_ENV}"):
        resolve_data_dir()


def test_load_split_missing_split_names_file_and_splits(data_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"glue/sst2/test\.jsonl\.gz.*train, validation"):
        load_split("glue/sst2", "test", data_dir)
    with pytest.raises(FileNotFoundError, match="has no splits"):
        load_split("glue/nosuchtask", "train", data_dir)


def _no_local_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(datadir, "default_data_dirs", lambda: [tmp_path / "none"])


def test_hub_fallback_uses_datasets_lazily(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_local_data(tmp_path, monkeypatch)
    calls = []

    def load_dataset(path: str, name: str | None, split: str) -> list[dict]:
        calls.append((path, name, split))
        return [{"idx": 0, "sentence": "fine ", "label": 1}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    rows = load_split("glue/sst2", "validation")
    assert rows == [{"idx": 0, "sentence": "fine ", "label": 1}]
    assert calls == [("nyu-mll/glue", "sst2", "validation")]
    # An explicit directory that does not exist is an error, never a silent hub download.
    with pytest.raises(FileNotFoundError, match="given explicitly"):
        load_split("glue/sst2", "validation", tmp_path / "typo")
    assert len(calls) == 1


def test_no_fallback_without_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_local_data(tmp_path, monkeypatch)
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(FileNotFoundError, match=DATA_DIR_ENV):
        load_split("glue/sst2", "validation")


# ---------------------------------------------------------------- JSONL files and user tasks


def _write_jsonl(path: Path, rows: list[dict], gz: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_read_jsonl_plain_gzip_and_blank_lines(tmp_path: Path) -> None:
    rows = [{"text": "héllo", "label": 1}, {"text": "b", "label": 0}]
    assert read_jsonl(_write_jsonl(tmp_path / "a.jsonl.gz", rows, gz=True)) == rows
    plain = _write_jsonl(tmp_path / "a.jsonl", rows)
    plain.write_text(plain.read_text(encoding="utf-8") + "\n\n", encoding="utf-8")
    assert read_jsonl(plain) == rows


def test_read_jsonl_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_jsonl(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n{"a": 2}\n{"a": \n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 3 is not valid JSON"):
        read_jsonl(bad)
    bad.write_text('{"a": 1}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2 is a JSON list"):
        read_jsonl(bad)


def test_jsonl_task_classification(tmp_path: Path) -> None:
    train = _write_jsonl(tmp_path / "train.jsonl", [{"q": "a", "y": "spam"}, {"q": "b", "y": "ham"}])
    dev = _write_jsonl(tmp_path / "dev.jsonl.gz", [{"q": "c", "y": "ham"}], gz=True)
    spec = jsonl_task(train_path=train, eval_path=dev, kind="classification", text_fields=("q",),
                      label_field="y", label_names=("ham", "spam"))
    assert (spec.num_labels, spec.metrics, spec.main_metric) == (2, ("accuracy", "f1", "matthews"), "accuracy")
    assert load_rows(spec, "train") == [{"q": "a", "y": "spam"}, {"q": "b", "y": "ham"}]
    assert load_rows(spec, "eval") == [{"q": "c", "y": "ham"}]
    with pytest.raises(ValueError, match="which must be 'train' or 'eval'"):
        load_rows(spec, "test")  # type: ignore[arg-type]


def test_jsonl_task_regression_and_causal_lm_defaults(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"a": "x", "b": "y", "s": 0.5}])
    reg = jsonl_task(train_path=path, eval_path=path, kind="regression", text_fields=("a", "b"), label_field="s")
    assert (reg.num_labels, reg.metrics, reg.main_metric) == (1, ("pearson", "spearman"), "pearson")
    lm = jsonl_task(train_path=path, eval_path=path, kind="causal_lm", prompt_field="a", response_field="b")
    assert (lm.num_labels, lm.main_metric, lm.input_field) == (0, "perplexity", None)


def test_jsonl_task_missing_file_and_bad_mapping(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"a": "x"}])
    with pytest.raises(FileNotFoundError, match="nothere.jsonl"):
        jsonl_task(train_path=tmp_path / "nothere.jsonl", eval_path=path, kind="regression",
                   text_fields=("a",), label_field="s")
    with pytest.raises(ValueError, match="classification needs num_labels >= 2, got 0"):
        jsonl_task(train_path=path, eval_path=path, kind="classification", text_fields=("a",), label_field="y")
