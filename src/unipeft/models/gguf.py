"""Converting a GGUF file into a plain float32 Hugging Face folder, and caching the result.

transformers reads GGUF files through ``from_pretrained(..., gguf_file=...)``, dequantizing every
weight. Parsing the file's metadata is slow in pure Python (about 25 s for SmolLM2-135M here,
another ~8 s for its tokenizer), while the converted safetensors folder reloads in well under a
second, so each GGUF file is converted once into the cache (:mod:`unipeft.models.cache`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .cache import build_cached, cache_root
from .registry import MODEL_NAMES, ModelSource

logger = logging.getLogger(__name__)


def clear_quantizer_marker(model: PreTrainedModel) -> None:
    """Make a dequantized GGUF-loaded model an ordinary one that ``save_pretrained`` accepts.

    A model loaded from GGUF can keep ``model.hf_quantizer``, ``model.is_quantized``,
    ``model.quantization_method`` and ``model.config.quantization_config``; ``save_pretrained``
    refuses to write it while ``hf_quantizer`` is set. Its weights are plain float tensors once
    dequantized, so the marker is only metadata. (transformers already clears it when loading
    with ``GgufConfig(dequantize=True)``; this makes sure.)
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def convert_gguf(
    gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Write the GGUF file ``gguf_path`` as a float32 safetensors HF folder into ``out_dir``.

    The folder holds the causal-LM checkpoint (config, generation config, ``model.safetensors``)
    and the tokenizer, and loads without ``gguf_file=``.

    Returns:
        The model and tokenizer as read from the GGUF file (the model dequantized to float32).

    Raises:
        ValueError: if transformers cannot read the file's architecture, or a weight stays packed.
    """
    gguf_path = Path(gguf_path)
    folder, file = str(gguf_path.parent), gguf_path.name
    logger.info("converting %s to float32 safetensors in %s (parsing GGUF takes a while)", gguf_path, out_dir)
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=file,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
        local_files_only=True,
    )
    clear_quantizer_marker(model)
    packed = [name for name, p in model.named_parameters() if p.dtype != torch.float32]
    if packed:  # GGUF blocks are uint8 parameters; dequantized ones are float32
        raise ValueError(f"{gguf_path}: weights still packed after dequantization: {packed[:5]}")
    model.save_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file, local_files_only=True)
    tokenizer.save_pretrained(out_dir)
    return model, tokenizer


def cache_name(source: ModelSource) -> str:
    """The cache entry name of a GGUF source: its short name, or ``<file stem>-<path hash>``."""
    if source.name in MODEL_NAMES:
        return source.name
    digest = hashlib.sha256(str(source.path.resolve()).encode()).hexdigest()[:12]
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in source.path.stem)
    return f"{stem}-{digest}"


def cached_gguf_folder(source: ModelSource, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cached HF folder of the GGUF ``source``, converting it first if there is no valid entry.

    Args:
        source: a ``format="gguf"`` source from :func:`~unipeft.models.registry.resolve_model`.
        cache_dir: the cache root; default ``$UNIPEFT_CACHE`` or ``~/.cache/unipeft/models``.

    Raises:
        ValueError: if ``source`` is not a GGUF file.
    """
    if source.format != "gguf":
        raise ValueError(f"{source.name!r} is a {source.format!r} model, not a GGUF file")
    folder = cache_root(cache_dir) / cache_name(source)
    return build_cached(folder, source.path, lambda tmp: convert_gguf(source.path, tmp))
