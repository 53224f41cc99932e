"""``unipeft serve``: many adapters on one base behind an OpenAI-compatible server, with continuous mixed batches.

    from unipeft.serve import ServeConfig, build_app
    app = build_app(ServeConfig(model="smollm2-135m", adapters={"support": "runs/support/adapter"}))

See :mod:`unipeft.serve.engine` (continuous batching), :mod:`unipeft.serve.registry` (adapters, memory budget,
eviction, the allowed folder) and :mod:`unipeft.serve.api` (the HTTP API); docs/serving.md.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch

from unipeft.serve.config import ServeConfig, load_serve_config, serve_config_from_dict

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when it is available, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA device is available; use --device cpu or auto")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The torch dtype ``dtype`` names; ``auto``: bfloat16 where ``device`` multiplies it natively, else float16 on
    a GPU and float32 on a CPU (the trainer's capability rule, :func:`unipeft.train.precision.resolve_precision`)."""
    if dtype != "auto":
        return getattr(torch, dtype)
    from unipeft.train.precision import DTYPES, resolve_precision

    return DTYPES[resolve_precision("auto", device)]


def build_app(config: ServeConfig) -> Any:
    """Load the base and the startup adapters, start the engine, and return the FastAPI app (the engine drains and
    stops when the app shuts down)."""
    from fastapi import FastAPI

    from unipeft.models import load_model
    from unipeft.peft import Peft
    from unipeft.serve.api import create_app
    from unipeft.serve.engine import Engine
    from unipeft.serve.registry import AdapterRegistry

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    model, tokenizer = load_model(config.model, kind="causal_lm")
    model.to(device=device, dtype=dtype).eval()
    peft = Peft(model)
    registry = AdapterRegistry(peft, adapter_dir=config.adapter_dir, max_resident=config.max_resident)
    for name, path in config.adapters.items():
        registry.load(name, path, pinned=True, allow_anywhere=True)  # the operator's own command line
    max_context = config.max_context or int(getattr(model.config, "max_position_embeddings", 2048))
    engine = Engine(registry, max_batch=config.max_batch, queue_size=config.queue_size, max_context=max_context,
                    mixed=config.mixed, prefill_tokens=config.prefill_tokens)
    base_name = Path(config.model).name
    app: FastAPI = create_app(engine, tokenizer, base_name=base_name, max_tokens=config.max_tokens,
                              max_context=max_context, api_key=config.api_key, admin_key=config.admin_key)

    @asynccontextmanager
    async def lifespan(_: Any):
        engine.start()
        log.info("serving %s (%s) with adapters %s on %s", base_name, dtype, ", ".join(registry.names()) or "-",
                 device)
        try:
            yield
        finally:
            engine.stop()

    app.router.lifespan_context = lifespan
    return app


__all__ = ["ServeConfig", "build_app", "load_serve_config", "serve_config_from_dict", "resolve_device",
           "resolve_dtype"]
