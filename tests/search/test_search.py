"""The search end to end on a tiny random BERT and the real SST-2 data: the SQLite study, pruning, resuming, the
Pareto outputs, and front recipes that load and train; sampling respects the constraint."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import optuna
import pytest
import yaml

from unipeft.core.recipe import load_recipe
from unipeft.search import search, search_config_from_dict
from unipeft.search.probe import Probe
from unipeft.search.sample import suggest
from unipeft.train import train

MAX_PARAMS = 1500


def config_data(tmp_path: Path, model: str, data_dir: Path, **budget) -> dict:
    return {
        "train": {"model": model, "task": "sst2", "batch_size": 4, "eval_batch_size": 16, "max_length": 32,
                  "train_limit": 64, "eval_limit": 32, "threads": 1, "data_dir": str(data_dir)},
        "space": {"forms": {"lora": {"r": [2, 4], "lr": [5e-3, 1e-2]},
                            "bottleneck": {"size": [4, 32], "positions": [["ffn"]], "lr": [1e-2]}},
                  "positions": [["attn.q", "attn.v"], ["attn.q", "attn.k", "attn.v", "attn.o"]],
                  "layers": [None, [1]], "insertions": ["parallel", "sequential"], "compositions": ["add", "scaled"],
                  "scales": [2.0], "recipes": {"lora": 1e-2, "ia3": 1e-2}},
        "constraints": {"max_params": MAX_PARAMS},
        "budget": {"steps": 4, "eval_every": 2, "trials": 2, "parallel": 2, **budget},
        "sampler": "random", "output_dir": str(tmp_path / "search"), "seed": 1}


def test_sampled_points_respect_the_constraint(tmp_path, tiny_bert_folder, data_dir):
    """Every sampled point is a valid recipe that the probe measures; the constraint says over exactly when the
    count exceeds it (checked on 40 random points: some over, some within)."""
    config = search_config_from_dict(config_data(tmp_path, tiny_bert_folder, data_dir))
    probe = Probe(config.trial_config())
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    over = within = 0
    for i in range(40):
        candidate = suggest(study.ask(), config.space, name=f"p{i}")
        measured = probe.measure(candidate.recipe)
        reason = config.constraints.violation(measured.params, measured.total)
        assert (reason is not None) == (measured.params > MAX_PARAMS)
        over += reason is not None
        within += reason is None
    assert over and within


def test_a_search_trains_prunes_resumes_and_writes_its_front(tmp_path, tiny_bert_folder, data_dir):
    data = config_data(tmp_path, tiny_bert_folder, data_dir)
    outcome, paths = search(search_config_from_dict(data))
    out = tmp_path / "search"
    assert (out / "study.db").is_file() and len(outcome.trained_now) == 2
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'study.db'}")
    statuses = [t.user_attrs.get("status") for t in study.trials]
    assert sum(s in ("trained", "pruned") for s in statuses) == 2

    data["budget"]["trials"] = 4  # resume: the same study, two more trials
    outcome, paths = search(search_config_from_dict(data))
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'study.db'}")
    trained = [t for t in study.trials if t.user_attrs.get("status") in ("trained", "pruned")]
    assert len(trained) == 4 and len(outcome.trained_now) == 2
    for t in study.trials:  # the constraint held: over-budget points were never trained
        if t.user_attrs.get("status") == "infeasible":
            assert "reason" in t.user_attrs
        else:
            assert t.user_attrs["params"] <= MAX_PARAMS
    for t in trained:  # each trained trial reported its intermediate evaluation (step 2) to the pruner
        assert "eval_2" in t.user_attrs and t.user_attrs["steps"] in (2, 4)
        assert (t.user_attrs["status"] == "pruned") == (t.user_attrs["steps"] == 2)
    shadow = optuna.load_study(study_name="search:metric", storage=f"sqlite:///{out / 'study.db'}")
    assert len(shadow.trials) == 4 and all(2 in t.intermediate_values for t in shadow.trials)

    cost = json.loads(paths["json"].read_text())
    assert cost["trained"] + cost["pruned"] == 4 and len(cost["sessions"]) == 2
    assert cost["training_steps"] == sum(t.user_attrs["steps"] for t in trained) and cost["wall_time_s"] > 0
    rows = list(csv.DictReader(paths["csv"].open()))
    front = [t for t in study.best_trials if t.user_attrs.get("status") == "trained"]
    assert rows and len(rows) == len(front)
    assert paths["png"].stat().st_size > 1000 and "| trial |" in paths["md"].read_text()
    recipes = sorted(paths["recipes"].glob("*.yaml"))
    assert [r.stem for r in recipes] == sorted(r["trial"] for r in rows)
    bench = yaml.safe_load(paths["bench"].read_text())
    assert [m["name"] for m in bench["methods"]] == [r["trial"] for r in rows]

    first = recipes[0]
    load_recipe(first)  # loads
    trial = next(t for t in front if f"t{t.number:03d}" == first.stem)
    result = train(search_config_from_dict(data).trial_config(method=str(first), lr=trial.user_attrs["lr"],
                                                            output_dir=str(tmp_path / "again")))
    assert result.trainable_params == trial.user_attrs["params"]
    assert result.trainable_percent == pytest.approx(trial.user_attrs["percent"])  # the constraint's percentage
    assert result.metrics["accuracy"] == pytest.approx(trial.values[0], abs=1e-6)  # the same run, alone


def test_a_written_bench_spec_is_accepted_by_unipeft_bench(tmp_path, tiny_bert_folder, data_dir):
    from unipeft.bench import load_spec

    _, paths = search(search_config_from_dict(config_data(tmp_path, tiny_bert_folder, data_dir)))
    spec = load_spec(str(paths["bench"]))  # checks every method's recipe and training keys
    assert [m.name for m in spec.methods] == [p.stem for p in sorted(paths["recipes"].glob("*.yaml"))]


def test_a_shipped_recipe_and_the_same_point_sampled_form_by_form_are_one_point(tmp_path, tiny_bert_folder, data_dir):
    """``point_key`` sees through how a point was sampled: the shipped ssf and the ssf form at the shipped
    recipe's placement and learning rate train the same run, so the search trains it once."""
    from optuna.trial import FixedTrial

    from unipeft.search.driver import point_key

    data = config_data(tmp_path, tiny_bert_folder, data_dir)
    data["space"] = {"forms": {"ssf": {"lr": [5e-3], "positions": [SSF_POSITIONS], "insertions": ["sequential"]}},
                     "layers": [None], "compositions": ["add"], "recipes": {"ssf": 5e-3}}
    space = search_config_from_dict(data).space
    shipped = suggest(FixedTrial({"point": "recipe:ssf"}), space, name="a")
    sampled = suggest(FixedTrial({"point": "form:ssf", "ssf.positions": ",".join(SSF_POSITIONS), "ssf.layers": "all",
                                  "ssf.insertion": "sequential", "ssf.composition": "add", "ssf.lr": 5e-3}),
                      space, name="b")
    assert point_key(shipped) == point_key(sampled)

    data["budget"]["trials"] = 2  # two points asked for, one exists: it trains once, then the search stops
    outcome, _ = search(search_config_from_dict(data))
    study = outcome.study
    statuses = [t.user_attrs.get("status") for t in study.trials]
    assert statuses.count("trained") + statuses.count("pruned") == 1 and len(outcome.trained_now) == 1
    assert statuses.count("repeated") > 1 and outcome.stopped_early is not None
    first = next(t for t in study.trials if t.user_attrs.get("status") in ("trained", "pruned"))
    assert all(t.user_attrs["repeat_of"] == first.number for t in study.trials
               if t.user_attrs.get("status") == "repeated")


