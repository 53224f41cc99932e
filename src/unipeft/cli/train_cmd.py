"""``unipeft train CONFIG.yaml [key=value ...]``: run a training config and print a summary."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="fine-tune a model with a PEFT method (YAML config + key=value overrides)",
                              description="Fine-tune a model on a task with a PEFT recipe. Outputs go to output_dir: "
                                          "adapter/, metrics.json, history.json, curves.png.")
    p.add_argument("config", help="training config YAML (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override config keys, e.g. max_steps=100 lr=1e-3 method_options.r=16")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from unipeft.train import load_train_config, train

    config = load_train_config(args.config, args.overrides)
    result = train(config)
    rows = [("model", config.model), ("task", config.task), ("method", config.method),
            ("trainable", f"{result.trainable_params:,} of {result.total_params:,} params "
                          f"({result.trainable_percent:.4f}%)")]
    rows += [(name, f"{value:.4f}") for name, value in result.metrics.items()]
    rows += [("train time", f"{result.train_time_s:.1f} s ({result.steps} steps, "
                            f"{result.steps / max(result.train_time_s, 1e-9):.2f} steps/s; "
                            f"{result.wall_time_s:.1f} s with loading and evaluation)"),
             ("peak memory", f"{result.peak_rss_mib:,.0f} MiB (peak RSS)"),
             ("adapter", str(result.adapter_dir)),
             ("metrics", str(result.output_dir / "metrics.json"))]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
    return 0
