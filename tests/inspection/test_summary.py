"""Parameter counts (unipeft.inspection.summary): exact numbers on published configs, and the same numbers as HF peft."""

from __future__ import annotations

import pytest
import torch
import transformers

import unipeft

peft_lib = pytest.importorskip("peft")


def llama_7b() -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config)


def roberta_base() -> transformers.RobertaModel:
    config = transformers.RobertaConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                        intermediate_size=3072, vocab_size=50265, max_position_embeddings=514,
                                        type_vocab_size=1)
    with torch.device("meta"):
        return transformers.RobertaModel(config)


def hf_counts(model: torch.nn.Module, config) -> tuple[int, int]:
    """(trainable, total) as HF peft counts them."""
    return peft_lib.get_peft_model(model, config).get_nb_trainable_parameters()


def test_lora_on_llama_7b():
    summary = unipeft.attach(llama_7b(), "lora").summary()
    assert summary.trainable == 4_194_304  # 32 layers × 2 projections × (8·4096 + 4096·8)
    assert summary.base == 6_738_415_616
    assert summary.total == summary.base + summary.trainable
    assert summary.per_position == {"attn.q": 2_097_152, "attn.v": 2_097_152}
    assert summary.per_form == {"LoRA": 4_194_304}
    assert summary.per_adapter == {"default": 4_194_304}
    assert summary.percent == pytest.approx(100 * 4_194_304 / 6_742_609_920)
    theirs = hf_counts(llama_7b(), peft_lib.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    assert (summary.trainable, summary.total) == theirs


def test_lora_on_roberta_base():
    summary = unipeft.attach(roberta_base(), "lora").summary()
    assert summary.trainable == 294_912  # 12 layers × 2 projections × (8·768 + 768·8)
    assert summary.base == 124_645_632
    theirs = hf_counts(roberta_base(), peft_lib.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
    assert (summary.trainable, summary.total) == theirs


def test_ia3_on_llama_7b():
    summary = unipeft.attach(llama_7b(), "ia3").summary()
    assert summary.trainable == 32 * (4096 + 4096 + 11008)  # l_k, l_v (outputs) and l_ff (the down proj's input)
    assert summary.per_position == {"attn.k": 32 * 4096, "attn.v": 32 * 4096, "ffn.down": 32 * 11008}
    theirs = hf_counts(llama_7b(), peft_lib.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                      feedforward_modules=["down_proj"]))
    assert (summary.trainable, summary.total) == theirs


@pytest.mark.parametrize(
    ("family", "targets"),
    [("bert", ["query", "value"]), ("llama", ["q_proj", "v_proj"]), ("t5", ["q", "v"]), ("bart", ["q_proj", "v_proj"]),
     ("gpt2", ["c_attn"])],
)
def test_lora_counts_match_hf_peft_on_tiny_models(tiny, family, targets):
    """GPT-2: q and v as two slices of c_attn cost 2·(r·d + d·r) = 4rd, HF peft's whole c_attn r·d + 3d·r = 4rd.
    T5/BART: HF peft's suffixes q, v also match the cross-attention, which unipeft names xattn.q, xattn.v."""
    cross = ["xattn.q", "xattn.v"] if family in ("t5", "bart") else []
    ours = unipeft.attach(tiny.model(family), "lora", positions=["attn.q", "attn.v", *cross]).summary()
    fan_in_fan_out = family == "gpt2"
    theirs = hf_counts(tiny.model(family), peft_lib.LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                                               fan_in_fan_out=fan_in_fan_out))
    assert (ours.trainable, ours.total) == theirs


def test_ia3_counts_match_hf_peft_on_tiny_llama(tiny):
    """The tiny LLaMA has grouped-query attention: k and v are narrower than the model."""
    ours = unipeft.attach(tiny.model("llama"), "ia3").summary()
    theirs = hf_counts(tiny.model("llama"), peft_lib.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                               feedforward_modules=["down_proj"]))
    assert (ours.trainable, ours.total) == theirs
    assert ours.trainable == 2 * (16 + 16 + 64)


def test_counts_of_several_adapters(tiny):
    model = tiny.model("llama")
    base = sum(p.numel() for p in model.parameters())
    peft = unipeft.attach(model, "lora")
    peft.add("lora", name="big", r=16)
    summary = peft.summary()
    small, big = 2 * 2 * (8 * 32) + 2 * (8 * 32 + 16 * 8), 2 * 2 * (16 * 32) + 2 * (16 * 32 + 16 * 16)
    assert summary.per_adapter == {"default": small, "big": big}
    assert summary.trainable == small  # only the active adapter trains
    assert summary.base == base and summary.total == base + small + big
    peft.set_active("default", "big")
    assert peft.summary().trainable == small + big


def test_full_and_bitfit_counts(tiny):
    model = tiny.model("bert")
    base = sum(p.numel() for p in model.parameters())
    summary = unipeft.attach(model, "full").summary()
    assert summary.trainable == summary.total == summary.base == base
    assert summary.percent == 100.0
    # BitFit: one vector per site, of the site's output width
    d, ffn = 32, 64
    per_layer = 4 * d + ffn + d + 2 * d  # q k v o, up, down, two LayerNorms
    assert unipeft.attach(tiny.model("bert"), "bitfit").summary().per_position == {
        "attn.q": 2 * d, "attn.k": 2 * d, "attn.v": 2 * d, "attn.o": 2 * d, "ffn.up": 2 * ffn, "ffn.down": 2 * d,
        "norm": 2 * 2 * d}
    assert unipeft.attach(tiny.model("bert"), "bitfit").summary().trainable == 2 * per_layer


def test_summary_prints_like_hf_peft(tiny):
    text = str(unipeft.attach(tiny.model("llama"), "lora").summary())
    first = text.splitlines()[0]
    assert first.startswith("trainable params: 1,792 || all params: ")
    assert "trainable%: " in first and "per position: attn.q=1,024, attn.v=768" in text
