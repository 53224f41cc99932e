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
