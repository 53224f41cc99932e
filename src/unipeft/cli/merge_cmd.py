"""``unipeft merge``: fold an adapter into its base model and save a plain transformers model folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from unipeft.cli.common import UsageError, resolve_task

KINDS = ("classification", "regression", "causal_lm", "seq2seq_lm", "base")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("merge", help="merge an adapter into the base and save a plain transformers model",
                              description="Load base + adapter, merge, remove every unipeft module and save the model "
                                          "and tokenizer with save_pretrained: OUT loads with transformers alone.")
    p.add_argument("--model", required=True, help="short name (minilm, smollm2-135m) or local model folder")
    p.add_argument("--adapter", required=True, help="adapter folder")
    head = p.add_mutually_exclusive_group(required=True)
    head.add_argument("--task", help="the task the adapter was trained on (decides the head)")
    head.add_argument("--kind", choices=KINDS, help="the model kind, instead of --task")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.set_defaults(run=run)


def head_size(adapter: str) -> int | None:
    """The number of outputs of the head copy saved in an adapter, if it has one."""
    from unipeft.persist.io import read_adapter_config

    for site in read_adapter_config(adapter)["sites"]:
        if site["position"] == "head" and site["base_shape"]:
            return int(site["base_shape"][0])
    return None


def run(args: argparse.Namespace) -> int:
    import unipeft
    from unipeft.util.atomic import atomic_write_dir
    from unipeft.models import load_model
    from unipeft.train.loop import model_kind

    if args.task:
        kind, num_labels = model_kind(resolve_task(args.task))
    else:
        kind, num_labels = args.kind, None
        if kind == "classification":
            num_labels = head_size(args.adapter)
            if num_labels is None:
                raise UsageError(f"adapter {args.adapter} has no head; give --task to know the number of labels")
    model, tokenizer = load_model(args.model, kind=kind, num_labels=num_labels)  # type: ignore[arg-type]
    peft = unipeft.load_adapter(model, args.adapter)
    peft.merge()
    merged = peft.detach(keep_merged=True)
    out = Path(args.out)

    def write(tmp: Path) -> None:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    atomic_write_dir(out, write)
    print(f"merged {args.adapter} into {args.model} ({kind}) -> {out}")
    return 0
