"""``unipeft serve``: an OpenAI-compatible server for a base model and many adapters (see docs/serving.md)."""

from __future__ import annotations

import argparse
import dataclasses

from unipeft.serve.config import DEVICES, SERVE_DTYPES


def _adapter(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--adapter takes NAME=PATH, got {text!r}")
    return name, path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve a base model and many adapters (OpenAI-compatible API)",
                              description="Start an OpenAI-compatible server (/v1/completions, /v1/chat/completions, "
                                          "/v1/models, /v1/load_lora_adapter, /metrics) for one base model and many "
                                          "adapters, batched together in every decoding step.")
    p.add_argument("--config", help="a YAML/JSON file with the same keys (command-line options override it)")
    p.add_argument("--model", help="short name (smollm2-135m) or local model folder")
    p.add_argument("--adapter", action="append", type=_adapter, default=[], metavar="NAME=PATH",
                   help="an adapter to serve from the start (unipeft or HF peft format; repeat)")
    p.add_argument("--adapter-dir", help="the only folder adapters may be loaded from at run time")
    p.add_argument("--host", help="default 127.0.0.1")
    p.add_argument("--port", type=int, help="default 8000 (0: any free port, printed at start)")
    p.add_argument("--device", choices=DEVICES)
    p.add_argument("--dtype", choices=SERVE_DTYPES,
                   help="the base's dtype (default auto: bfloat16 where the device multiplies it natively, else "
                        "float32 on a CPU, float16 on an older GPU)")
    p.add_argument("--max-batch", type=int, help="sequences decoded together per step (default 16)")
    p.add_argument("--prefill-tokens", type=int,
                   help="prompt tokens (rows x longest, padded) prefilled in one forward (default 4096)")
    p.add_argument("--queue-size", type=int, help="waiting requests before 503 (default 64)")
    p.add_argument("--max-resident", type=int, help="adapters held in memory (default 8; LRU eviction)")
    p.add_argument("--max-tokens", type=int, help="the largest max_tokens a request may ask for (default 256)")
    p.add_argument("--max-context", type=int, help="prompt + output tokens (default: the model's)")
    p.add_argument("--api-key", help="require Authorization: Bearer KEY on every endpoint")
    p.add_argument("--admin-key", help="require this key (alone) for loading and unloading adapters")
    p.add_argument("--no-mixed", action="store_true", help="one adapter per step, groups in turn (a baseline)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from unipeft.serve import ServeConfig, build_app, load_serve_config

    config = load_serve_config(args.config) if args.config else ServeConfig()
    overrides = {"model": args.model, "adapter_dir": args.adapter_dir, "host": args.host, "port": args.port,
                 "device": args.device, "dtype": args.dtype, "max_batch": args.max_batch,
                 "prefill_tokens": args.prefill_tokens, "queue_size": args.queue_size,
                 "max_resident": args.max_resident, "max_tokens": args.max_tokens, "max_context": args.max_context,
                 "api_key": args.api_key, "admin_key": args.admin_key}
    changes = {k: v for k, v in overrides.items() if v is not None}
    if args.adapter:
        changes["adapters"] = {**config.adapters, **dict(args.adapter)}
    if args.no_mixed:
        changes["mixed"] = False
    config = dataclasses.replace(config, **changes)
    app = build_app(config)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", timeout_graceful_shutdown=30)
    return 0
