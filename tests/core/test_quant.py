"""Quantized bases (bitsandbytes 4-bit NF4 and 8-bit LLM.int8() on CPU): QLoRA attaches, trains and merges.

The merge references are computed here straight from bitsandbytes' functional API: Q(Deq(Q(W₀)) + Σ ΔW).
"""

from __future__ import annotations

import math

import pytest
import torch

import unipeft
from unipeft.core.quant import is_quantized, weight_shape
from unipeft.ops.safe_merge import MergeCheckError

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

BITS = (4, 8)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> str:
    """A random LLaMA of width 64 saved as a Hugging Face folder (4-bit blocks of 64 need widths of 64)."""
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("llama64")
    model.save_pretrained(folder)
    return str(folder)


def load(folder: str, bits: int | None, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The model, quantized with bitsandbytes through transformers' own loading path (None: not quantized)."""
    kwargs = {}
    if bits == 4:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    elif bits == 8:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(load_in_8bit=True)
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=dtype, device_map="cpu", **kwargs)
    return model.eval()


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(seed))


def randomize(peft, name: str | None = None, std: float = 0.05, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, placed in peft.delta_modules(name):
            for p in placed.parameters():
                p.add_(torch.randn(p.shape, generator=g) * std)


def codes(module: torch.nn.Module) -> torch.Tensor:
    return module.weight.data.clone()


def reference_codes(module: torch.nn.Module, weight: torch.Tensor, bits: int) -> torch.Tensor:
    """bitsandbytes' own quantization of a float (out, in) weight, as the layer would store it."""
    if bits == 4:
        old = module.weight
        return bnb.functional.quantize_4bit(weight, blocksize=old.blocksize, quant_type=old.quant_type,
                                            compress_statistics=old.compress_statistics,
                                            quant_storage=old.quant_storage)[0]
    return bnb.functional.int8_vectorwise_quant(weight.half())[0]


def dequantized(module: torch.nn.Module, bits: int) -> torch.Tensor:
    weight = module.weight
    if bits == 4:
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    scales = weight.SCB if weight.SCB is not None else module.state.SCB
    return bnb.functional.int8_vectorwise_dequant(weight.data, scales).float()


def q_proj(model: torch.nn.Module) -> torch.nn.Module:
    """Layer 0's query projection as the base model holds it (through a DeltaSite when adapted)."""
    module = model.model.layers[0].self_attn.q_proj
    return getattr(module, "base", module)


@pytest.mark.parametrize("bits", BITS)
def test_qlora_positions_resolve_through_quantized_layers(llama_folder, bits):
    model = load(llama_folder, bits)
    before = model(input_ids=ids()).logits
    peft = unipeft.attach(model, "lora", r=4)
    record = peft.records["default"][0]
    base = peft.model.get_submodule(record.site.module).base
    assert is_quantized(base) and type(base).__name__ == ("Linear4bit" if bits == 4 else "Linear8bitLt")
    assert record.base_shape == weight_shape(base) == (base.out_features, base.in_features)
    assert {r.site.position for r in peft.records["default"]} == {"attn.q", "attn.v"}
    torch.testing.assert_close(model(input_ids=ids()).logits, before, rtol=0, atol=0)  # B = 0 at init


@pytest.mark.parametrize("bits", BITS)
def test_qlora_trains_the_adapter_only(llama_folder, bits):
    model = load(llama_folder, bits)
    peft = unipeft.attach(model, "lora", r=4)
    base_before = {k: v.clone() for k, v in peft.base_state_dict().items()}
    lora_before = {k: v.clone() for k, v in peft.adapter_state_dict("default").items()}
    optimizer = torch.optim.AdamW(peft.trainable_parameters(), lr=1e-2)
    batch = ids()
    model.train()
    losses = []
    for _ in range(6):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses
    for key, tensor in peft.base_state_dict().items():
        assert torch.equal(tensor, base_before[key]), key
    assert all(not torch.equal(v, lora_before[k]) for k, v in peft.adapter_state_dict("default").items()
               if k.endswith("lora_B"))


@pytest.mark.parametrize("bits", BITS)
def test_merge_is_requantized_sum_and_unmerge_restores_codes(llama_folder, bits):
    model = load(llama_folder, bits)
    original = codes(q_proj(model))
    w0 = dequantized(q_proj(model), bits)
    peft = unipeft.attach(model, "lora", r=4)
    peft.add("lora", "b", r=4)
    randomize(peft, seed=1)
    delta = {n: next(p for m, p in peft.delta_modules(n) if m.endswith("layers.0.self_attn.q_proj")).form
             for n in ("default", "b")}

    peft.merge("default")
    expected = reference_codes(q_proj(model), w0 + delta["default"].delta_weight().detach(), bits)
    assert torch.equal(codes(q_proj(model)), expected)

    peft.merge("b")  # no accumulated rounding: recomputed from the original codes
    both = w0 + delta["default"].delta_weight().detach() + delta["b"].delta_weight().detach()
    assert torch.equal(codes(q_proj(model)), reference_codes(q_proj(model), both, bits))

    peft.unmerge("default")
    only_b = w0 + delta["b"].delta_weight().detach()
    assert torch.equal(codes(q_proj(model)), reference_codes(q_proj(model), only_b, bits))

    peft.unmerge()
    assert peft.merged == []
    assert torch.equal(codes(q_proj(model)), original)


@pytest.mark.parametrize("bits", BITS)
def test_checked_merge_measures_rounding_and_undoes_on_failure(llama_folder, bits):
    model = load(llama_folder, bits)
    peft = unipeft.attach(model, "lora", r=4)
    randomize(peft)
    batch = {"input_ids": ids(3)}
    unmerged = model(**batch).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}

    with pytest.raises(MergeCheckError, match="tolerance") as failed:
        peft.merge(check=True, tolerance=1e-6, probe=batch)
    assert peft.merged == []
    assert failed.value.errors["model"] > 1e-6  # quantization makes the merge inexact
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[key]), key

    errors = peft.merge(check=True, tolerance=10.0, probe=batch)
    assert peft.merged == ["default"]
    merged = model(**batch).logits
    assert errors["model"] == pytest.approx((merged - unmerged).abs().max().item(), rel=1e-5)
    assert 0 < errors["model"] < 0.5


