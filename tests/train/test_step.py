"""One optimizer step: accumulation and checkpointing give the one-batch update, precisions keep fp32 masters."""

from __future__ import annotations

import pytest
import torch

import unipeft
from unipeft.models import load_model
from unipeft.train.optim import make_optimizer
from unipeft.train.precision import keep_trainable_fp32
from unipeft.train.step import Stepper, loss_units
from tests.train.test_packing import examples

CPU = torch.device("cpu")


def lm_setup(folder: str, dtype=torch.float32):
    model, _ = load_model(folder, kind="causal_lm", dtype=dtype)
    peft = unipeft.attach(model, "lora")
    with torch.no_grad():
        for p in peft.trainable_parameters():
            p.normal_(0, 0.1)
    keep_trainable_fp32(peft.trainable_parameters())
    model.train()
    return peft


def one_step(peft, batch, **options) -> tuple[float, list[torch.Tensor]]:
    stepper = Stepper(peft=peft, device=CPU, pad_id=0, causal=True, **{"precision": "fp32", **options})
    optimizer = make_optimizer(peft.trainable_parameters(), "adamw", lr=1e-2, weight_decay=0.0, device=CPU)
    loss, _ = stepper.step(batch, optimizer, 1, 10)
    return loss, [p.detach().clone() for p in peft.trainable_parameters()]


def test_loss_units():
    assert loss_units({"labels": 1}) == 1
    assert loss_units({"labels": [-100, -100, 5, 6, -100]}) == 2  # the first label is never predicted


@pytest.mark.parametrize("options", [{"grad_accum_steps": 3}, {"grad_accum_steps": 8}, {"packing": True},
                                     {"packing": True, "grad_accum_steps": 2}, {"loss_chunk": None},
                                     {"gradient_checkpointing": True, "grad_accum_steps": 2}])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_the_update_equals_one_batch(tiny_llama_folder, options, clip):
    """A step split into micro-batches, packed, with the whole head or recomputed activations: the same mean loss
    and adapter update as one plain batch."""
    batch = examples(8, seed=5)
    options = dict(options)
    torch.manual_seed(0)
    peft = lm_setup(tiny_llama_folder)
    if options.pop("gradient_checkpointing", False):
        peft.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss, params = one_step(peft, batch, max_grad_norm=clip, capacity=40, **options)
    torch.manual_seed(0)
    reference = lm_setup(tiny_llama_folder)
    ref_loss, ref_params = one_step(reference, batch, max_grad_norm=clip)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(params, [p.detach() for p in lm_setup_params(tiny_llama_folder)]))


def lm_setup_params(folder):
    torch.manual_seed(0)
    return lm_setup(folder).trainable_parameters()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_keeps_fp32_masters(tiny_llama_folder, precision):
    """The base is stored in the low precision, the adapter and its update in float32; fp16 scales the loss."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    torch.manual_seed(0)
    peft = lm_setup(tiny_llama_folder, dtype=dtype)
    before = [p.detach().clone() for p in peft.trainable_parameters()]
    stepper = Stepper(peft=peft, device=CPU, precision=precision, causal=True, pad_id=0)
    optimizer = make_optimizer(peft.trainable_parameters(), "adamw", lr=1e-2, weight_decay=0.0, device=CPU)
    loss, _ = stepper.step(examples(4), optimizer, 1, 10)
    assert torch.isfinite(torch.tensor(loss))
    assert all(p.dtype == torch.float32 for p in peft.trainable_parameters())
    assert peft.model.model.embed_tokens.weight.dtype == dtype
    assert stepper.scaler.is_enabled() == (precision == "fp16")
    assert any(not torch.equal(a, b) for a, b in zip(before, peft.trainable_parameters()))
    # close to the fp32 step's loss
    torch.manual_seed(0)
    ref_loss, _ = one_step(lm_setup(tiny_llama_folder), examples(4))
    assert loss == pytest.approx(ref_loss, rel=0.05)


def test_a_compiled_step_equals_the_eager_one(tiny_llama_folder):
    """compile (here the aot_eager backend: dynamo's graph capture and AOT autograd, without inductor's C++ build)
    gives the eager step's loss and update."""
    from torch._dynamo.utils import counters

    batch = examples(6, seed=3)
    torch.manual_seed(0)
    compiled = lm_setup(tiny_llama_folder)
    counters.clear()
    loss, params = one_step(compiled, batch, compile="aot_eager")
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo captured the forward
    torch.manual_seed(0)
    loss_eager, params_eager = one_step(lm_setup(tiny_llama_folder), batch)
    assert loss == pytest.approx(loss_eager, rel=1e-5)
    for a, b in zip(params, params_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_compile_settings_are_checked():
    from unipeft.train.step import check_compile

    check_compile(True), check_compile(False), check_compile("aot_eager")
    with pytest.raises(ValueError, match="compile must be true, false or a torch.compile backend .*inductor.*"
                                         "got 'turbo'"):
        check_compile("turbo")


@pytest.mark.slow
def test_an_inductor_compiled_step_equals_the_eager_one(tiny_llama_folder):
    """compile=True: inductor's generated C++ kernels, the same step to float32 rounding (slow: the C++ build)."""
    batch = examples(6, seed=3)
    torch.manual_seed(0)
    loss, params = one_step(lm_setup(tiny_llama_folder), batch, compile=True)
    torch.manual_seed(0)
    loss_eager, params_eager = one_step(lm_setup(tiny_llama_folder), batch)
    assert loss == pytest.approx(loss_eager, rel=1e-4)
    for a, b in zip(params, params_eager):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
