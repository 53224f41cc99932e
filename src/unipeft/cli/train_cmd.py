"""``unipeft train CONFIG.yaml [key=value ...] [--nproc N]``: run a training config and print a summary.

A config with a ``jobs:`` list trains all its jobs at once on one base (:mod:`unipeft.train.multi`); its overrides
set every job's keys (over the job's own).

``--nproc N`` starts the same command on N processes through torchrun (``torch.distributed.run --standalone``),
which is the same as ``torchrun --nproc-per-node N -m unipeft train CONFIG ...`` (DDP, or FSDP2 with
``strategy=fsdp``; see :mod:`unipeft.train.distributed`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="fine-tune a model with a PEFT method (YAML config + key=value overrides)",
                              description="Fine-tune a model on a task with a PEFT recipe. Outputs go to output_dir: "
                                          "adapter/, metrics.json, history.json, curves.png.")
    p.add_argument("config", help="training config YAML (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override config keys, e.g. max_steps=100 lr=1e-3 method_options.r=16")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train on N processes (launches torchrun; the config's strategy: ddp or fsdp; gloo on CPU, "
                        "NCCL on GPU)")
    p.set_defaults(run=run)


def run_jobs(args: argparse.Namespace, data: dict) -> int:
    """A config with ``jobs:``: every job trained at once on one base (:mod:`unipeft.train.multi`)."""
    from unipeft.train.multi import train_jobs
    from unipeft.train.multi_config import load_multi_config

    if args.nproc > 1:
        raise ValueError(f"--nproc {args.nproc}: a multi-job config trains its jobs in one process on one base; "
                         "drop --nproc")
    config = load_multi_config(data, args.overrides)
    results = train_jobs(config)
    width = max(len(name) for name in results)
    for name, result in results.items():
        scores = ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items())
        print(f"{name.ljust(width)}  {result.steps} steps, {result.trainable_params:,} params, {scores}  "
              f"-> {result.adapter_dir}")
    print(f"{'run'.ljust(width)}  {Path(config.output_dir) / 'multi.json'}")
    return 0


def run(args: argparse.Namespace) -> int:
    from unipeft.train import load_train_config, train
    from unipeft.train.multi_config import is_multi
    from unipeft.util.files import read_mapping

    data = read_mapping(args.config, what="config file")
    if is_multi(data):
        return run_jobs(args, data)
    config = load_train_config(args.config, args.overrides)  # checked here, before any process starts
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
                   "-m", "unipeft", "train", args.config, *args.overrides]
        return subprocess.run(command, check=False).returncode
    result = train(config)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    rows = [("model", config.model), ("task", config.task), ("method", config.method),
            ("device", f"{result.device}, {result.precision}"),
            ("trainable", f"{result.trainable_params:,} of {result.total_params:,} params "
                          f"({result.trainable_percent:.4f}%)")]
    rows += [(name, f"{value:.4f}") for name, value in result.metrics.items()]
    rows += [("train time", f"{result.train_time_s:.1f} s ({result.steps} steps, "
                            f"{result.steps / max(result.train_time_s, 1e-9):.2f} steps/s; "
                            f"{result.wall_time_s:.1f} s with loading and evaluation)"),
             ("throughput", f"{result.tokens_per_s:,.0f} tokens/s"),
             ("peak memory", f"{result.peak_rss_mib:,.0f} MiB (peak RSS)"
                             + (f", {result.peak_device_mib:,.0f} MiB on the GPU" if result.peak_device_mib else "")),
             ("adapter", str(result.adapter_dir)),
             ("metrics", str(result.output_dir / "metrics.json"))]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
    return 0