def test_forms_that_read_the_base_weight_are_refused(llama_folder):
    model = load(llama_folder, 4)
    with pytest.raises(ValueError, match="quantized"):
        unipeft.attach(model, "dora")
    with pytest.raises(ValueError, match="quantized"):
        unipeft.attach(model, "pissa")
    assert not hasattr(model, "_unipeft_handle") or model.__dict__.get("_unipeft_handle") is None


def test_qlora_adapter_loads_onto_the_float_base(llama_folder, tmp_path):
    model = load(llama_folder, 4)
    peft = unipeft.attach(model, "lora", r=4)
    randomize(peft)
    peft.save(str(tmp_path / "qlora"))
    full = load(llama_folder, None)
    loaded = unipeft.load_adapter(full, str(tmp_path / "qlora"))
    for key, tensor in peft.adapter_state_dict("default").items():
        assert torch.equal(loaded.adapter_state_dict("default")[key], tensor)
    assert loaded.active == ["default"]


def test_dequantizing_an_adapted_model_makes_the_merge_exact(llama_folder):
    """transformers' ``model.dequantize()`` swaps the bitsandbytes layers (inside unipeft's sites too) for float ones
    holding Deq(Q(W)): the function the adapter was trained against, into which it then merges exactly."""
    model = load(llama_folder, 4)
    peft = unipeft.attach(model, "lora", r=4)
    randomize(peft)
    unmerged = model(input_ids=ids()).logits
    model.dequantize()
    assert not any(is_quantized(m) for m in model.modules())
    torch.testing.assert_close(model(input_ids=ids()).logits, unmerged, rtol=0, atol=0)
    errors = peft.merge(check=True, tolerance=1e-5)
    assert max(errors.values()) < 1e-5
    torch.testing.assert_close(model(input_ids=ids()).logits, unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", BITS)
def test_bfloat16_qlora_runs_its_deltas_in_the_compute_dtype(llama_folder, bits):
    model = load(llama_folder, bits, dtype=torch.bfloat16)
    peft = unipeft.attach(model, "lora", r=4)
    assert {p.dtype for p in peft.trainable_parameters()} == {torch.bfloat16}
    randomize(peft)
    batch = ids()
    out = model(input_ids=batch, labels=batch)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16
    assert all(p.grad is not None for p in peft.trainable_parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    errors = peft.merge(check=True, tolerance=float("inf"))
    assert not any(math.isnan(e) for e in errors.values())  # probes ran (in bfloat16) and gave numbers
    peft.unmerge()
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[key]), key


def test_qlora_adapter_in_hf_format_loads_into_hf_peft_on_the_same_4bit_base(llama_folder, tmp_path):
    peft_lib = pytest.importorskip("peft")
    model = load(llama_folder, 4)
    peft = unipeft.attach(model, "lora", r=4)
    randomize(peft)
    peft.save_pretrained(str(tmp_path), format="hf")
    theirs = peft_lib.PeftModel.from_pretrained(load(llama_folder, 4), str(tmp_path))
    for module in theirs.modules():  # the same bitsandbytes kernel on both sides (no AVX512-BF16 repacking there)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids()).logits, model(input_ids=ids()).logits, rtol=0, atol=1e-6)


def grads(peft) -> dict[str, torch.Tensor]:
    return {f"{module}.{key}": p.grad.clone() for module, placed in peft.delta_modules()
            for key, p in placed.named_parameters() if p.grad is not None}


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, labels=batch).loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qlora_gradients_equal_a_dequantized_reference_after_an_evaluation(llama_folder, dtype):
    """An inference forward first (what an evaluation before training does) must not cut the gradient path: on an
    AVX512-BF16 CPU bitsandbytes would repack the weights for a kernel without a backward. The adapters' gradients
    through the 4-bit base equal those through a float base holding Deq(Q(W)) (transformers' ``dequantize()``)."""
    model = load(llama_folder, 4, dtype=dtype)
    with torch.no_grad():
        model(input_ids=ids(5))  # eval mode, no grad: the repacking trigger
    peft = unipeft.attach(model, "lora", r=4)
    randomize(peft, std=0.1)
    batch = ids(2)
    model.train()
    lm_loss(model, batch).backward()
    quantized = grads(peft)
    assert len(quantized) == 2 * 2 * 2  # A and B at q and v of both layers
    model.zero_grad(set_to_none=True)
    model.dequantize()
    assert not any(is_quantized(m) for m in model.modules())
    lm_loss(model, batch).backward()
    reference = grads(peft)
    tolerance = {"rtol": 1e-4, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 5e-2, "atol": 1e-3}
    for key, grad in quantized.items():
        assert grad.abs().max() > 0, key  # every adapter tensor gets a gradient, layer 0's included
        torch.testing.assert_close(grad, reference[key], **tolerance)


