"""``unipeft inspect MODEL``: a model's family, its positions, and exact trainable-parameter counts of recipes.

Config-only models (``llama-7b``, ``roberta-base``, ...) are built on the meta device, with no weights and no memory;
``--meta`` does the same for real models.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from unipeft.cli.common import UsageError, table

if TYPE_CHECKING:
    from torch import nn

KINDS = ("classification", "regression", "causal_lm", "seq2seq_lm", "base")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("inspect", help="show a model's positions and the trainable parameters of methods",
                              description="Print the model family, the positions found (module in layer 0, number of "
                                          "layers) and, for each --method, the exact trainable-parameter count.")
    p.add_argument("model", help="short name, local model folder, config.json path (or a folder with only a config), "
                                 "or config-only name (llama-7b, roberta-base, ...)")
    p.add_argument("--method", action="append", default=[], metavar="RECIPE[:key=value,...]",
                   help="a recipe to count (repeatable), with options, e.g. lora or lora:r=16,alpha=32")
    p.add_argument("--kind", choices=KINDS, help="which head to build (default: the checkpoint's own)")
    p.add_argument("--meta", action="store_true", help="build on the meta device (no weights) even for real models")
    p.set_defaults(run=run)


def parse_method(text: str) -> tuple[str, dict[str, Any]]:
    """``"lora:r=16,positions=[attn.q,attn.v]"`` → ``("lora", {"r": 16, "positions": ["attn.q", "attn.v"]})``.

    Raises:
        UsageError: for an option without ``=``.
    """
    name, _, rest = text.partition(":")
    options: dict[str, Any] = {}
    for item in (i for i in re.split(r",(?![^\[]*\])", rest) if i) if rest else ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"bad method option {item!r} in {text!r}: use RECIPE:key=value,key=value")
        options[key.strip()] = yaml.safe_load(value)
    return name, options


def default_kind(name: str, config: Any) -> str:
    """The kind a checkpoint was released as: from the known-config table, else from ``config.architectures``."""
    from unipeft.models import KNOWN_CONFIGS

    if name in KNOWN_CONFIGS:
        return KNOWN_CONFIGS[name].kind
    for arch in getattr(config, "architectures", None) or ():
        for suffix, kind in (("ForCausalLM", "causal_lm"), ("ForSequenceClassification", "classification"),
                             ("ForConditionalGeneration", "seq2seq_lm"), ("LMHeadModel", "causal_lm")):
            if arch.endswith(suffix):
                return kind
    return "base"


#: Files whose presence in a folder means it holds weights (else ``inspect`` counts from its config alone).
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt")


def config_only(name: str) -> Path | None:
    """The ``config.json`` to count from when ``name`` is that file, or a folder holding a config and no weights."""
    path = Path(name)
    if path.is_file() and path.suffix == ".json":
        return path
    if path.is_dir() and (path / "config.json").is_file() and not any(
            f.name.endswith(WEIGHT_SUFFIXES) for f in path.iterdir()):
        return path / "config.json"
    return None


def build(name: str, kind: str | None, meta: bool) -> tuple[nn.Module, str, bool]:
    """The model to inspect, its kind, and whether it is on the meta device.

    A config-only name, a ``config.json`` path or a folder with a config and no weights is built on the meta device
    (no weights, no tokenizer); so is any model with ``meta``.
    """
    from unipeft.models import KNOWN_CONFIGS, build_meta_model, load_config, load_model

    config_file = config_only(name)
    if config_file is not None:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(str(config_file), local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"{config_file} is not a transformers model config: {err}") from None
        kind = kind or default_kind(name, config)
        return build_meta_model(config, kind), kind, True  # type: ignore[arg-type]
    config = load_config(name)
    kind = kind or default_kind(name, config)
    if meta or name in KNOWN_CONFIGS:
        return build_meta_model(config, kind), kind, True  # type: ignore[arg-type]
    model, _ = load_model(name, kind=kind)  # type: ignore[arg-type]
    return model, kind, False


def positions_table(model: nn.Module) -> str:
    """One row per position and layer stack: the module it resolves to in layer 0 and the number of layers."""
    from unipeft.core.positions import available_positions, resolve_positions

    rows = []
    for position in available_positions(model):
        stacks: dict[str | None, list] = {}
        for site in resolve_positions(model, [position]):
            stacks.setdefault(site.stack, []).append(site)
        for stack, sites in stacks.items():
            layers = {s.layer for s in sites if s.layer is not None}
            first = [s for s in sites if s.layer in (None, min(layers, default=None))]
            modules = list(dict.fromkeys(s.module for s in first))
            module = ", ".join(modules[:2]) + (f", ... ({len(modules)} modules)" if len(modules) > 2 else "")
            rows.append((position, stack or "-", module, len(layers) if layers else "-"))
    return table(rows, header=("position", "stack", "module (layer 0)", "layers"))


def count_method(model: nn.Module, kind: str, text: str) -> list[tuple[str, str, str, str]]:
    """Attach one method, count its parameters, and detach again.

    The count is what trains into the adapter file; parameters that train but are not saved (prefix tuning's
    reparameterising MLP) are named separately in the note."""
    import unipeft
    from unipeft.core.recipe import load_recipe
    from unipeft.train.loop import with_head

    name, options = parse_method(text)
    recipe = with_head(load_recipe(name).with_options(**options), kind)
    peft = unipeft.attach(model, recipe)
    try:
        summary = peft.summary()
    finally:
        peft.detach()
    head = summary.per_position.get("head", 0)
    note = ""
    if kind in ("classification", "regression"):
        note = (f"includes the new {kind} head ({head:,} params)" if head else
                "includes the whole model, head too" if recipe.train_base else "head not counted")
    if summary.training_only:  # prefix tuning's reparameterising MLP trains, but is dropped at save time
        note = "; ".join(filter(None, [note, f"+{summary.training_only:,} training-only (reparameterisation, "
                                             f"not saved; {summary.trainable:,} train in all)"]))
    saved = summary.trainable - summary.training_only
    total = summary.total - summary.training_only
    parts = ", ".join(f"{k}={v:,}" for k, v in summary.per_position.items())
    return [(text, f"{saved:,}", f"{100.0 * saved / total:.4f}%", "; ".join(filter(None, [parts, note])))]


def run(args: argparse.Namespace) -> int:
    from unipeft.core.positions import model_arch_map

    model, kind, on_meta = build(args.model, args.kind, args.meta)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    where = "meta device (no weights)" if on_meta else "loaded weights"
    print(f"model   {args.model}  ({type(model).__name__}, kind {kind}, {where})")
    print(f"family  {model_arch_map(model).family}")
    print(f"params  {total:,}")
    print()
    print(positions_table(model))
    if args.method:
        rows = [row for text in args.method for row in count_method(model, kind, text)]
        print()
        print(table(rows, header=("method", "trainable (saved)", "% of all", "per position")))
    return 0
