"""Published configurations of well-known models, built in code, with no weights.

These let a user inspect a large model on a small machine: count its parameters, list its
modules, or plan where a PEFT method would attach, all on the ``meta`` device, which allocates
no memory. The hyperparameters are the published ones of each checkpoint; the tests pin the
resulting parameter counts (LLaMA-7B: 6,738,415,616; LLaMA-33B: 32,528,943,616; RoBERTa-base with
pooler: 124,645,632).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    BartConfig,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    RobertaConfig,
    T5Config,
)

ModelKind = Literal["classification", "regression", "causal_lm", "seq2seq_lm", "base"]
"""What a loaded model is for: a sequence classifier, a one-output regressor, a decoder LM,
an encoder-decoder LM, or the bare backbone with no head."""

MODEL_KINDS: tuple[str, ...] = get_args(ModelKind)

_AUTO_CLASSES = {
    "classification": AutoModelForSequenceClassification,
    "regression": AutoModelForSequenceClassification,
    "causal_lm": AutoModelForCausalLM,
    "seq2seq_lm": AutoModelForSeq2SeqLM,
    "base": AutoModel,
}


def auto_class(kind: str) -> type:
    """The transformers ``AutoModel*`` class that builds a model of ``kind``.

    Raises:
        ValueError: if ``kind`` is not one of :data:`MODEL_KINDS`.
    """
    if kind not in _AUTO_CLASSES:
        raise ValueError(f"unknown model kind {kind!r}; expected one of: {', '.join(MODEL_KINDS)}")
    return _AUTO_CLASSES[kind]


@dataclass(frozen=True, kw_only=True)
class KnownConfig:
    """A well-known model known here only by its configuration.

    Attributes:
        build: makes a fresh config with the published hyperparameters.
        kind: the kind the checkpoint was released as (its natural head).
        params: the published parameter count of that kind, as a check.
    """

    build: Callable[[], PretrainedConfig]
    kind: ModelKind
    params: int


def _roberta(hidden: int, layers: int, heads: int, ffn: int) -> RobertaConfig:
    return RobertaConfig(
        vocab_size=50265,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        max_position_embeddings=514,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )


def _llama1(hidden: int, layers: int, heads: int, ffn: int) -> LlamaConfig:
    """A LLaMA-1 shape (Touvron et al. 2023, Table 2): 32k vocabulary, 2048 positions, untied head, full MHA."""
    return LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )


KNOWN_CONFIGS: dict[str, KnownConfig] = {
    # Touvron et al. 2023, LLaMA-7B.
    "llama-7b": KnownConfig(
        build=lambda: LlamaConfig(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=2048,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
        ),
        kind="causal_lm",
        params=6_738_415_616,
    ),
    # The larger LLaMA-1 shapes (Meta released the 33B checkpoint under the name "30B").
    "llama-13b": KnownConfig(build=lambda: _llama1(5120, 40, 40, 13824), kind="causal_lm", params=13_015_864_320),
    "llama-33b": KnownConfig(build=lambda: _llama1(6656, 60, 52, 17920), kind="causal_lm", params=32_528_943_616),
    "llama-65b": KnownConfig(build=lambda: _llama1(8192, 80, 64, 22016), kind="causal_lm", params=65_285_660_672),
    # Liu et al. 2019, RoBERTa (counts are the bare encoder with its pooler).
    "roberta-base": KnownConfig(build=lambda: _roberta(768, 12, 12, 3072), kind="base", params=124_645_632),
    "roberta-large": KnownConfig(build=lambda: _roberta(1024, 24, 16, 4096), kind="base", params=355_359_744),
    # Devlin et al. 2019; BertConfig's defaults are bert-base-uncased.
    "bert-base-uncased": KnownConfig(build=lambda: BertConfig(), kind="base", params=109_482_240),
    # Radford et al. 2019, the 124M GPT-2; GPT2Config's defaults.
    "gpt2": KnownConfig(build=lambda: GPT2Config(), kind="causal_lm", params=124_439_808),
    # Raffel et al. 2020, T5-base (v1.0: ReLU FFN, tied embeddings).
    "t5-base": KnownConfig(
        build=lambda: T5Config(
            vocab_size=32128,
            d_model=768,
            d_kv=64,
            d_ff=3072,
            num_layers=12,
            num_decoder_layers=12,
            num_heads=12,
            feed_forward_proj="relu",
            tie_word_embeddings=True,
        ),
        kind="seq2seq_lm",
        params=222_903_552,
    ),
    # Lewis et al. 2020, BART-large.
    "bart-large": KnownConfig(
        build=lambda: BartConfig(
            vocab_size=50265,
            d_model=1024,
            encoder_layers=12,
            decoder_layers=12,
            encoder_attention_heads=16,
            decoder_attention_heads=16,
            encoder_ffn_dim=4096,
            decoder_ffn_dim=4096,
            max_position_embeddings=1024,
        ),
        kind="seq2seq_lm",
        params=406_291_456,
    ),
    # Jiang et al. 2023, Mistral-7B-v0.1 (grouped-query attention, 8 KV heads).
    "mistral-7b": KnownConfig(
        build=lambda: MistralConfig(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=32768,
            sliding_window=4096,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        ),
        kind="causal_lm",
        params=7_241_732_096,
    ),
    # Qwen team 2024, Qwen2-0.5B (tied embeddings, 2 KV heads).
    "qwen2-0.5b": KnownConfig(
        build=lambda: Qwen2Config(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
        ),
        kind="causal_lm",
        params=494_032_768,
    ),
}


def known_config(name: str) -> PretrainedConfig:
    """A fresh config of the well-known model ``name`` (see :data:`KNOWN_CONFIGS`).

    Raises:
        ValueError: if ``name`` is not in the table.
    """
    if name not in KNOWN_CONFIGS:
        raise ValueError(f"no known config {name!r}; known: {', '.join(KNOWN_CONFIGS)}")
    return KNOWN_CONFIGS[name].build()


def build_meta_model(config: PretrainedConfig, kind: ModelKind = "base") -> nn.Module:
    """Instantiate ``config`` as a model of ``kind`` on the ``meta`` device.

    Parameters have shapes but no storage, so a 7B model costs no memory; use it to count
    parameters or inspect module names, not to run a forward pass.

    Args:
        config: any transformers config, e.g. from :func:`load_config`.
        kind: which head to build (see :data:`ModelKind`).

    Raises:
        ValueError: if ``kind`` is unknown or the architecture has no model of that kind.
    """
    cls = auto_class(kind)
    if kind == "regression":
        config = copy.deepcopy(config)  # never mutate the caller's config
        config.num_labels = 1
        config.problem_type = "regression"
    try:
        with torch.device("meta"):
            return cls.from_config(config)
    except ValueError as error:
        raise ValueError(f"{type(config).__name__} cannot be built as kind {kind!r}: {error}") from error
