"""HF peft ``PROMPT_TUNING`` ↔ unipeft ``prompt`` and HF peft ``PREFIX_TUNING`` ↔ unipeft ``prefix``.

Both are prompt-learning methods in HF: one tensor ``prompt_embeddings`` outside the model, and a ``task_type``
that picks the PeftModel class (written from the model class: ``*ForCausalLM`` → ``CAUSAL_LM``, ...).

* Prompt tuning: ``prompt_embeddings`` (n, d) is the prompt P in front of the input embeddings.
* Prefix tuning: ``prompt_embeddings`` (l, L·2·d_kv) holds, for each layer i, the keys ``[:, 2i·d_kv:(2i+1)·d_kv]``
  and the values ``[:, (2i+1)·d_kv:(2i+2)·d_kv]`` (heads major, d_kv = key/value heads × head dim). HF saves the
  final prefix (after its ``prefix_projection`` MLP) and unipeft folds its training-time MLP the same way, so the
  MLP never travels and a written config has ``prefix_projection: false``. HF runs the prefix as a KV cache, so the
  real tokens sit at positions l..l+T−1; unipeft's prefixes number them the same way (``shift_positions``, on by
  default, :mod:`unipeft.sequence.shift`), so an adapter gives the same logits and generations on either side, with
  either padding side. A prefix with ``shift_positions: false`` is refused on export.

Encoder-decoder models are refused (HF's ``num_transformer_submodules: 2`` puts prompts in the decoder too, and its
prefix covers decoder self- and cross-attention with one tensor), as are prefixes on only some layers or with a gate.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from unipeft.core.recipe import DeltaSpec
from unipeft.interop.hf_method import HFMethod, MethodExport, Placement, TensorPool, register_hf_method
from unipeft.methods.prefix import PrefixConfig
from unipeft.methods.prompt import PromptConfig

#: Model class name endings → HF ``task_type``.
TASK_TYPES = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
              ("ForConditionalGeneration", "SEQ_2_SEQ_LM"), ("ForTokenClassification", "TOKEN_CLS"),
              ("ForQuestionAnswering", "QUESTION_ANS"))
PROMPT_INITS = {"RANDOM": "random", "SAMPLE_VOCAB": "vocab", "TEXT": "vocab"}
COMMON = frozenset({"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                    "num_layers"})


def task_type(model: nn.Module) -> str:
    """HF's ``task_type`` for a transformers model class."""
    name = type(model).__name__
    return next((task for suffix, task in TASK_TYPES if name.endswith(suffix)), "FEATURE_EXTRACTION")


def _check_single_stack(config: Mapping[str, Any], model: nn.Module, method: str) -> None:
    submodules = config.get("num_transformer_submodules") or 1
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    if submodules != 1 or encoder_decoder:
        raise ValueError(f"{method} on an encoder-decoder model (num_transformer_submodules={submodules}) is not "
                         "supported: HF peft also puts it in the decoder, unipeft in front of the encoder only")


def _head_dim(model: nn.Module) -> int:
    config = model.config
    explicit = getattr(config, "head_dim", None)
    if explicit:
        return int(explicit)
    heads = next(getattr(config, k) for k in ("num_attention_heads", "n_head", "num_heads") if hasattr(config, k))
    width = next(getattr(config, k) for k in ("hidden_size", "n_embd", "d_model") if hasattr(config, k))
    return int(width) // int(heads)


@register_hf_method
class PromptTuningMapping(HFMethod):
    """Prompt tuning (Lester et al. 2021) in HF peft's ``PROMPT_TUNING`` format."""

    peft_type = "PROMPT_TUNING"
    forms = ("prompt",)
    family = "additive"
    paper = "Lester et al. 2021, arXiv 2104.08691"
    handled = COMMON | {"prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs"}
    prompt_learning = True

    def targets(self, config: Mapping[str, Any], model: nn.Module) -> list[str]:
        return []

    def to_specs(self, config: Mapping[str, Any], model: nn.Module) -> list[DeltaSpec]:
        _check_single_stack(config, model, "prompt tuning")
        init = PROMPT_INITS.get(str(config.get("prompt_tuning_init", "RANDOM")).upper(), "vocab")
        form = PromptConfig(length=int(config["num_virtual_tokens"]), init=init)
        return [DeltaSpec(form=form, positions=("embed",), insertion="sequence")]

    def load(self, placement: Placement, pool: TensorPool) -> None:
        prompt = placement.placed.form.prompt
        with torch.no_grad():
            prompt.copy_(pool.take("prompt_embeddings", prompt.shape))

    def export(self, placements: Sequence[Placement], model: nn.Module, *,
               modules_to_save: Sequence[str] | None = None) -> MethodExport:
        if len(placements) != 1:
            raise ValueError(f"this adapter has {len(placements)} prompts; HF peft's prompt tuning has one")
        p = placements[0]
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            raise ValueError("prompt tuning of an encoder-decoder model cannot be saved for HF peft, which also "
                             "prompts the decoder")
        prompt = p.placed.form.prompt.detach()
        config = {"task_type": task_type(model), "num_virtual_tokens": prompt.shape[0], "token_dim": prompt.shape[1],
                  "num_transformer_submodules": 1, "prompt_tuning_init": "RANDOM"}
        return MethodExport(config=config, shared={"prompt_embeddings": prompt})


