"""Architecture maps: where each canonical position lives in each model family.

A position (He et al. 2022, "modified representation") is an architecture-independent name for a place in a
transformer: ``attn.q``, ``attn.k``, ``attn.v``, ``attn.o``, ``attn`` (the whole attention sub-layer), ``xattn.*``
(cross-attention, encoder-decoder models), ``ffn.up``, ``ffn.gate``, ``ffn.down``, ``ffn`` (the whole FFN sub-layer),
``norm``, and the model-level ``embed`` and ``head``.

This file is data: one small table per family. Paths inside a layer are relative to the layer module; model-level
paths are suffixes of full module names. Families not listed are detected from module structure
(:mod:`unipeft.core.detect`), and raw module-name patterns work on any model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Union


@dataclass(frozen=True, kw_only=True)
class Sublayer:
    """A whole sub-layer: its input is the input of ``entry``; its output is the output of ``exit``.

    Sequential deltas read the exit's output h; parallel deltas read the entry's input x (He et al. 2022, Fig. 1).
    """

    entry: str
    exit: str


@dataclass(frozen=True, kw_only=True)
class FusedSlice:
    """One of ``parts`` equal slices of the output features of a fused projection (GPT-2's ``c_attn``)."""

    module: str
    index: int
    parts: int


Target = Union[str, Sublayer, FusedSlice, tuple[str, ...]]


@dataclass(frozen=True, kw_only=True)
class Stack:
    """A stack of identical layers, e.g. BERT's ``encoder.layer`` or T5's ``decoder.block``.

    ``layers`` is a regular expression matched against the *end* of the ModuleList's full name.
    """

    name: str
    layers: str
    positions: Mapping[str, Target]


@dataclass(frozen=True, kw_only=True)
class ArchMap:
    """Position table of one model family."""

    family: str
    model_types: tuple[str, ...]
    stacks: tuple[Stack, ...]
    model_positions: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # position -> name suffixes


_BERT_LAYER: dict[str, Target] = {
    "attn.q": "attention.self.query",
    "attn.k": "attention.self.key",
    "attn.v": "attention.self.value",
    "attn.o": "attention.output.dense",
    "attn": Sublayer(entry="attention.self", exit="attention.output.dense"),
    "ffn.up": "intermediate.dense",
    "ffn.down": "output.dense",
    "ffn": Sublayer(entry="intermediate", exit="output.dense"),
    "norm": ("attention.output.LayerNorm", "output.LayerNorm"),
}

BERT = ArchMap(
    family="bert",
    model_types=("bert", "roberta", "xlm-roberta", "camembert", "electra", "mpnet"),
    stacks=(Stack(name="encoder", layers=r"encoder\.layer", positions=_BERT_LAYER),),
    model_positions={
        "embed": ("embeddings.word_embeddings",),
        "head": ("classifier", "cls.predictions.decoder", "lm_head", "qa_outputs"),
    },
)

GPT2 = ArchMap(
    family="gpt2",
    model_types=("gpt2",),
    stacks=(
        Stack(
            name="decoder",
            layers=r"h",
            positions={
                "attn.q": FusedSlice(module="attn.c_attn", index=0, parts=3),
                "attn.k": FusedSlice(module="attn.c_attn", index=1, parts=3),
                "attn.v": FusedSlice(module="attn.c_attn", index=2, parts=3),
                "attn.qkv": "attn.c_attn",
                "attn.o": "attn.c_proj",
                "attn": Sublayer(entry="attn", exit="attn.c_proj"),
                "ffn.up": "mlp.c_fc",
                "ffn.down": "mlp.c_proj",
                "ffn": Sublayer(entry="mlp", exit="mlp.c_proj"),
                "norm": ("ln_1", "ln_2"),
            },
        ),
    ),
    model_positions={"embed": ("wte",), "head": ("lm_head", "score")},
)

_LLAMA_LAYER: dict[str, Target] = {
    "attn.q": "self_attn.q_proj",
    "attn.k": "self_attn.k_proj",
    "attn.v": "self_attn.v_proj",
    "attn.o": "self_attn.o_proj",
    "attn": Sublayer(entry="self_attn", exit="self_attn.o_proj"),
    "ffn.gate": "mlp.gate_proj",
    "ffn.up": "mlp.up_proj",
    "ffn.down": "mlp.down_proj",
    "ffn": Sublayer(entry="mlp", exit="mlp.down_proj"),
    "norm": ("input_layernorm", "post_attention_layernorm"),
}

LLAMA = ArchMap(
    family="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "smollm3"),
    stacks=(Stack(name="decoder", layers=r"layers", positions=_LLAMA_LAYER),),
    model_positions={"embed": ("embed_tokens",), "head": ("lm_head", "score")},
)


def _t5_attention(prefix: str, module: str) -> dict[str, Target]:
    base = f"{prefix}.{module}"
    return {
        "q": f"{base}.q",
        "k": f"{base}.k",
        "v": f"{base}.v",
        "o": f"{base}.o",
        "": Sublayer(entry=base, exit=f"{base}.o"),
    }


def _t5_layer(*, cross: bool) -> dict[str, Target]:
    table: dict[str, Target] = {}
    for key, value in _t5_attention("layer.0", "SelfAttention").items():
        table[f"attn.{key}" if key else "attn"] = value
    if cross:
        for key, value in _t5_attention("layer.1", "EncDecAttention").items():
            table[f"xattn.{key}" if key else "xattn"] = value
    ff = "layer.2" if cross else "layer.1"
    table.update(
        {
            "ffn.up": (f"{ff}.DenseReluDense.wi", f"{ff}.DenseReluDense.wi_1"),
            "ffn.gate": f"{ff}.DenseReluDense.wi_0",
            "ffn.down": f"{ff}.DenseReluDense.wo",
            "norm": tuple(f"layer.{i}.layer_norm" for i in range(3 if cross else 2)),
        }
    )
    # T5 v1.0 has DenseReluDense.wi; T5 v1.1 (gated) has wi_0 and wi_1. Missing paths are skipped when the
    # position also has a path that exists (see positions.resolve).
    table["ffn"] = Sublayer(entry=f"{ff}.DenseReluDense", exit=f"{ff}.DenseReluDense.wo")
    return table


T5 = ArchMap(
    family="t5",
    model_types=("t5", "mt5", "umt5"),
    stacks=(
        Stack(name="encoder", layers=r"encoder\.block", positions=_t5_layer(cross=False)),
        Stack(name="decoder", layers=r"decoder\.block", positions=_t5_layer(cross=True)),
    ),
    model_positions={"embed": ("shared",), "head": ("lm_head",)},
)


def _bart_layer(*, cross: bool) -> dict[str, Target]:
    table: dict[str, Target] = {
        "attn.q": "self_attn.q_proj",
        "attn.k": "self_attn.k_proj",
        "attn.v": "self_attn.v_proj",
        "attn.o": "self_attn.out_proj",
        "attn": Sublayer(entry="self_attn", exit="self_attn.out_proj"),
        "ffn.up": "fc1",
        "ffn.down": "fc2",
        "ffn": Sublayer(entry="fc1", exit="fc2"),
        "norm": ("self_attn_layer_norm", "final_layer_norm"),
    }
    if cross:
        table.update(
            {
                "xattn.q": "encoder_attn.q_proj",
                "xattn.k": "encoder_attn.k_proj",
                "xattn.v": "encoder_attn.v_proj",
                "xattn.o": "encoder_attn.out_proj",
                "xattn": Sublayer(entry="encoder_attn", exit="encoder_attn.out_proj"),
                "norm": ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"),
            }
        )
    return table


BART = ArchMap(
    family="bart",
    model_types=("bart", "mbart"),
    stacks=(
        Stack(name="encoder", layers=r"encoder\.layers", positions=_bart_layer(cross=False)),
        Stack(name="decoder", layers=r"decoder\.layers", positions=_bart_layer(cross=True)),
    ),
    model_positions={"embed": ("shared",), "head": ("lm_head", "classification_head.out_proj")},
)

ARCH_MAPS: tuple[ArchMap, ...] = (BERT, GPT2, LLAMA, T5, BART)


def arch_map_for(model_type: str | None) -> ArchMap | None:
    """Return the table for a ``config.model_type``, or None if the family has no table."""
    for arch in ARCH_MAPS:
        if model_type in arch.model_types:
            return arch
    return None
