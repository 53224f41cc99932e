"""The optimizers: AdamW and bitsandbytes' 8-bit AdamW, and the paged ones refused off CUDA."""

from __future__ import annotations

import pytest
import torch

from unipeft.train.optim import make_optimizer

CPU = torch.device("cpu")


@pytest.mark.parametrize("name", ["adamw", "adamw_8bit"])
def test_optimizers_step_and_group_decay(name):
    w = torch.nn.Parameter(torch.randn(128, 64))  # 8,192 entries: large enough for 8-bit state
    b = torch.nn.Parameter(torch.zeros(64))
    opt = make_optimizer([w, b], name, lr=1e-2, weight_decay=0.1, device=CPU)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    before = w.detach().clone()
    (w.sum() + b.sum()).backward()
    opt.step()
    assert not torch.equal(before, w)
    if name == "adamw_8bit":
        assert opt.state[w]["state1"].dtype == torch.uint8  # the moments stored in 8 bits


def test_bad_optimizers_are_refused():
    w = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"unknown optimizer 'sgd'; valid: adamw, adamw_8bit, paged_adamw_8bit"):
        make_optimizer([w], "sgd", lr=1e-3, weight_decay=0.0, device=CPU)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"):
            make_optimizer([w], "paged_adamw_8bit", lr=1e-3, weight_decay=0.0, device=CPU)
