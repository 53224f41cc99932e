"""``build_quantized_model``: a QLoRA base quantized while it is built (unipeft.models.quantized_build)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaConfig

import unipeft
from unipeft.core.quant import is_quantized
from unipeft.models import build_quantized_model
from unipeft.models.quantized_build import quantize_4bit_rows, quantize_int8_rows

bnb = pytest.importorskip("bitsandbytes")


def tiny_llama(**overrides) -> LlamaConfig:
    """A 2-layer LLaMA (d=64, GQA 4/2 heads): about a hundred thousand parameters."""
    shape = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
    return LlamaConfig(**(shape | overrides))


def body_linears(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n.startswith("model.layers.") and n.endswith("_proj")}


@pytest.mark.parametrize("quantization, layer",
                         [("nf4", "Linear4bit"), ("fp4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_body_linears_are_quantized_and_heads_float(quantization, layer):
    model = build_quantized_model(tiny_llama(), quantization=quantization)
    linears = body_linears(model)
    assert len(linears) == 2 * 7
    assert all(type(m).__name__ == layer and is_quantized(m) for m in linears.values())
    if quantization != "int8":
        state = linears["model.layers.0.mlp.up_proj"].weight.quant_state
        assert state.quant_type == quantization and state.nested  # double quantization by default
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(model.model.norm.weight, torch.ones(64))
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    # the rotary embedding's buffers are real frequencies, 10000^(-2i/d), not uninitialised memory
    inv_freq = model.model.rotary_emb.inv_freq
    assert torch.allclose(inv_freq, 10000.0 ** (-torch.arange(0, 16, 2).float() / 16))


def test_random_weights_have_the_init_scale():
    model = build_quantized_model(tiny_llama(hidden_size=256, intermediate_size=512))
    weight = bnb.functional.dequantize_4bit(model.model.layers[1].mlp.up_proj.weight.data,
                                            model.model.layers[1].mlp.up_proj.weight.quant_state)
    assert weight.shape == (512, 256)
    assert 0.018 < weight.std().item() < 0.022 and abs(weight.mean().item()) < 1e-3
    assert 0.018 < model.lm_head.weight.std().item() < 0.022


def test_same_seed_same_model_and_global_rng_untouched():
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    state = torch.random.get_rng_state()
    with torch.no_grad():
        first = build_quantized_model(tiny_llama(), seed=3)(ids).logits
        again = build_quantized_model(tiny_llama(), seed=3)(ids).logits
        other = build_quantized_model(tiny_llama(), seed=4)(ids).logits
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(first, again)
    assert (first - other).abs().max() > 1e-2


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_sliced_4bit_codes_equal_bitsandbytes_whole_matrix(quant_type, double_quant, monkeypatch):
    monkeypatch.setattr("unipeft.models.quantized_build.SLICE_ELEMENTS", 96 * 40)  # many slices, a partial last one
    weight = torch.randn(301, 96, generator=torch.Generator().manual_seed(0))
    packed, state = quantize_4bit_rows(lambda a, b: weight[a:b], 301, 96, quant_type=quant_type,
                                       compress_statistics=double_quant)
    ref_packed, ref = bnb.functional.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant,
                                                   quant_type=quant_type)
    assert torch.equal(packed, ref_packed) and torch.equal(state.absmax, ref.absmax)
    if double_quant:
        assert torch.equal(state.offset, ref.offset) and torch.equal(state.state2.absmax, ref.state2.absmax)
    assert torch.equal(bnb.functional.dequantize_4bit(packed, state), bnb.functional.dequantize_4bit(ref_packed, ref))


def test_sliced_int8_codes_equal_bitsandbytes(monkeypatch):
    monkeypatch.setattr("unipeft.models.quantized_build.SLICE_ELEMENTS", 64 * 7)
    weight = torch.randn(50, 64, generator=torch.Generator().manual_seed(1))
    codes, scales = quantize_int8_rows(lambda a, b: weight[a:b], 50, 64)
    ref = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
    assert torch.equal(codes, ref.CB) and torch.equal(scales, ref.SCB)


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_lora_trains_through_the_quantized_base_with_checkpointing(quantization, single_thread):
    model = build_quantized_model(tiny_llama(), quantization=quantization)
    peft = unipeft.attach(model, "lora", r=4, positions=["attn.q", "attn.v", "ffn.down"])
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    trainable = peft.trainable_parameters()
    assert len(trainable) == 2 * 3 * 2  # A and B at three sites in two layers
    optimizer = torch.optim.SGD(trainable, lr=1.0)
    first = model(input_ids=ids, labels=ids).loss
    first.backward()  # B = 0 at init: only the B factors get a gradient
    optimizer.step()
    optimizer.zero_grad()
    second = model(input_ids=ids, labels=ids).loss
    second.backward()  # now every factor does, the first layer's through the second layer's quantized base
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    assert second < first
    ids_of_trainable = {id(p) for p in trainable}
    frozen = [n for n, p in model.named_parameters() if id(p) not in ids_of_trainable]
    assert frozen and all(not p.requires_grad and p.grad is None
                          for n, p in model.named_parameters() if id(p) not in ids_of_trainable)


def test_known_name_and_bad_arguments():
    with pytest.raises(ValueError, match=r"unknown quantization 'int4'; valid: nf4, fp4, int8"):
        build_quantized_model(tiny_llama(), quantization="int4")
    with pytest.raises(ValueError, match=r"no known config 'llama-3b'; known: llama-7b, llama-13b"):
        build_quantized_model("llama-3b")
    with pytest.raises(ValueError, match=r"unsupported compute_dtype torch.float64; valid: torch.float32"):
        build_quantized_model(tiny_llama(), compute_dtype=torch.float64)
    with pytest.raises(ValueError, match=r"unknown model kind 'lm'"):
        build_quantized_model(tiny_llama(), kind="lm")  # type: ignore[arg-type]


def test_bf16_compute_dtype_keeps_heads_in_bf16():
    model = build_quantized_model(tiny_llama(), compute_dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.q_proj.compute_dtype == torch.bfloat16
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # buffers keep their own dtype


_MEMORY_PROBE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from transformers import LlamaConfig
    from unipeft.models import build_quantized_model

    def status(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    torch.set_num_threads(2)
    hidden, ffn, layers = map(int, sys.argv[1:])
    config = LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=16)
    import bitsandbytes  # imported before the baseline, like torch
    before = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    model = build_quantized_model(config)
    linear = sum(m.in_features * m.out_features for m in model.modules() if type(m).__name__ == "Linear4bit")
    print(json.dumps({"growth": status("VmHWM") - before, "fp32_linear_bytes": 4 * linear}))
""")


@pytest.mark.parametrize("hidden, ffn, layers, fp32_at_least", [
    (1024, 2816, 8, 0.38e9),  # 101M parameters in the body, a few seconds
    pytest.param(2048, 5504, 8, 1.5e9, marks=pytest.mark.slow),  # 405M (1.6 GB in float32), ~25 s
])
def test_building_never_holds_the_full_precision_base(hidden, ffn, layers, fp32_at_least, tmp_path: Path):
    """The body is built with a peak well under its float32 size: the weights are quantized while they are drawn.
    Building in float32 and quantizing afterwards would peak above 1.0x of it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the resident-set high-water mark")
    script = tmp_path / "probe.py"
    script.write_text(_MEMORY_PROBE)
    env = {"MALLOC_MMAP_THRESHOLD_": "65536", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, str(script), str(hidden), str(ffn), str(layers)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["fp32_linear_bytes"] > fp32_at_least
    # NF4 with double quantization holds ~0.127x of float32; embeddings and head (16-33 MB) and the slices add little
    assert result["growth"] < 0.35 * result["fp32_linear_bytes"], result