SSF_POSITIONS = ["attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.down", "norm"]


def test_a_multiplicative_point_is_sampled_without_a_composition(tmp_path, tiny_bert_folder, data_dir):
    """The composition is an additive delta's choice: an (IA)³ point never asks for one (so never two names for one
    model), an additive one still does."""
    from optuna.trial import FixedTrial

    data = config_data(tmp_path, tiny_bert_folder, data_dir)
    data["space"] = {"forms": {"ia3": {"lr": [1e-2], "positions": [["attn.k", "attn.v"]]},
                               "lora": {"r": [4], "lr": [1e-3]}},
                     "positions": [["attn.q", "attn.v"]], "layers": [None], "compositions": ["add", "scaled"],
                     "scales": [4.0], "insertions": ["parallel", "multiplicative_input"]}
    space = search_config_from_dict(data).space
    ia3 = suggest(FixedTrial({"point": "form:ia3", "ia3.positions": "attn.k,attn.v", "ia3.layers": "all",
                              "ia3.insertion": "multiplicative_input", "ia3.lr": 1e-2}), space, name="a")
    assert ia3.recipe.deltas[0].composition == "add" and ia3.recipe.deltas[0].scale == 1.0
    lora = suggest(FixedTrial({"point": "form:lora", "lora.r": 4, "lora.positions": "attn.q,attn.v",
                               "lora.layers": "all", "lora.insertion": "parallel", "lora.composition": "scaled",
                               "scale": 4.0, "lora.lr": 1e-3}), space, name="b")
    assert lora.recipe.deltas[0].composition == "scaled" and lora.recipe.deltas[0].scale == 4.0
