"""LoRA (unipeft.methods.lora): the formula, its scalings and inits, merging, and parity with HF peft's LoRA on tiny
models, the real all-MiniLM-L6-v2 and (slow) the real SmolLM2-135M."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import unipeft
from unipeft.core.delta import SiteShape
from unipeft.methods.lora import LoRA, LoRAConfig

peft_lib = pytest.importorskip("peft")


def build(config: LoRAConfig, base: nn.Module, d_in: int | None, d_out: int) -> LoRA:
    return config.build(SiteShape(d_in=d_in, d_out=d_out, base=base))


# ------------------------------------------------------------------------------------------------ the formula
def test_forward_is_scaled_b_a_x():
    torch.manual_seed(0)
    lora = build(LoRAConfig(r=4, alpha=6.0), nn.Linear(10, 7), 10, 7)
    nn.init.normal_(lora.lora_B)
    x = torch.randn(3, 5, 10)
    expected = (6.0 / 4) * (x @ lora.lora_A.T @ lora.lora_B.T)
    torch.testing.assert_close(lora(x), expected)
    torch.testing.assert_close(lora.delta_weight(), 1.5 * lora.lora_B @ lora.lora_A)
    assert lora.lora_A.shape == (4, 10) and lora.lora_B.shape == (7, 4)


@pytest.mark.parametrize(("r", "alpha", "rslora", "scaling"),
                         [(8, 16.0, False, 2.0), (4, 16.0, True, 8.0), (16, 8.0, True, 2.0), (1, 1.0, False, 1.0)])
def test_scaling(r, alpha, rslora, scaling):
    """α/r, or α/√r with rsLoRA (Kalajdzievski 2023)."""
    config = LoRAConfig(r=r, alpha=alpha, rslora=rslora)
    assert config.scaling == pytest.approx(scaling)
    assert config.scaling == pytest.approx(alpha / (math.sqrt(r) if rslora else r))
    assert build(config, nn.Linear(4, 4), 4, 4).scaling == pytest.approx(scaling)


def test_kaiming_init():
    """A ~ Kaiming-uniform(a=√5), whose bound is 1/√d_in; B = 0 so the delta starts at zero."""
    torch.manual_seed(0)
    lora = build(LoRAConfig(r=8), nn.Linear(400, 30), 400, 30)
    assert torch.equal(lora.lora_B, torch.zeros(30, 8))
    bound = 1 / math.sqrt(400)
    assert lora.lora_A.abs().max() <= bound
    assert lora.lora_A.abs().max() > 0.9 * bound  # uniform over the whole range
    assert lora.lora_A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert torch.equal(lora(torch.randn(2, 400)), torch.zeros(2, 30))


def test_gaussian_init():
    """A ~ N(0, σ²) with σ = 1/r, as HF peft's init_lora_weights='gaussian'; B = 0."""
    torch.manual_seed(0)
    lora = build(LoRAConfig(r=4, init="gaussian"), nn.Linear(4096, 8), 4096, 8)
    assert lora.lora_A.std().item() == pytest.approx(1 / 4, rel=0.02)
    assert lora.lora_A.mean().abs().item() < 0.01
    assert torch.equal(lora.lora_B, torch.zeros(8, 4))


def test_dropout_acts_on_the_low_rank_path_only():
    torch.manual_seed(0)
    base = nn.Linear(16, 16)
    lora = build(LoRAConfig(r=4, alpha=8.0, dropout=0.5), base, 16, 16)
    nn.init.normal_(lora.lora_B)
    x = torch.randn(64, 16)
    lora.eval()
    torch.testing.assert_close(lora(x), 2.0 * x @ lora.lora_A.T @ lora.lora_B.T)
    lora.train()
    torch.manual_seed(1)
    out = lora(x)
    torch.manual_seed(1)
    dropped = F.dropout(x, 0.5, training=True)
    torch.testing.assert_close(out, 2.0 * dropped @ lora.lora_A.T @ lora.lora_B.T)


def test_merge_into_a_linear():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    weight = base.weight.detach().clone()
    lora = build(LoRAConfig(r=2, alpha=3.0), base, 6, 5)
    nn.init.normal_(lora.lora_B)
    with torch.no_grad():
        lora.merge_(base.weight, base.bias, insertion="parallel", scale=1.0, sign=+1)
    torch.testing.assert_close(base.weight, weight + 1.5 * lora.lora_B @ lora.lora_A)
    with torch.no_grad():
        lora.merge_(base.weight, base.bias, insertion="parallel", scale=2.0, sign=-1)
    torch.testing.assert_close(base.weight, weight - 1.5 * lora.lora_B @ lora.lora_A)


def test_embedding_lora(tiny):
    """On an embedding: A = 0, B ~ N(0, 1) (HF peft's choice, so Δ = 0 at init); Δh = (α/r)·B A[:, ids]."""
    model = tiny.model("llama")
    batch = tiny.batch("llama")
    before = tiny.logits(model, batch)
    peft = unipeft.attach(model, "lora", positions=["embed"])
    ((module, placed),) = list(peft.delta_modules())
    lora = placed.form
    assert module == "model.embed_tokens"
    assert lora.lora_A.shape == (8, tiny.vocab) and lora.lora_B.shape == (tiny.width, 8)
    assert torch.equal(lora.lora_A, torch.zeros(8, tiny.vocab)) and lora.lora_B.std() > 0.5
    assert torch.equal(tiny.logits(model, batch), before)
    with torch.no_grad():
        nn.init.normal_(lora.lora_A)
    ids = batch["input_ids"]
    torch.testing.assert_close(lora(ids), 2.0 * lora.lora_A.T[ids] @ lora.lora_B.T)
    adapted = tiny.logits(model, batch)
    peft.merge()
    torch.testing.assert_close(tiny.logits(model, batch), adapted, atol=1e-4, rtol=0)


