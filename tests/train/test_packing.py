"""Packing: first-fit rows, per-example positions, and the packed loss equal to the unpacked loss."""

from __future__ import annotations

import pytest
import torch

import unipeft
from unipeft.data import collate
from unipeft.models import load_model
from unipeft.train.lm_loss import causal_lm_loss_sum
from unipeft.train.packing import pack, pack_rows


def test_pack_rows_first_fit_decreasing():
    assert pack_rows([5, 3, 4, 2, 6], capacity=8) == [[4, 3], [0, 1], [2]]
    assert pack_rows([10, 1], capacity=4) == [[0], [1]]  # too long: a row of its own


def examples(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(4, 20, (1,), generator=g))
        prompt = int(torch.randint(1, length - 1, (1,), generator=g))
        ids = torch.randint(5, 1000, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * length,
                    "labels": [-100] * prompt + ids[prompt:]})
    return out


def test_pack_layout():
    ex = examples(6)
    packed = pack(ex, pad_token_id=0, capacity=32)
    assert set(packed) == {"input_ids", "labels", "position_ids"}
    rows = pack_rows([len(e["input_ids"]) for e in ex], 32)
    assert packed["input_ids"].shape[0] == len(rows) < len(ex)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(ex[i]["input_ids"])
            assert packed["input_ids"][r, at:at + n].tolist() == ex[i]["input_ids"]
            assert packed["position_ids"][r, at:at + n].tolist() == list(range(n))
            assert packed["labels"][r, at] == -100
            at += n
    with pytest.raises(ValueError, match="token-level labels"):
        pack([{"input_ids": [1, 2], "labels": 1}], 0, 8)


def test_the_packed_loss_equals_the_unpacked_loss(tiny_llama_folder):
    """No packed example sees another: the summed loss and the adapter's gradient are the unpacked ones."""
    model, _ = load_model(tiny_llama_folder, kind="causal_lm")
    peft = unipeft.attach(model, "lora")
    with torch.no_grad():  # a non-zero B so that the adapter changes the outputs
        for p in peft.trainable_parameters():
            p.normal_(0, 0.1)
    ex = examples(8, seed=3)
    packed = pack(ex, pad_token_id=0, capacity=40)
    assert packed["input_ids"].shape[0] < len(ex)
    unpacked = causal_lm_loss_sum(model, collate(ex, 0))
    got = causal_lm_loss_sum(model, packed)
    torch.testing.assert_close(got, unpacked, rtol=1e-5, atol=1e-5)
    g_packed = torch.autograd.grad(got, peft.trainable_parameters())
    g_unpacked = torch.autograd.grad(unpacked, peft.trainable_parameters())
    for a, b in zip(g_packed, g_unpacked):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
