"""The one rollback mechanism (unipeft.core.transaction.adding): all adapters added in a failed block are gone, the
active ones are as before, and a handle the block (or a nested one) created is detached."""

from __future__ import annotations

import pytest
import torch

import unipeft
from unipeft.core.adapted import find_handle
from unipeft.core.transaction import adding


def test_a_failed_block_on_a_bare_model_leaves_it_bare(tiny):
    model = tiny.model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"):
        with adding(model) as tx:
            tx.handle.add("lora", "a")
            with adding(model) as inner:  # a nested block shares the handle
                inner.handle.add("ia3", "b")
            raise RuntimeError("boom")
    assert find_handle(model) is None
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_failed_block_keeps_what_was_there(tiny):
    model = tiny.model("llama")
    peft = unipeft.attach(model, "lora", name="kept")
    with pytest.raises(ValueError):
        with adding(model) as tx:
            assert tx.handle is peft
            tx.handle.add("ia3", "new")
            tx.handle.set_active("new")
            tx.handle.add("lora", "bad", positions=["nowhere"])
    assert list(peft.recipes) == ["kept"] and peft.active == ["kept"]


def test_a_block_that_succeeds_keeps_everything(tiny):
    model = tiny.model("llama")
    with adding(model) as tx:
        tx.handle.add("lora", "a")
    assert isinstance(find_handle(model), unipeft.Peft) and list(find_handle(model).recipes) == ["a"]
