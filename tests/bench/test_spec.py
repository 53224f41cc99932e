"""Bench specs and suites: parsing, the built-in suites, command-line changes, and errors that name the fix."""

from __future__ import annotations

import pytest
import yaml

from unipeft.bench import customize, load_spec, spec_from_dict, suite_names
from unipeft.bench.spec import MethodRun

BASE = {"name": "t", "train": {"model": "minilm", "task": "sst2", "max_steps": 5}, "methods": ["lora"]}


def test_every_builtin_suite_parses_and_builds_its_configs():
    assert {"nlu", "nlu_all", "nlg", "alpaca", "mt", "ablations"} <= set(suite_names())
    for name in suite_names():
        spec = load_spec(name)
        for method in spec.methods:
            config = spec.config(method, spec.seeds[0], "runs/x")
            assert config.method == method.method and config.model == spec.train["model"]


def test_nlu_suite_has_xu_and_xie_line_up():
    spec = load_spec("nlu")
    methods = {m.method for m in spec.methods}
    assert {"full", "houlsby", "pfeiffer", "parallel_adapter", "prefix", "prompt", "ia3", "bitfit", "lora", "adalora",
            "mam_glue", "unipelt"} <= methods
    assert spec.train["task"] == "sst2" and spec.train["model"] == "minilm"


def test_entry_forms():
    spec = spec_from_dict({**BASE, "methods": ["lora", {"ia3": {"lr": 0.01}},
                                                {"name": "lora16", "method": "lora", "method_options": {"r": 16}}]})
    assert [(m.name, m.method) for m in spec.methods] == [("lora", "lora"), ("ia3", "ia3"), ("lora16", "lora")]
    config = spec.config(spec.method("lora16"), 3, "out")
    assert config.method_options == {"r": 16} and config.seed == 3 and config.output_dir == "out"
    assert spec.config(spec.method("ia3"), 0, "o").lr == 0.01
    assert spec_from_dict(yaml.safe_load(yaml.safe_dump(spec.to_dict()))) == spec


@pytest.mark.parametrize("changes, message", [
    ({"bogus": 1}, "unknown bench key(s) bogus; valid keys: name, description, train, methods"),
    ({"methods": []}, "bench 't' has no methods"),
    ({"methods": ["lora", "lora"]}, "method names must be unique; repeated: lora"),
    ({"methods": ["loraa"]}, "method 'loraa': unknown method 'loraa'; built-in recipes:"),
    ({"methods": [{"lora": {"method_options": {"rr": 4}}}]}, "option(s) rr do not apply to recipe 'lora'"),
    ({"methods": [{"lora": {"model": "smollm2-135m"}}]}, "method 'lora': model cannot be set per method"),
    ({"methods": [{"lora": {"lrr": 1}}]}, "unknown key(s) lrr; valid keys:"),
    ({"train": {"model": "minilm", "seed": 1}}, "train: seed cannot be set here"),
    ({"train": {"task": "sst3"}}, "unknown task 'sst3'"),
    ({"seeds": [0, 0]}, "seeds must be distinct"),
    ({"seeds": [-1]}, "seeds must be a non-empty list of non-negative integers"),
    ({"latency": {"repeats": 0}}, "latency.repeats must be a positive integer"),
    ({"latency": {"warm": 1}}, "unknown latency key(s) warm"),
    ({"malloc_mmap_threshold": -1}, "malloc_mmap_threshold must be a non-negative integer (bytes) or null"),
    ({"methods": [3]}, "methods[0]: expected a recipe name"),
    ({"name": "a b"}, "bench name 'a b' must be letters"),
])
def test_invalid_specs_name_the_problem(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        spec_from_dict({**BASE, **changes})


def test_method_names_must_be_file_safe():
    with pytest.raises(ValueError, match="method name 'a/b' must be letters"):
        MethodRun(name="a/b", method="lora")


def test_load_spec_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown suite 'nluu'; built-in suites: ablations, alpaca, mt, nlg, nlu"):
        load_spec("nluu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_spec(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_spec(str(bad))


def test_customize_task_methods_seeds_and_sets():
    spec = customize(load_spec("nlu"), task="rte", methods=["lora", "full"], seeds=[1, 2],
                     sets=["max_steps=7", "eval_limit=10"])
    assert spec.name == "nlu_rte" and [m.name for m in spec.methods] == ["lora", "full"] and spec.seeds == (1, 2)
    config = spec.config(spec.methods[0], 1, "o")
    assert (config.task, config.max_steps, config.eval_limit) == ("rte", 7, 10)
    with pytest.raises(ValueError, match="unknown method 'nope' in bench 'nlu_sst2'; its methods: full, houlsby"):
        customize(load_spec("nlu"), methods=["nope"])
    with pytest.raises(ValueError, match="unknown key 'max_stepz'"):
        customize(load_spec("nlu"), sets=["max_stepz=3"])


def test_the_user_jsonl_example_parses():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "configs" / "bench_user_jsonl.yaml"
    spec = customize(load_spec(str(path)), sets=["jsonl.train_path=my/train.jsonl"])
    config = spec.config(spec.method("lora"), 1, "o")
    assert config.jsonl is not None and config.jsonl.train_path == "my/train.jsonl" and config.task == "reviews"
    assert config.jsonl.label_names == ("negative", "positive")


@pytest.mark.parametrize("name", ["search_sst2_baselines", "search_stsb_baselines"])
def test_search_comparison_configs_parse_and_their_found_recipes_load(name):
    """The comparisons of docs/search.md: every entry builds a config, every found recipe file is a valid recipe."""
    from pathlib import Path

    from unipeft.core.recipe import load_recipe

    root = Path(__file__).resolve().parents[2]
    spec = load_spec(root / "configs" / f"{name}.yaml")
    found = [m for m in spec.methods if m.name.startswith("found_")]
    assert len(found) >= 3 and list(spec.seeds) == [0, 1, 2]
    for method in spec.methods:
        config = spec.config(method, 0, "runs/x")
        assert config.max_steps == 150 and config.batch_size == 16
    for method in found:
        recipe = load_recipe(root / method.method)
        assert recipe.deltas and recipe.family == "unified", method.name
