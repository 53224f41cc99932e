"""``unipeft serve``'s settings: one frozen config, from the command line or a YAML file with the same keys."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from unipeft.util.files import read_mapping

DEVICES = ("auto", "cpu", "cuda")
SERVE_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """How to serve one base model with many adapters.

    Attributes:
        model: short name (``smollm2-135m``) or a local model folder.
        adapters: adapter name → folder (unipeft's or HF peft's format), loaded at start and pinned (never evicted).
        adapter_dir: the only folder adapters may be loaded from at run time (``/v1/load_lora_adapter`` and on-demand
            loading by name); None: only the startup adapters are served.
        host, port: where to listen (127.0.0.1 by default: loopback only).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        dtype: the base's dtype (vLLM's names): ``float32``, ``bfloat16``, ``float16``, or ``auto``: chosen by the
            device's capability, never assumed — bfloat16 where it multiplies bf16 natively (a CUDA GPU of compute
            capability 8+; a CPU with AVX-512 BF16 or AMX, where a bf16 matmul measured 2.7x faster than fp32),
            else float16 on an older GPU and float32 on a CPU without it (bf16 measured 23-31x slower there, which
            is why ours follows the hardware where vLLM's ``auto`` takes the dtype the model's config names).
            Adapters are loaded in the base's dtype (as vLLM's ``--lora-dtype auto``).
        max_batch: the most sequences decoded together in one step.
        prefill_tokens: the most prompt tokens (rows x longest prompt, padding included) prefilled in one forward
            when several requests join the batch at once (a longer prompt is prefilled alone).
        queue_size: the most requests waiting to join the batch; past it a request gets 503 with Retry-After at once.
        max_resident: the most adapters held in memory; the least recently used unpinned one is evicted beyond it.
        max_tokens: the largest ``max_tokens`` a request may ask for (and the default).
        max_context: prompt + output tokens per sequence (default: the model's ``max_position_embeddings``).
        api_key: when set, every endpoint needs ``Authorization: Bearer <api_key>``.
        admin_key: when set, loading and unloading adapters needs this key (instead of ``api_key``).
        mixed: run every row with its own adapter in one forward (True), or one adapter per step, groups in turn
            (False: what a ``set_active`` server does; the benchmark's baseline).
    """

    model: str = "smollm2-135m"
    adapters: Mapping[str, str] = field(default_factory=dict)
    adapter_dir: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    dtype: str = "auto"
    max_batch: int = 16
    prefill_tokens: int = 4096
    queue_size: int = 64
    max_resident: int = 8
    max_tokens: int = 256
    max_context: int | None = None
    api_key: str | None = None
    admin_key: str | None = None
    mixed: bool = True

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; valid: {', '.join(DEVICES)}")
        if self.dtype not in SERVE_DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; valid: {', '.join(SERVE_DTYPES)}")
        for name in ("max_batch", "prefill_tokens", "queue_size", "max_resident", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if len(self.adapters) > self.max_resident:
            raise ValueError(f"{len(self.adapters)} startup adapters are pinned but max_resident is {self.max_resident}")
        for name in self.adapters:
            if not name or not all(c.isalnum() or c in "_-." for c in name):
                raise ValueError(f"invalid adapter name {name!r}: use letters, digits, '_', '-' and '.'")
        object.__setattr__(self, "adapters", dict(self.adapters))


def serve_config_from_dict(data: Mapping[str, Any]) -> ServeConfig:
    """A :class:`ServeConfig` from plain data (a YAML file's mapping).

    Raises:
        ValueError: for an unknown key (the message lists the valid ones) or a bad value.
    """
    valid = {f.name for f in dataclasses.fields(ServeConfig)}
    unknown = sorted(set(data) - valid)
    if unknown:
        raise ValueError(f"unknown serve config key(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    return ServeConfig(**data)


def load_serve_config(path: str | Path) -> ServeConfig:
    """Read a YAML/JSON serve config (the same keys as the command line's options)."""
    return serve_config_from_dict(read_mapping(path, what="serve config"))


__all__ = ["ServeConfig", "serve_config_from_dict", "load_serve_config", "DEVICES", "SERVE_DTYPES"]