def test_qlora_trains_after_an_evaluation(llama_folder):
    model = load(llama_folder, 4)
    peft = unipeft.attach(model, "lora", r=4)
    batch = ids(2)
    with torch.no_grad():
        before = lm_loss(model, batch).item()  # eval mode: the repacking trigger
    optimizer = torch.optim.AdamW(peft.trainable_parameters(), lr=1e-2)
    model.train()
    for _ in range(30):
        lm_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        after = lm_loss(model, batch).item()
    assert after < before - 0.5, (before, after)  # measured: 4.6 -> 3.5 here


def test_detach_gives_the_4bit_layers_their_own_kernel_setting_back(llama_folder):
    model = load(llama_folder, 4)
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    own = [m.support_avx512bf16_for_cpu for m in layers]
    assert layers
    peft = unipeft.attach(model, "lora", r=4)
    assert not any(m.support_avx512bf16_for_cpu for m in layers)  # every 4-bit layer, adapted or not
    peft.detach()
    assert [m.support_avx512bf16_for_cpu for m in layers] == own


@pytest.mark.parametrize("bits", BITS)
def test_dequantizing_after_a_quantized_merge_keeps_unmerge_and_merge_exact(llama_folder, bits):
    """``model.dequantize()`` after merging into the quantized weights: the float layers hold the requantized merge;
    unmerging then gives back Deq(Q(W₀)) exactly, and merging again is the exact float merge."""
    model = load(llama_folder, bits)
    w0 = dequantized(q_proj(model), bits)
    peft = unipeft.attach(model, "lora", r=4)
    randomize(peft)
    batch = ids()
    unmerged = model(input_ids=batch).logits
    peft.merge()
    merged = model(input_ids=batch).logits
    model.dequantize()
    assert not is_quantized(q_proj(model))
    exact_kernel = bits == 4  # LLM.int8() also quantizes the activations, so its float outputs differ from int8 ones
    if exact_kernel:
        torch.testing.assert_close(model(input_ids=batch).logits, merged, rtol=0, atol=1e-6)
    peft.unmerge()
    assert peft.merged == []
    assert torch.equal(q_proj(model).weight, w0)
    if exact_kernel:
        torch.testing.assert_close(model(input_ids=batch).logits, unmerged, rtol=0, atol=1e-6)
    peft.merge()
    peft.deactivate()
    exact = model(input_ids=batch).logits
    peft.unmerge()
    peft.set_active("default")
    torch.testing.assert_close(exact, model(input_ids=batch).logits, rtol=1e-5, atol=1e-5)
