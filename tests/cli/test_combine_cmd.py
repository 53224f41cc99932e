"""``unipeft combine`` on the real MiniLM: two saved adapters combined by ``cat`` compute the base plus the weighted sum
of their deltas; bad options end with one line and exit code 2."""

from __future__ import annotations

import torch

import unipeft
from unipeft.cli.main import main
from unipeft.models import load_model


def test_combine_two_saved_adapters(capsys, tmp_path):
    model, tokenizer = load_model("minilm", kind="base")
    batch = dict(tokenizer(["an utterly forgettable sequel"], return_tensors="pt"))
    peft = unipeft.attach(model, "lora", name="a")
    peft.add("lora", "b", r=4, positions=["attn.q", "ffn.up"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, placed in peft.delta_modules():
            placed.form.lora_B.normal_(0.0, 0.05, generator=g)
    paths = [str(peft.save(str(tmp_path / n), n)) for n in ("a", "b")]
    # the reference: the base with 0.7·ΔW_a + 0.3·ΔW_b merged in (scale the B factors, merge both)
    with torch.no_grad():
        for name, w in (("a", 0.7), ("b", 0.3)):
            for _, placed in peft.delta_modules(name):
                placed.form.lora_B.mul_(w)
    peft.merge("a", "b")
    with torch.no_grad():
        expected = peft.model(**batch).last_hidden_state

    code = main(["combine", "--model", "minilm", "--adapter", paths[0], "--adapter", paths[1], "--weights", "0.7",
                 "0.3", "--out", str(tmp_path / "ab")])
    assert code == 0 and "combined 2 adapters by cat" in capsys.readouterr().out
    combined = unipeft.load_adapter(peft.detach(), tmp_path / "ab")  # the base again (a and b unmerged, removed)
    assert combined.recipes["combined"].name == "combined-cat"
    with torch.no_grad():
        got = combined.model(**batch).last_hidden_state
    assert torch.allclose(got, expected, atol=1e-4)

    code = main(["combine", "--model", "minilm", "--adapter", paths[0], "--adapter", paths[1], "--method", "ties",
                 "--out", str(tmp_path / "t")])
    assert code == 2 and "method 'ties' needs a density in (0, 1]" in capsys.readouterr().err


def test_combine_two_classifiers_made_by_unipeft_train(capsys, tmp_path):
    """Two SST-2 adapters from ``unipeft train`` (LoRA + a trained copy of the classification head): refused without
    --copies (one line naming the choices), combined with --copies average (LoRA: the weighted sum; head: the mean),
    and with --copies 2 (the second adapter's head)."""
    from unipeft.methods.module_copy import ModuleCopy

    folders = []
    for seed in (0, 1):
        out = tmp_path / f"run{seed}"
        assert main(["train", "configs/sst2_lora.yaml", "max_steps=2", "train_limit=16", "eval_limit=8",
                     "batch_size=8", f"seed={seed}", f"output_dir={out}", "progress=false"]) == 0
        folders.append(str(out / "adapter"))
    capsys.readouterr()
    common = ["combine", "--model", "minilm", "--kind", "classification", "--adapter", folders[0], "--adapter",
              folders[1], "--weights", "0.5", "0.5"]
    assert main(common + ["--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert "module copies" in err and "'average'" in err and len(err.strip().splitlines()) == 1
    assert main(common + ["--copies", "average", "--out", str(tmp_path / "avg")]) == 0
    assert "module copies (classifier): average" in capsys.readouterr().out
    assert main(common + ["--copies", "2", "--out", str(tmp_path / "second")]) == 0

    model, _ = load_model("minilm", kind="classification", num_labels=2)
    peft = unipeft.load_adapter(model, folders[0], "a", activate=False)
    peft.load(folders[1], "b")
    peft.load(str(tmp_path / "avg"), "avg")
    peft.load(str(tmp_path / "second"), "second")

    def head(name):
        (form,) = [p.form for _, p in peft.delta_modules(name) if isinstance(p.form, ModuleCopy)]
        return form.module.weight.detach()

    torch.testing.assert_close(head("avg"), 0.5 * head("a") + 0.5 * head("b"), rtol=0, atol=1e-7)
    assert torch.equal(head("second"), head("b")) and not torch.equal(head("a"), head("b"))
