"""Prompt tuning (Lester et al. 2021, arXiv 2104.08691): n trainable virtual tokens in front of the input.

    [P ; E(x)],     P ∈ R^{n × d}

placed at the ``embed`` position; the prompt is prepended to the input embeddings through a forward pre-hook on the
model's keyword arguments (:mod:`unipeft.sequence.inputs`), which also extends the attention mask and token-level
labels (-100 for the virtual tokens). In an encoder-decoder model (T5) the prompt goes in front of the encoder's input.
In generation the prompt is inserted on the first step only and is read from the KV cache afterwards.

Inits: ``vocab`` (default): the embeddings of n tokens drawn uniformly from the vocabulary (Lester et al. sample the
5,000 most frequent; HF peft's ``SAMPLE_VOCAB`` samples the whole vocabulary, as here); ``text``: the embeddings of
``text`` tokenised by ``tokenizer`` (a local tokenizer folder; with the tokenizer's special tokens, such as BERT's
[CLS] … [SEP]), repeated or cut to n tokens, exactly as HF peft's ``TEXT``;
``random``: N(0, σ²) with σ the standard deviation of the embedding table (HF peft's ``RANDOM`` draws N(0, 1)).

As in HF peft, the model's outputs cover the n virtual positions too (logits are (B, n + T, V) for a causal LM), and a
BERT classifier pools the first virtual token instead of [CLS]. Not mergeable; not the identity at init.

HF peft's P-tuning (``PromptEncoderConfig``, Liu et al. 2021 "GPT Understands, Too") is a different method: its
virtual tokens come from an LSTM/MLP prompt encoder. Deep prompts at every layer (P-tuning v2) are prefixes: see
:mod:`unipeft.methods.prefix` and the ``ptuning_v2`` recipe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from unipeft.core.delta import SiteShape, register_form
from unipeft.core.modules import module_dims
from unipeft.core.sequence import SequenceForm, SequenceFormConfig
from unipeft.sequence.inputs import bind_prompt
from unipeft.core.site import base_named_modules

if TYPE_CHECKING:
    from unipeft.core.positions import Site
    from unipeft.core.recipe import DeltaSpec
    from unipeft.core.site import DeltaSite, Placed

INITS = ("vocab", "text", "random")


@register_form("prompt")
@dataclass(frozen=True, kw_only=True)
class PromptConfig(SequenceFormConfig):
    """Hyperparameters of prompt tuning.

    Attributes:
        length: n, the number of virtual tokens.
        init: ``vocab``, ``text`` or ``random`` (see the module docstring).
        text: the initialising text (``init: text``).
        tokenizer: a local tokenizer folder to tokenise ``text`` with (``init: text``).
    """

    length: int = 20
    init: Literal["vocab", "text", "random"] = "vocab"
    text: str | None = None
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"prompt length must be >= 1, got {self.length}")
        if self.init not in INITS:
            raise ValueError(f"unknown prompt init {self.init!r}; valid: {', '.join(INITS)}")
        if self.init == "text" and (not self.text or not self.tokenizer):
            raise ValueError("prompt init 'text' needs both 'text' and 'tokenizer' (a local tokenizer folder)")

    def site_dims(self, model: nn.Module, site: "Site", spec: "DeltaSpec") -> tuple[int | None, int]:
        if site.position != "embed":
            raise ValueError(f"a prompt goes at the input embeddings (position 'embed'), not at {site.position!r}")
        if spec.composition != "add":
            raise ValueError(f"a prompt supports composition 'add' only, not {spec.composition!r}")
        return module_dims(dict(base_named_modules(model))[site.module])

    def build(self, shape: SiteShape) -> "Prompt":
        return Prompt(self, shape)


class Prompt(SequenceForm):
    """P ∈ R^{n × d}; ``forward()`` returns P."""

    def __init__(self, config: PromptConfig, shape: SiteShape) -> None:
        super().__init__()
        self.prompt = nn.Parameter(_initial_prompt(config, shape.base, shape.d_out))  # (n, d)
        self._release: Any = None

    def forward(self) -> torch.Tensor:
        return self.prompt

    def bind(self, model: nn.Module, site: "Site", host: "DeltaSite", placed: "Placed") -> None:
        self._release = bind_prompt(model, host, placed)

    def on_detach(self, base: nn.Module) -> None:
        if self._release is not None:
            self._release()
            self._release = None


def _initial_prompt(config: PromptConfig, embedding: nn.Module, width: int) -> torch.Tensor:
    n = config.length
    table = embedding.weight  # (vocab, d)
    with torch.no_grad():
        if config.init == "random":
            return torch.randn(n, width) * table.float().std().to(torch.float32)
        if config.init == "vocab":
            ids = torch.randint(0, table.shape[0], (n,), device=table.device)
        else:
            ids = torch.tensor(_text_ids(config.text, config.tokenizer, n), device=table.device)
        return embedding(ids).detach().clone().to(torch.float32)  # through the module: BART scales its embeddings


def _text_ids(text: str, tokenizer: str, n: int) -> list[int]:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tokenizer)(text)["input_ids"]  # with special tokens, as HF peft
    if not ids:
        raise ValueError(f"prompt init text {text!r} tokenises to no tokens")
    return (ids * math.ceil(n / len(ids)))[:n]
