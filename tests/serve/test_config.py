"""ServeConfig and its YAML file: bad values and unknown keys are refused naming them; the CLI's --adapter syntax."""

from __future__ import annotations

import pytest
import torch

from unipeft.cli.main import main
from unipeft.serve import resolve_dtype
from unipeft.serve.config import ServeConfig, load_serve_config


@pytest.mark.parametrize("kwargs, words", [
    ({"device": "tpu"}, ["tpu", "auto, cpu, cuda"]),
    ({"dtype": "bf16"}, ["'bf16'", "auto, float32, bfloat16, float16"]),
    ({"max_batch": 0}, ["max_batch", ">= 1"]),
    ({"prefill_tokens": 0}, ["prefill_tokens", ">= 1", "got 0"]),
    ({"port": 70000}, ["port"]),
    ({"adapters": {"a/b": "x"}}, ["a/b"]),
    ({"adapters": {"a": "x", "b": "y"}, "max_resident": 1}, ["pinned", "max_resident is 1"]),
])
def test_bad_values_are_refused(kwargs, words):
    with pytest.raises(ValueError) as err:
        ServeConfig(**kwargs)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_yaml_config_reads_the_same_keys(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("model: smollm2-135m\nadapters: {a: runs/a}\nmax_batch: 4\n")
    config = load_serve_config(path)
    assert config.adapters == {"a": "runs/a"} and config.max_batch == 4 and config.host == "127.0.0.1"
    path.write_text("modle: x\n")
    with pytest.raises(ValueError, match="unknown serve config key.*modle.*valid:.*model"):
        load_serve_config(path)


def test_cli_refuses_a_bad_adapter_argument(capsys):
    assert main(["serve", "--adapter", "no-equals-sign"]) == 2
    assert "--adapter takes NAME=PATH" in capsys.readouterr().err


def test_cli_prefill_tokens_reaches_the_config_and_a_bad_one_is_refused(capsys):
    """``--prefill-tokens`` is checked like the config key (before any model loads): 0 names the key and the bound."""
    assert main(["serve", "--prefill-tokens", "0"]) == 2
    assert "prefill_tokens must be >= 1, got 0" in capsys.readouterr().err


def test_cli_refuses_an_unknown_dtype(capsys):
    assert main(["serve", "--dtype", "fp8"]) == 2
    err = capsys.readouterr().err
    assert "'fp8'" in err and "bfloat16" in err


@pytest.mark.parametrize("native, device, want", [
    (True, "cpu", torch.bfloat16), (False, "cpu", torch.float32), (False, "cuda", torch.float16),
])
def test_auto_dtype_follows_the_devices_capability(monkeypatch, native, device, want):
    """``auto`` is bf16 only where the device multiplies it natively (measured 2.7x fp32 on such a CPU, 23-31x
    slower on one without), never assumed; an explicit dtype is taken as it is."""
    monkeypatch.setattr("unipeft.train.precision.native_bf16", lambda _: native)
    assert resolve_dtype("auto", torch.device(device)) == want
    assert resolve_dtype("float32", torch.device(device)) == torch.float32
