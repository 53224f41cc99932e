"""unipeft.models: loading the real models available here, and configs of well-known ones.

- :func:`load_model` / :func:`load_config`: by short name (``minilm``, ``smollm2-135m``), a local
  Hugging Face folder or a ``.gguf`` file (converted once into a local cache).
- :data:`KNOWN_CONFIGS` and :func:`build_meta_model`: published configs of large models
  (``llama-7b``, ``roberta-base``, ...) instantiated on the meta device, to inspect without memory.
- :func:`build_quantized_model`: a randomly initialised model (``llama-33b``, ...) whose linear layers are
  quantized (NF4 / FP4 / int8) while it is built, never holding the full-precision base: a QLoRA base at scale.
"""

from .cache import CACHE_ENV, cache_root
from .configs import KNOWN_CONFIGS, MODEL_KINDS, KnownConfig, ModelKind, build_meta_model, known_config
from .gguf import cached_gguf_folder, clear_quantizer_marker, convert_gguf
from .load import load_config, load_model
from .quantized_build import BUILD_QUANTIZATIONS, build_quantized_model
from .registry import MODEL_NAMES, ModelSource, register_model, resolve_model

__all__ = [
    "BUILD_QUANTIZATIONS",
    "CACHE_ENV",
    "KNOWN_CONFIGS",
    "MODEL_KINDS",
    "MODEL_NAMES",
    "KnownConfig",
    "ModelKind",
    "ModelSource",
    "build_meta_model",
    "build_quantized_model",
    "cache_root",
    "cached_gguf_folder",
    "clear_quantizer_marker",
    "convert_gguf",
    "known_config",
    "load_config",
    "load_model",
    "register_model",
    "resolve_model",
]
