"""``unipeft convert``: HF peft adapter → unipeft adapter → HF peft adapter on the real MiniLM, same outputs."""

from __future__ import annotations

import argparse
import copy

import pytest
import torch

import unipeft
from unipeft.cli import convert

peft = pytest.importorskip("peft")


def _convert(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="unipeft")
    convert.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["convert", *argv])
    return args.run(args)


def test_convert_both_ways_keeps_the_outputs(tmp_path, capsys):
    from unipeft.models import load_model

    model, tokenizer = load_model("minilm", kind="classification", num_labels=3)
    batch = dict(tokenizer(["a gripping film", "flat and dull"], padding=True, return_tensors="pt"))
    hf_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
    with torch.no_grad():
        for p in hf_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
        want = hf_model.eval()(**batch).logits
    hf_model.save_pretrained(tmp_path / "hf")

    assert _convert("--model", "minilm", "--in", str(tmp_path / "hf"), "--out", str(tmp_path / "u"),
                    "--to", "unipeft") == 0
    assert "converted" in capsys.readouterr().out
    base, _ = load_model("minilm", kind="classification", num_labels=3, seed=1)  # another head: the adapter's wins
    handle = unipeft.load_adapter(base, tmp_path / "u")
    with torch.no_grad():
        assert (handle.model(**batch).logits - want).abs().max() <= 1e-5

    assert _convert("--model", "minilm", "--in", str(tmp_path / "u"), "--out", str(tmp_path / "hf2"),
                    "--to", "hf") == 0
    again = peft.PeftModel.from_pretrained(load_model("minilm", kind="classification", num_labels=3)[0],
                                           tmp_path / "hf2").eval()
    with torch.no_grad():
        assert (again(**batch).logits - want).abs().max() <= 1e-5


def test_convert_refuses_the_same_format(tmp_path, tiny):
    handle = unipeft.attach(tiny.model("llama"), "lora")
    handle.save(tmp_path / "u")
    with pytest.raises(ValueError, match="already a unipeft adapter"):
        _convert("--model", "minilm", "--in", str(tmp_path / "u"), "--out", str(tmp_path / "x"), "--to", "unipeft")


def test_convert_refusal_is_one_line_and_exit_code_2(tmp_path, capsys):
    from unipeft.cli.main import main
    from unipeft.models import load_model

    model, _ = load_model("minilm", kind="classification")
    unipeft.attach(model, "houlsby").save(tmp_path / "u")
    code = main(["convert", "--model", "minilm", "--in", str(tmp_path / "u"), "--out", str(tmp_path / "hf"),
                 "--to", "hf"])
    err = capsys.readouterr().err
    assert code == 2 and "bottleneck" in err and "HF peft has no bottleneck" in err
    assert not (tmp_path / "hf").exists()
