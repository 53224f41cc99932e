"""Multi-job training: K LoRA jobs on one SmolLM2-135M base at once, against K sequential runs and K processes.

For K in ``--jobs`` (default 1, 4, 8) three contenders train the same K Alpaca LoRA jobs (r=8, α=16 on q and v,
dropout 0; job k has seed k and its own data order), each job ``--steps`` steps of ``--batch`` examples of at most
``--seq`` tokens, in float32 on the CPU:

* ``multi``: one ``unipeft train`` process with a ``jobs:`` config (:mod:`unipeft.train.multi`): one base, each
  step one forward and backward over the rows of all K jobs;
* ``sequential``: K ``unipeft train`` processes one after another (what a user does today);
* ``processes``: K ``unipeft train`` processes at once, the cores shared out (``threads`` = cores // K, at least 1).

Every run is a fresh process; its figures come from what the trainer writes: training time (steps only: loading and
evaluation excluded), training tokens, and the process's peak resident set (``VmHWM``, loading included: a process
holds its own base). Per K and contender: total tokens/s over all jobs (``sequential``: total tokens / the sum of the
runs' training times; ``processes``: / the longest one's, as they overlap), and peak memory (``sequential``: the
largest run's; ``processes``: the sum, as they are resident together). Ratios: throughput against ``sequential``,
memory against one job alone (the K = 1 sequential run). The issue's goals at K = 8: peak memory ≤ 1.3x one job's,
throughput ≥ 1.0x sequential. ``--gradient-checkpointing`` turns on checkpointing in every contender (then the K
jobs' activations, which grow with K in one batch, are mostly recomputed instead of stored). ``--jobs-per-pass P``
adds ``multi p=P`` contenders: the same run with ``jobs_per_pass: P`` (a forward and backward per P jobs' rows, so
the activations of P jobs at once, not K).

    python benchmarks/multi_train.py                          # K = 1, 4, 8; 4 steps of 4 x 128
    python benchmarks/multi_train.py --jobs 1 2 --steps 2 --batch 2 --seq 64 --out results.json
    python benchmarks/multi_train.py --gradient-checkpointing --jobs-per-pass 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import environment, format_table, write_json  # noqa: E402

#: The issue's goals at the largest K: peak memory against one job's, and total throughput against sequential.
GOAL_MEMORY, GOAL_THROUGHPUT = 1.3, 1.0


def job_keys(k: int, args: argparse.Namespace) -> dict[str, Any]:
    """The training keys of job ``k`` (the same in every contender)."""
    return {"method": "lora", "method_options": {"r": 8, "alpha": 16, "dropout": 0.0}, "seed": k,
            "batch_size": args.batch, "max_steps": args.steps, "train_limit": args.batch * args.steps * 2,
            "lr": 1e-3}


def shared_keys(args: argparse.Namespace, threads: int) -> dict[str, Any]:
    return {"model": args.model, "task": "alpaca", "max_length": args.seq, "eval_limit": 2, "eval_batch_size": 2,
            "progress": False, "threads": threads, "precision": "fp32", "device": "cpu",
            "gradient_checkpointing": args.gradient_checkpointing}


def unipeft_train(config: dict[str, Any], folder: Path) -> subprocess.Popen:
    """Start ``unipeft train`` on ``config`` (written to ``folder/config.yaml``)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": str(config.get("threads", 1))}
    return subprocess.Popen([sys.executable, "-m", "unipeft", "train", str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> None:
    _, err = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"unipeft train failed ({process.returncode}):\n{err[-3000:]}")


def job_figures(metrics_path: Path) -> dict[str, float]:
    m = json.loads(metrics_path.read_text())
    return {"train_s": m["train_time_s"], "tokens": m["throughput"]["tokens_per_s"] * m["train_time_s"],
            "peak_mib": m["peak_rss_mib"]}


def run_multi(k: int, args: argparse.Namespace, root: Path, per_pass: int | None = None) -> dict[str, float]:
    out = root / f"multi_{k}_{per_pass}"
    config = {**shared_keys(args, args.threads), "output_dir": str(out), "jobs_per_pass": per_pass,
              "jobs": [{"name": f"job{j}", **job_keys(j, args)} for j in range(k)]}
    finish(unipeft_train(config, out))
    run = json.loads((out / "multi.json").read_text())
    tokens = sum(job_figures(out / f"job{j}" / "metrics.json")["tokens"] for j in range(k))
    return {"train_s": run["train_time_s"], "tokens": tokens, "peak_mib": run["peak_rss_mib"]}


def run_sequential(k: int, args: argparse.Namespace, root: Path) -> dict[str, float]:
    figures = []
    for j in range(k):
        out = root / f"seq_{k}_{j}"
        finish(unipeft_train({**shared_keys(args, args.threads), **job_keys(j, args), "output_dir": str(out)}, out))
        figures.append(job_figures(out / "metrics.json"))
    return {"train_s": sum(f["train_s"] for f in figures), "tokens": sum(f["tokens"] for f in figures),
            "peak_mib": max(f["peak_mib"] for f in figures)}


def run_processes(k: int, args: argparse.Namespace, root: Path) -> dict[str, float]:
    threads = max(1, args.threads // k)
    outs = [root / f"proc_{k}_{j}" for j in range(k)]
    processes = [unipeft_train({**shared_keys(args, threads), **job_keys(j, args), "output_dir": str(out)}, out)
                 for j, out in enumerate(outs)]
    for p in processes:
        finish(p)
    figures = [job_figures(out / "metrics.json") for out in outs]
    return {"train_s": max(f["train_s"] for f in figures), "tokens": sum(f["tokens"] for f in figures),
            "peak_mib": sum(f["peak_mib"] for f in figures)}


CONTENDERS = {"multi": run_multi, "sequential": run_sequential, "processes": run_processes}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 4, 8], metavar="K")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4, help="examples per job and step")
    parser.add_argument("--seq", type=int, default=128, help="max tokens per example")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="every contender recomputes the base's activations in the backward")
    parser.add_argument("--jobs-per-pass", type=int, nargs="*", default=[], metavar="P",
                        help="also run multi with jobs_per_pass=P (one forward and backward per P jobs' rows)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if 1 not in args.jobs:
        args.jobs = [1, *args.jobs]  # one job alone is the memory reference
    results: dict[str, Any] = {"environment": environment(argv), "config": vars(args), "runs": []}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="unipeft_multi_") as tmp:
        for k in sorted(set(args.jobs)):
            runs = [(name, lambda k, a, r, c=contender: c(k, a, r)) for name, contender in CONTENDERS.items()]
            runs[1:1] = [(f"multi p={p}", lambda k, a, r, p=p: run_multi(k, a, r, per_pass=p))
                         for p in sorted(set(args.jobs_per_pass)) if p < k]
            for name, contender in runs:
                if k == 1 and name == "processes":
                    continue  # one process is the sequential run
                figures = contender(k, args, Path(tmp))
                figures["tokens_per_s"] = figures["tokens"] / max(figures["train_s"], 1e-9)
                results["runs"].append({"jobs": k, "contender": name, **figures})
                print(f"K={k} {name}: {figures['tokens_per_s']:.0f} tok/s, peak {figures['peak_mib']:.0f} MiB",
                      file=sys.stderr)
    one = next(r for r in results["runs"] if r["jobs"] == 1 and r["contender"] == "sequential")
    rows = []
    for r in results["runs"]:
        seq = next(s for s in results["runs"] if s["jobs"] == r["jobs"] and s["contender"] == "sequential")
        r["throughput_vs_sequential"] = r["tokens_per_s"] / seq["tokens_per_s"]
        r["memory_vs_one_job"] = r["peak_mib"] / one["peak_mib"]
        rows.append([r["jobs"], r["contender"], f"{r['train_s']:.1f}", f"{r['tokens_per_s']:,.0f}",
                     f"{r['throughput_vs_sequential']:.2f}x", f"{r['peak_mib']:,.0f}",
                     f"{r['memory_vs_one_job']:.2f}x"])
    top = max(args.jobs)
    variants = [r for r in results["runs"] if r["jobs"] == top and r["contender"].startswith("multi")]
    for r in variants:
        r["goal_met"] = r["memory_vs_one_job"] <= GOAL_MEMORY and r["throughput_vs_sequential"] >= GOAL_THROUGHPUT
    best = next((r for r in variants if r["goal_met"]), variants[0])  # a variant that meets it, else plain multi
    results["goal"] = {"jobs": top, "contender": best["contender"], "memory_vs_one_job": best["memory_vs_one_job"],
                       "throughput_vs_sequential": best["throughput_vs_sequential"], "met": best["goal_met"]}
    results["benchmark_s"] = time.perf_counter() - started
    print(format_table(["K", "contender", "train s", "tokens/s", "vs sequential", "peak MiB", "vs one job"], rows))
    for r in variants:
        print(f"\nK={top} {r['contender']}: peak {r['memory_vs_one_job']:.2f}x one job's (goal <= {GOAL_MEMORY}x), "
              f"throughput {r['throughput_vs_sequential']:.2f}x sequential (goal >= {GOAL_THROUGHPUT}x): "
              f"{'met' if r['goal_met'] else 'not met'}", end="")
    print()
    if args.out:
        write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