@register_hf_method
class PrefixTuningMapping(HFMethod):
    """Prefix tuning (Li & Liang 2021) in HF peft's ``PREFIX_TUNING`` format."""

    peft_type = "PREFIX_TUNING"
    forms = ("prefix",)
    family = "additive"
    paper = "Li & Liang 2021, arXiv 2101.00190"
    handled = COMMON | {"prefix_projection", "encoder_hidden_size", "init_weights"}
    prompt_learning = True

    def targets(self, config: Mapping[str, Any], model: nn.Module) -> list[str]:
        return []

    def to_specs(self, config: Mapping[str, Any], model: nn.Module) -> list[DeltaSpec]:
        _check_single_stack(config, model, "prefix tuning")
        form = PrefixConfig(length=int(config["num_virtual_tokens"]), reparam=None)
        return [DeltaSpec(form=form, positions=("attn",), insertion="sequence")]

    def begin_load(self, placements: Sequence[Placement], pool: TensorPool) -> None:
        length, width = placements[0].placed.form.key.shape
        pool.take("prompt_embeddings", (length, len(placements) * 2 * width))

    def load(self, placement: Placement, pool: TensorPool) -> None:
        form = placement.placed.form
        width = form.key.shape[1]
        start = 2 * placement.site.layer * width
        embeddings = pool.tensors["prompt_embeddings"]
        with torch.no_grad():
            form.key.copy_(embeddings[:, start:start + width])
            form.value.copy_(embeddings[:, start + width:start + 2 * width])

    def export(self, placements: Sequence[Placement], model: nn.Module, *,
               modules_to_save: Sequence[str] | None = None) -> MethodExport:
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            raise ValueError("prefix tuning of an encoder-decoder model cannot be saved for HF peft, whose prefix "
                             "covers encoder, decoder and cross-attention with one tensor")
        for p in placements:
            if not p.placed.form.shift_positions:
                raise ValueError(f"the prefix at {p.module} has shift_positions: false (real tokens at 0..T-1); HF "
                                 "peft's prefix numbers them after the prefix (l..l+T-1), so it would compute other "
                                 "outputs there: train with shift_positions: true to export")
            if p.site.position != "attn" or type(p.placed.compose).__name__ != "Add":
                raise ValueError(f"the prefix at {p.module} (position {p.site.position}, composition "
                                 f"{type(p.placed.compose).__name__.lower()}) has no HF peft equivalent: HF's prefix "
                                 "tuning prefixes every self-attention block, ungated")
        layers = sorted(p.site.layer for p in placements)
        total = len(dict.fromkeys(p.module for p in placements))
        stack_layers = _num_layers(model)
        if layers != list(range(stack_layers)) or total != stack_layers:
            raise ValueError(f"this adapter prefixes layers {layers}; HF peft's prefix tuning prefixes every one of "
                             f"the model's {stack_layers} layers")
        parts = []
        for p in sorted(placements, key=lambda q: q.site.layer):
            key, value = p.placed.form()
            parts += [key.detach(), value.detach()]
        embeddings = torch.cat(parts, dim=1)  # (l, L·2·d_kv)
        length, width = parts[0].shape
        config = {"task_type": task_type(model), "num_virtual_tokens": length, "token_dim": width,
                  "num_layers": stack_layers, "num_attention_heads": width // _head_dim(model),
                  "num_transformer_submodules": 1, "prefix_projection": False, "encoder_hidden_size": width}
        return MethodExport(config=config, shared={"prompt_embeddings": embeddings})


def _num_layers(model: nn.Module) -> int:
    config = model.config
    return int(next(getattr(config, k) for k in ("num_hidden_layers", "n_layer", "num_layers") if hasattr(config, k)))


__all__ = ["PrefixTuningMapping", "PromptTuningMapping", "task_type"]
