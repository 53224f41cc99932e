"""Device and precision choices: by capability, with clear refusals."""

from __future__ import annotations

import pytest
import torch

from unipeft.train.precision import autocast, native_bf16, resolve_device, resolve_precision

CPU = torch.device("cpu")


def test_auto_precision_follows_the_cpus_capability():
    # bf16 only where oneDNN multiplies it natively (AVX-512 BF16 / AMX); fp32 elsewhere: on either CPU kind
    assert resolve_precision("auto", CPU) == ("bf16" if native_bf16(CPU) else "fp32")
    for explicit in ("fp32", "bf16", "fp16"):
        assert resolve_precision(explicit, CPU) == explicit
    with pytest.raises(ValueError, match=r"unknown precision 'fp8'; valid: auto, fp32, bf16, fp16"):
        resolve_precision("fp8", CPU)


def test_devices():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match=r"unknown device 'gpu'; valid: auto, cpu, cuda, cuda:N"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda:0")


def test_autocast_contexts():
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    with autocast(CPU, "fp32"):
        assert (x @ w.t()).dtype == torch.float32
    with autocast(CPU, "bf16"):
        assert torch.nn.functional.linear(x, w).dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step(tiny_llama_folder):
    """On a GPU: one bf16/fp16 step on the device, trainable tensors in float32 there."""
    import unipeft
    from unipeft.models import load_model
    from unipeft.train.optim import make_optimizer
    from unipeft.train.precision import keep_trainable_fp32
    from unipeft.train.step import Stepper
    from tests.train.test_packing import examples

    device = torch.device("cuda")
    precision = resolve_precision("auto", device)
    model, _ = load_model(tiny_llama_folder, kind="causal_lm", dtype=torch.bfloat16)
    model.to(device).train()
    peft = unipeft.attach(model, "lora")
    keep_trainable_fp32(peft.trainable_parameters())
    optimizer = make_optimizer(peft.trainable_parameters(), "adamw_8bit", lr=1e-3, weight_decay=0.0, device=device)
    loss, _ = Stepper(peft=peft, device=device, precision=precision, causal=True, pad_id=0,
                      packing=True).step(examples(8), optimizer, 1, 2)
    assert torch.isfinite(torch.tensor(loss))
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in peft.trainable_parameters())
