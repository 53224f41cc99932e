"""Loading a real model and its tokenizer by short name or path, with the head a task needs.

Everything is read from local files (``local_files_only=True``); nothing is downloaded. GGUF files
are converted once into a float32 safetensors folder in the cache (:mod:`unipeft.models.gguf`).
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from .cache import cache_problem, cache_root
from .configs import KNOWN_CONFIGS, MODEL_KINDS, ModelKind, auto_class, known_config
from .gguf import cache_name, cached_gguf_folder
from .registry import resolve_model

logger = logging.getLogger(__name__)

_HEADLESS_KINDS = ("causal_lm", "seq2seq_lm", "base")


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give ``tokenizer`` a pad token, reusing EOS (the usual choice for causal LMs) if it has none."""
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has neither a pad nor an EOS token; "
            "set tokenizer.pad_token before batching"
        )
    tokenizer.pad_token = tokenizer.eos_token
    logger.info("tokenizer has no pad token; using EOS %r", tokenizer.eos_token)


def _head_kwargs(kind: str, num_labels: int | None) -> dict[str, object]:
    """``from_pretrained`` keyword arguments shaping the head for ``kind``."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of: {', '.join(MODEL_KINDS)}")
    if kind == "regression":
        if num_labels not in (None, 1):
            raise ValueError(f"kind='regression' has one output; got num_labels={num_labels}")
        return {"num_labels": 1, "problem_type": "regression"}
    if kind == "classification":
        if num_labels is None:
            return {}  # keep the checkpoint's own head size (2 for a bare encoder)
        if num_labels < 2:
            raise ValueError(
                f"kind='classification' needs num_labels >= 2, got {num_labels}; use kind='regression'"
            )
        return {"num_labels": num_labels, "problem_type": "single_label_classification"}
    if num_labels is not None:
        raise ValueError(f"num_labels is only for classification/regression, not kind={kind!r}")
    return {}


#: Quantized loading through bitsandbytes (QLoRA bases): NF4 / FP4 4-bit blocks, or LLM.int8().
QUANTIZATIONS: tuple[str, ...] = ("nf4", "fp4", "int8")
#: Heads a task adds to a checkpoint (new weights, which bitsandbytes cannot quantize on load) and output layers.
_UNQUANTIZED_HEADS = ["classifier", "score", "qa_outputs", "lm_head"]


def _quantization_kwargs(quantization: str | None, dtype: torch.dtype, double_quant: bool = False) -> dict[str, object]:
    """``from_pretrained`` keyword arguments for a bitsandbytes-quantized load (none for ``None``)."""
    if quantization is None:
        return {}
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; valid: {', '.join(QUANTIZATIONS)}")
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=_UNQUANTIZED_HEADS)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization, bnb_4bit_compute_dtype=dtype,
                                    bnb_4bit_use_double_quant=double_quant, llm_int8_skip_modules=_UNQUANTIZED_HEADS)
    kwargs: dict[str, object] = {"quantization_config": config}
    if not torch.cuda.is_available():
        kwargs["device_map"] = "cpu"  # bitsandbytes quantizes when the weights are placed
    return kwargs


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    kind: ModelKind,
    num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    quantization: str | None = None,
    double_quant: bool = False,
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load a model and its tokenizer from local files.

    Args:
        name_or_path: a short name (``minilm``, ``smollm2-135m``), a local Hugging Face folder
            (with ``config.json``) or a ``.gguf`` file.
        kind: ``classification`` / ``regression`` (a sequence-classification head, new if the
            checkpoint has none), ``causal_lm``, ``seq2seq_lm``, or ``base`` (no head).
        num_labels: classes of a classification head (default: the checkpoint's, 2 for a bare
            encoder); regression always has 1; must be ``None`` for the other kinds.
        dtype: parameter dtype.
        seed: seeds the initialisation of weights the checkpoint lacks (a new head), so the
            same seed gives the same model; the global RNG state is left untouched.
        cache_dir: root of the converted-GGUF cache (default ``$UNIPEFT_CACHE`` or
            ``~/.cache/unipeft/models``).
        quantization: ``nf4`` / ``fp4`` (4-bit) or ``int8`` to quantize the linear layers with bitsandbytes
            (a QLoRA base; heads stay in ``dtype``), or ``None``.
        double_quant: with a 4-bit base, quantize the per-block constants too (QLoRA's double quantization).

    Returns:
        ``(model, tokenizer)``: the model in eval mode; the tokenizer always has a pad token
        (EOS if it had none) and ``model.config.pad_token_id`` matches it.

    Raises:
        ValueError: for an unknown kind, name or quantization, a config-only name, or a bad ``num_labels``.
        FileNotFoundError: if a short name's package is not installed.
    """
    head_kwargs = _head_kwargs(kind, num_labels) | _quantization_kwargs(quantization, dtype, double_quant)
    source = resolve_model(name_or_path)
    folder = source.path if source.format == "hf" else cached_gguf_folder(source, cache_dir)

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    _ensure_pad_token(tokenizer)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto_class(kind).from_pretrained(folder, dtype=dtype, local_files_only=True, **head_kwargs)
    model.eval()

    model.config.pad_token_id = tokenizer.pad_token_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_config(
    name_or_path: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None
) -> PretrainedConfig:
    """The configuration of a model, without loading weights.

    Args:
        name_or_path: a config-only name (``llama-7b``, ``roberta-base``, ... see
            :data:`~unipeft.models.configs.KNOWN_CONFIGS`), a short name, a local HF folder or a
            ``.gguf`` file. A GGUF file's config comes from its cache entry when one is valid,
            else from the file's metadata (slow, and nothing is cached).
        cache_dir: root of the converted-GGUF cache, as in :func:`load_model`.

    Raises:
        ValueError: if the name is unknown and no usable local path.
    """
    key = str(name_or_path)
    if key in KNOWN_CONFIGS:
        return known_config(key)
    source = resolve_model(key)
    if source.format == "hf":
        return AutoConfig.from_pretrained(source.path, local_files_only=True)
    folder = cache_root(cache_dir) / cache_name(source)
    if cache_problem(folder, source.path) is None:
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    return AutoConfig.from_pretrained(source.path.parent, gguf_file=source.path.name, local_files_only=True)
