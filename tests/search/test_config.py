"""The search config (unipeft.search.config): sections, overrides, constraints, and clear errors."""

from __future__ import annotations

import pytest

from unipeft.search.config import Constraints, load_search_config, search_config_from_dict

SPACE = {"forms": {"lora": {"r": [2, 4]}}, "positions": [["attn.q", "attn.v"]]}


def test_the_shipped_config_loads_with_overrides():
    config = load_search_config("configs/search_sst2.yaml", ["budget.trials=3", "train.task=rte",
                                                              "output_dir=runs/x", "constraints.max_percent=1"])
    assert config.budget.trials == 3 and config.train["task"] == "rte" and config.output_dir == "runs/x"
    assert config.constraints.max_percent == 1 and config.metric == "accuracy"
    assert config.trial_config(method="lora", lr=1e-3).max_steps == config.budget.steps


def test_constraints_say_what_is_over():
    assert Constraints(max_params=100).violation(100, 10_000) is None
    assert "101 trainable parameters > max_params 100" in Constraints(max_params=100).violation(101, 10_000)
    assert "0.600% trainable parameters > max_percent 0.5%" in Constraints(max_percent=0.5).violation(60, 10_000)


@pytest.mark.parametrize("data, match", [
    ({"space": SPACE, "budgett": {}}, r"unknown search key\(s\) budgett; valid keys: train, space"),
    ({}, r"needs a space"),
    ({"space": SPACE, "train": {"lr": 1e-3}}, r"train: lr are set per trial by the search"),
    ({"space": SPACE, "train": {"task": "sst3"}}, r"train: unknown task 'sst3'; valid tasks"),
    ({"space": SPACE, "train": {"task": "alpaca"}}, r"only labelled tasks"),
    ({"space": SPACE, "objectives": {"metric": "f2"}}, r"task 'sst2' has no metric 'f2'; its metrics: accuracy"),
    ({"space": SPACE, "objectives": {"cost": "money"}}, r"unknown cost 'money'; valid: params, time"),
    ({"space": SPACE, "budget": {"steps": 0}}, r"budget.steps must be a positive integer"),
    ({"space": SPACE, "budget": {"parallell": 2}}, r"budget: unknown key\(s\) parallell; valid: steps"),
    ({"space": SPACE, "sampler": "cmaes"}, r"unknown sampler 'cmaes'; valid: tpe, nsga2, random"),
    ({"space": SPACE, "pruner": "asha"}, r"unknown pruner 'asha'; valid: successive_halving, hyperband"),
    ({"space": SPACE, "constraints": {"max_percent": -1}}, r"max_percent must be a number > 0"),
])
def test_bad_configs_name_the_key_and_the_choices(data, match):
    with pytest.raises(ValueError, match=match):
        search_config_from_dict(data)


def test_bad_override():
    with pytest.raises(ValueError, match=r"unknown key 'budgt' in override"):
        load_search_config("configs/search_sst2.yaml", ["budgt.trials=3"])


def test_the_cli_refuses_bad_input_with_the_valid_choices(capsys):
    from unipeft.cli.main import main

    assert main(["search", "configs/search_sst2.yaml", "space.recipes=[mam]"]) == 2
    assert "recipe 'mam' uses prefix" in capsys.readouterr().err
    assert main(["search", "configs/search_sst2.yaml", "space.forms={lorra: {}}"]) == 2
    assert "unknown or unsearchable form 'lorra'; valid: bias, bottleneck" in capsys.readouterr().err
