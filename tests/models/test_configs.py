"""Configs of well-known models and meta-device instantiation (unipeft.models.configs)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, RobertaConfig

from unipeft.models import KNOWN_CONFIGS, build_meta_model, known_config, load_config


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights count once


def test_llama_7b_parameter_count() -> None:
    model = build_meta_model(load_config("llama-7b"), "causal_lm")
    assert n_params(model) == 6_738_415_616
    assert all(p.device.type == "meta" for p in model.parameters())


def test_roberta_base_parameter_count_with_pooler() -> None:
    model = build_meta_model(load_config("roberta-base"), "base")
    assert model.pooler is not None
    assert n_params(model) == 124_645_632


@pytest.mark.parametrize("name", sorted(KNOWN_CONFIGS))
def test_published_parameter_counts(name: str) -> None:
    entry = KNOWN_CONFIGS[name]
    model = build_meta_model(entry.build(), entry.kind)
    assert n_params(model) == entry.params
    assert all(p.device.type == "meta" for p in model.parameters())


def test_configs_carry_published_hyperparameters() -> None:
    llama = load_config("llama-7b")
    assert isinstance(llama, LlamaConfig)
    assert (llama.hidden_size, llama.num_hidden_layers, llama.num_attention_heads) == (4096, 32, 32)
    assert (llama.intermediate_size, llama.vocab_size) == (11008, 32000)
    roberta = load_config("roberta-base")
    assert isinstance(roberta, RobertaConfig)
    assert (roberta.vocab_size, roberta.max_position_embeddings, roberta.type_vocab_size) == (50265, 514, 1)
    bart = load_config("bart-large")
    assert (bart.d_model, bart.encoder_layers, bart.decoder_layers, bart.encoder_ffn_dim) == (1024, 12, 12, 4096)


def test_known_config_is_fresh_each_time() -> None:
    first = known_config("gpt2")
    first.n_layer = 1
    assert known_config("gpt2").n_layer == 12


def test_heads_on_meta() -> None:
    config = load_config("roberta-base")
    classifier = build_meta_model(config, "classification")
    assert classifier.config.num_labels == 2
    regressor = build_meta_model(config, "regression")
    assert regressor.config.num_labels == 1 and regressor.config.problem_type == "regression"
    assert config.num_labels == 2 and config.problem_type is None  # the caller's config is untouched
    seq2seq = build_meta_model(load_config("t5-base"), "seq2seq_lm")
    assert seq2seq.lm_head.weight.device == torch.device("meta")


def test_bad_kinds() -> None:
    with pytest.raises(ValueError, match=r"unknown model kind 'lm'.*causal_lm"):
        build_meta_model(load_config("gpt2"), "lm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"GPT2Config cannot be built as kind 'seq2seq_lm'"):
        build_meta_model(load_config("gpt2"), "seq2seq_lm")
    with pytest.raises(ValueError, match="no known config"):
        known_config("gpt5")
