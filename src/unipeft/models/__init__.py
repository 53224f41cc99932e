"""unipeft.models: loading the real models available here, and configs of well-known ones.

- :func:`load_model` / :func:`load_config`: by short name (``minilm``, ``smollm2-135m``), a local
  Hugging Face folder or a ``.gguf`` file (converted once into a local cache).
- :data:`KNOWN_CONFIGS` and :func:`build_meta_model`: published configs of large models
  (``llama-7b``, ``roberta-base``, ...) instantiated on the meta device, to inspect without memory.
"""

from .cache import CACHE_ENV, cache_root
from .configs import KNOWN_CONFIGS, MODEL_KINDS, KnownConfig, ModelKind, build_meta_model, known_config
from .gguf import cached_gguf_folder, clear_quantizer_marker, convert_gguf
from .load import load_config, load_model
from .registry import MODEL_NAMES, ModelSource, register_model, resolve_model

__all__ = [
    "CACHE_ENV",
    "KNOWN_CONFIGS",
    "MODEL_KINDS",
    "MODEL_NAMES",
    "KnownConfig",
    "ModelKind",
    "ModelSource",
    "build_meta_model",
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
