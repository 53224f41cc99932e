"""``unipeft eval``: evaluate a saved adapter on a task's validation split."""

from __future__ import annotations

import argparse

from unipeft.cli.common import add_data_args, resolve_task


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate an adapter on a task's validation split",
                              description="Load a model and an adapter and print the task's validation metrics.")
    p.add_argument("--model", required=True, help="short name (minilm, smollm2-135m) or local model folder")
    p.add_argument("--task", required=True, help="built-in task name, or a training config YAML (for user tasks)")
    p.add_argument("--adapter", required=True, help="adapter folder (e.g. runs/sst2_lora/adapter)")
    p.add_argument("--merged", action="store_true", help="merge the adapter into the weights first")
    p.add_argument("--batch-size", type=int, default=64, help="evaluation batch size (default: 64)")
    p.add_argument("--limit", type=int, help="evaluate only the first N examples")
    add_data_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import unipeft
    from unipeft.data import encode, load_rows
    from unipeft.models import load_model
    from unipeft.train.evaluate import evaluate
    from unipeft.train.loop import model_kind

    task = resolve_task(args.task)
    kind, num_labels = model_kind(task)
    model, tokenizer = load_model(args.model, kind=kind, num_labels=num_labels)  # type: ignore[arg-type]
    peft = unipeft.load_adapter(model, args.adapter)
    if args.merged:
        peft.merge()
    examples = encode(load_rows(task, "eval", args.data_dir, args.limit), task, tokenizer, args.max_length)
    metrics = evaluate(model, task, examples, args.batch_size, pad_token_id=tokenizer.pad_token_id)
    where = " (merged)" if args.merged else ""
    print(f"{task.name} validation, {len(examples)} examples, {args.model} + {args.adapter}{where}")
    width = max(len(k) for k in metrics)
    print("\n".join(f"{k.ljust(width)}  {v:.4f}" for k, v in metrics.items()))
    return 0
