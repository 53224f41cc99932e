"""TrainConfig validation, YAML loading and key=value overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from unipeft.train.config import JsonlTaskConfig, TrainConfig, load_train_config, train_config_from_dict

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_are_valid():
    config = TrainConfig()
    assert config.task_spec().name == "sst2"
    assert train_config_from_dict(config.to_dict()) == config


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "model: minilm\ntask: rte\nmethod: lora\nmethod_options: {r: 4}\nlr: 1.0e-3\n")
    config = load_train_config(path, ["max_steps=50", "method_options.r=16", "method_options.alpha=32",
                                      "scheduler=cosine", "eval_every=null", "lr=3e-4"])
    assert config.task == "rte" and config.max_steps == 50 and config.scheduler == "cosine"
    assert config.method_options == {"r": 16, "alpha": 32}
    assert config.lr == pytest.approx(3e-4)  # YAML 1.1 reads "3e-4" as a string; it must still be a float
    assert config.eval_every is None


def test_override_list_value():
    config = load_train_config(None, ["method_options.positions=[attn.q, attn.k]"])
    assert config.method_options == {"positions": ["attn.q", "attn.k"]}


@pytest.mark.parametrize("overrides, match", [
    (["max_stepz=3"], r"unknown key 'max_stepz'.*valid keys: model, task"),
    (["max_steps"], r"bad override 'max_steps': use key=value"),
    (["scheduler=cosing"], r"unknown scheduler 'cosing'; valid: linear, cosine, constant"),
    (["task=sst3"], r"unknown task 'sst3'; valid tasks: sst2, cola"),
    (["method=lorra"], r"unknown method 'lorra'; built-in recipes: .*\blora\b"),
    (["resume=maybe"], r"resume must be true or false, got 'maybe'"),
    (["batch_size=0"], r"batch_size must be a positive integer"),
    (["lr=-1"], r"lr must be > 0"),
    (["warmup_ratio=1.5"], r"warmup_ratio must be in \[0, 1\)"),
    (["lr.x=1"], r"key 'lr' has no sub-keys"),
    (["max_steps=[1"], r"not valid YAML"),
    (["jsonl.train_pth=a.jsonl"], r"unknown jsonl\.key\(s\) train_pth; valid keys: train_path"),
    (["strategy=zero3"], r"unknown strategy 'zero3'; valid: ddp, fsdp"),
    (["compile=turbo"], r"compile must be true, false or a torch.compile backend \(.*inductor.*got 'turbo'"),
    (["compile=true", "strategy=fsdp"], r"compile is not supported with strategy fsdp"),
])
def test_bad_values_name_the_value_and_the_choices(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_train_config(None, overrides)


def test_unknown_key_in_yaml(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key\(s\) learning_rate; valid keys: .*\blr\b"):
        load_train_config(write(tmp_path, "learning_rate: 0.1\n"))


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_train_config(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_train_config(write(tmp_path, "- a\n- b\n"))


def test_jsonl_task(tmp_path):
    for name in ("train.jsonl", "eval.jsonl"):
        (tmp_path / name).write_text('{"text": "good", "label": "pos"}\n', encoding="utf-8")
    config = load_train_config(None, [
        "task=reviews", f"jsonl.train_path={tmp_path / 'train.jsonl'}", f"jsonl.eval_path={tmp_path / 'eval.jsonl'}",
        "jsonl.kind=classification", "jsonl.text_fields=[text]", "jsonl.label_field=label",
        "jsonl.label_names=[neg, pos]"])
    assert isinstance(config.jsonl, JsonlTaskConfig)
    spec = config.task_spec()
    assert spec.name == "reviews" and spec.num_labels == 2 and spec.label_names == ("neg", "pos")
    assert train_config_from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="jsonl.kind: unknown kind 'tagging'"):
        load_train_config(None, ["task=x", "jsonl.train_path=a", "jsonl.eval_path=b", "jsonl.kind=tagging"])


@pytest.mark.parametrize("name", ["sst2_lora.yaml", "alpaca_lora.yaml", "user_jsonl_example.yaml"])
def test_shipped_configs_load(name):
    config = load_train_config(CONFIGS / name)
    assert config.max_steps is not None and config.output_dir.startswith("runs/")