def test_config_validation():
    with pytest.raises(ValueError, match="rank r must be >= 1, got 0"):
        LoRAConfig(r=0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got -0.1"):
        LoRAConfig(dropout=-0.1)


# ------------------------------------------------------------------------------------------------ HF peft parity
def copy_into_hf(ours: unipeft.Peft, theirs: nn.Module) -> int:
    """Copy unipeft's A and B into HF peft's lora_A / lora_B of the same modules; returns how many were copied."""
    count = 0
    with torch.no_grad():
        for module, placed in ours.delta_modules():
            layer = theirs.base_model.model.get_submodule(module)
            layer.lora_A["default"].weight.copy_(placed.form.lora_A)
            layer.lora_B["default"].weight.copy_(placed.form.lora_B)
            count += 1
    return count


def assert_lora_parity(model: nn.Module, inputs: dict, *, targets: list[str], randomize, hf_options: dict | None = None,
                       output=lambda out: out.logits, **options) -> float:
    """Attach unipeft's LoRA to ``model`` and HF peft's to a copy, give both the same random A and B, and compare."""
    twin = copy.deepcopy(model)
    ours = unipeft.attach(model, "lora", **options)
    randomize(ours, std=0.05)
    hf_options = {"r": options.get("r", 8), "lora_alpha": options.get("alpha", 16), **(hf_options or {})}
    theirs = peft_lib.get_peft_model(twin, peft_lib.LoraConfig(target_modules=targets, **hf_options))
    assert copy_into_hf(ours, theirs) == len([m for m in theirs.modules() if isinstance(m, peft_lib.tuners.lora.Linear)])
    model.eval()
    theirs.eval()
    with torch.no_grad():
        a, b = output(model(**inputs)), output(theirs(**inputs))
    diff = (a - b).abs().max().item()
    assert diff <= 1e-5, f"max abs difference {diff}"
    return diff


def test_parity_with_hf_peft_on_tiny_bert(tiny, randomize):
    model = tiny.model("bert")
    batch = tiny.batch("bert")
    before = tiny.logits(model, batch)
    assert_lora_parity(model, {"input_ids": batch["input_ids"]}, targets=["query", "value"], randomize=randomize)
    assert (tiny.logits(model, batch) - before).abs().max() > 1e-4  # the deltas do change the output


def test_parity_with_hf_peft_on_tiny_llama(tiny, randomize):
    model = tiny.model("llama")
    batch = tiny.batch("llama")
    assert_lora_parity(model, {"input_ids": batch["input_ids"]}, targets=["q_proj", "v_proj", "down_proj"],
                       positions=["attn.q", "attn.v", "ffn.down"], randomize=randomize)


def test_rslora_parity_with_hf_peft(tiny, randomize):
    model = tiny.model("llama")
    batch = tiny.batch("llama")
    assert_lora_parity(model, {"input_ids": batch["input_ids"]}, targets=["q_proj", "v_proj"], r=4, alpha=8.0,
                       rslora=True, hf_options={"use_rslora": True}, randomize=randomize)


def test_gpt2_whole_c_attn_parity_with_hf_peft(tiny, randomize):
    """unipeft on the whole fused c_attn (a Conv1D) equals HF peft's LoRA with fan_in_fan_out=True."""
    model = tiny.model("gpt2")
    batch = tiny.batch("gpt2")
    assert_lora_parity(model, {"input_ids": batch["input_ids"]}, targets=["c_attn"], positions=[],
                       modules=["c_attn"], hf_options={"fan_in_fan_out": True}, randomize=randomize)
    ours = unipeft.handle(model)
    assert all(p.form.lora_B.shape == (3 * tiny.width, 8) for _, p in ours.delta_modules())
    adapted = tiny.logits(model, batch)
    ours.merge()
    torch.testing.assert_close(tiny.logits(model, batch), adapted, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def minilm(minilm_folder):
    """The real all-MiniLM-L6-v2 as a sequence classifier (its new head seeded) and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = minilm_folder
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, local_files_only=True)
    return model.eval(), tokenizer, path


def _sentences(tokenizer) -> dict:
    return dict(tokenizer(["A parameter-efficient method trains few weights.", "The cat sat on the mat."],
                          padding=True, return_tensors="pt"))


def test_parity_with_hf_peft_on_minilm_classifier(minilm, randomize):
    model, tokenizer, _ = minilm
    assert_lora_parity(copy.deepcopy(model), _sentences(tokenizer), targets=["query", "value"], randomize=randomize)


def test_parity_with_hf_peft_on_minilm_encoder(minilm, randomize):
    from transformers import AutoModel

    _, tokenizer, path = minilm
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    diff = assert_lora_parity(model, _sentences(tokenizer), targets=["query", "key", "value", "intermediate.dense", "output.dense"],
                              positions=["attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.down"],
                              randomize=randomize, output=lambda out: out.last_hidden_state)
    assert diff <= 1e-5


@pytest.mark.slow
def test_parity_with_hf_peft_on_smollm2(randomize):
    """The real SmolLM2-135M (LLaMA architecture, 30 layers), loaded from its GGUF file (cached after the first run)."""
    from unipeft.models import load_model

    model, tokenizer = load_model("smollm2-135m", kind="causal_lm")
    inputs = dict(tokenizer(["What is the capital of France?"], return_tensors="pt"))
    assert_lora_parity(model, inputs, targets=["q_proj", "k_proj", "v_proj", "o_proj"],
                       positions=["attn.q", "attn.k", "attn.v", "attn.o"], randomize=randomize)
