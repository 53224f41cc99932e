"""The benchmark report: ``report.md`` (tables, Pareto front, samples, setup) and its plots, from ``results.json``.

Every number in the report is formatted from the results data of the run that wrote it (:func:`fmt` is the only
formatter), so the tables can be checked against ``results.json``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from unipeft.bench.pareto import pareto_front
from unipeft.bench.plots import write_plots
from unipeft.bench.results import write_text_atomic

MAIN_COLUMNS = ("method", "recipe", "trainable params", "trainable %", "adapter MiB", "peak RSS MiB",
                "train s", "tokens/s", "latency ms", "merged ms")


def fmt(value: Any, kind: str) -> str:
    """One table cell: ``int`` (thousands separators), ``pct`` (4 decimals), ``metric`` (4 decimals), ``std``
    (``± `` and 4 decimals), ``f1`` (1 decimal), ``f0`` (no decimals), ``mib`` (bytes as MiB, 2 decimals);
    missing values are ``–``."""
    if value is None:
        return "–"
    if kind == "int":
        return f"{int(value):,}"
    if kind in ("pct", "metric"):
        return f"{value:.4f}"
    if kind == "std":
        return f"± {value:.4f}"
    if kind == "f1":
        return f"{value:.1f}"
    if kind == "f0":
        return f"{value:,.0f}"
    if kind == "mib":
        return f"{value / 2**20:.2f}"
    raise ValueError(f"unknown format {kind!r}; valid: int, pct, metric, std, f1, f0, mib")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def metric_names(summary: Sequence[Mapping[str, Any]]) -> list[str]:
    """The metrics of the summary, the main one first and the loss last."""
    names = list(dict.fromkeys(m for row in summary for m in row["metrics"]))
    main = summary[0]["main_metric"] if summary else None
    names.sort(key=lambda m: (m != main, m == "loss"))
    return names


def results_table(summary: Sequence[Mapping[str, Any]]) -> str:
    """The main table: one row per method, measurements then ``mean ± std`` of each metric over seeds."""
    metrics = metric_names(summary)
    header = [*MAIN_COLUMNS, *metrics, "seeds"]
    rows = []
    for r in summary:
        cells = [r["name"], r["method"], fmt(r["trainable_params"], "int"), fmt(r["trainable_percent"], "pct"),
                 fmt(r["adapter_bytes"], "mib"), fmt(r["peak_rss_mib"], "f0"), fmt(r["train_time_s"], "f1"),
                 fmt(r["tokens_per_s"], "f0"), fmt(r["latency_ms"], "f1"), fmt(r["latency_merged_ms"], "f1")]
        for m in metrics:
            stats = r["metrics"].get(m, {})
            mean = fmt(stats.get("mean"), "metric")
            cells.append(mean if len(r["seeds"]) < 2 else f"{mean} {fmt(stats.get('std'), 'std')}")
        cells.append(",".join(map(str, r["seeds"])))
        rows.append(cells)
    return _table(header, rows)


def runs_table(records: Sequence[Mapping[str, Any]]) -> str:
    """One row per (method, seed): the main metric, steps, times and memory."""
    rows = [[r["name"], str(r["seed"]), str(r["steps"]), fmt(r["metrics"].get(r["main_metric"]), "metric"),
             fmt(r["train_time_s"], "f1"), fmt(r.get("process_wall_s"), "f1"), fmt(r["peak_rss_mib"], "f0"),
             fmt(r.get("peak_rss_with_eval_mib"), "f0"), fmt(r.get("process_peak_rss_mib"), "f0"),
             fmt(r["latency"]["merge_max_abs_diff"], "metric")]
            for r in records]
    return _table(["method", "seed", "steps", records[0]["main_metric"] if records else "metric", "train s",
                   "process s", "peak RSS MiB (training)", "+ final eval", "whole process",
                   "max abs(merged − unmerged)"], rows)


def _samples(records: Sequence[Mapping[str, Any]]) -> str:
    parts = []
    for r in records:
        if not r.get("samples") or r["seed"] != min(x["seed"] for x in records if x["name"] == r["name"]):
            continue
        parts.append(f"**{r['name']}** (seed {r['seed']})\n")
        for s in r["samples"]:
            prompt = s["prompt"].strip().replace("\n", " ⏎ ")
            parts.append(f"- prompt: `{prompt[:300]}`\n  - output: {s['output'][:400]!r}\n"
                         f"  - reference: {s['references'][0][:400]!r}"
                         + (f" (+{len(s['references']) - 1} more)" if len(s["references"]) > 1 else ""))
        parts.append("")
    return "\n".join(parts)


def _setup(data: Mapping[str, Any]) -> str:
    env = data["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    machine = env["machine"]
    git = env.get("git") or {}
    threads = sorted({r["threads"] for r in data["records"]})
    lines = [f"- command: `{data['command']}`" if data.get("command") else "- command: (not recorded)",
             f"- started {data['started_at']}, finished {data['finished_at']}; this invocation's wall time "
             f"{data['wall_time_s']:.0f} s; all runs' processes together {data['run_time_s']:.0f} s",
             f"- load average (1/5/15 min) at start {data['load_average']['start']}, at end "
             f"{data['load_average']['end']} on {machine['usable_cpus']} usable CPUs",
             f"- machine: {machine['cpu']}, {machine['cpu_count']} CPUs, {machine['memory_gib']} GiB, "
             f"{machine['platform']}; CUDA: {machine['cuda_device'] or 'none'}; torch threads per run: "
             f"{', '.join(map(str, threads))}",
             f"- versions: {versions}",
             f"- git: {_commit(git)}"]
    runs = {f"{r['name']} seed {r['seed']}": _commit(r["git"]) for r in data["records"] if r.get("git")}
    if any(commit != _commit(git) for commit in runs.values()):  # runs resumed from earlier invocations
        lines.append("- git of each run (resumed runs came from earlier invocations): "
                     + "; ".join(f"{run}: {commit}" for run, commit in runs.items()))
    return "\n".join(lines)


def _commit(git: Mapping[str, Any]) -> str:
    return f"{git.get('commit', 'unknown')}{' (with uncommitted changes)' if git.get('dirty') else ''}"


DEFINITIONS = """\
- **trainable params / %**: parameters with `requires_grad` after attaching (as `unipeft inspect` counts them, the
  new classification head included), of all parameters of the adapted model; prefix tuning's reparameterisation MLP
  trains but is not saved, so it counts here and not in the adapter file.
- **adapter MiB**: the saved adapter folder (safetensors + config); full fine-tuning saves the whole model.
- **peak RSS**: the worker process's peak resident memory (`ru_maxrss`) from its start through the last training
  step (Python and torch, model, tokenised data, optimizer state, activations); each run is a fresh process. The
  per-run table adds the peak including the final evaluation, and the whole process's peak as the parent saw it
  (`wait4`, with the latency measurement). Workers run with `MALLOC_MMAP_THRESHOLD_` set (see the spec's
  `malloc_mmap_threshold`) so that freed tensors leave the resident set and the peak follows live memory.
- **train s / tokens/s**: seconds spent in optimizer steps (evaluation and loading excluded) and real (unpadded)
  tokens per second over them.
- **latency / merged ms**: the median forward time of one fixed batch of evaluation examples in inference mode,
  with the adapter unmerged and merged into the weights (– where the method cannot merge); the per-run table gives
  the largest output difference between the two.
- **metrics**: on the evaluation split after the last step; mean ± sample standard deviation over seeds."""


def render_report(data: Mapping[str, Any]) -> str:
    """The Markdown report of a benchmark's results data."""
    spec, summary, records = data["spec"], data["summary"], data["records"]
    lines = [f"# Benchmark `{spec['name']}`", "", spec.get("description") or "", ""]
    train = spec["train"]
    task = train.get("task", "?")
    lines += [f"Model `{train.get('model', '?')}`, task `{task}`, seeds {spec['seeds']}, "
              f"{len(spec['methods'])} methods; {len(records)} runs in this report.", ""]
    lines += ["## Results", "", results_table(summary), ""]
    if summary:
        metric, better = summary[0]["main_metric"], summary[0]["greater_is_better"]
        front = pareto_front([r["trainable_params"] for r in summary],
                             [r["metrics"][metric]["mean"] for r in summary], greater_is_better=better)
        names = ", ".join(f"{summary[i]['name']} ({fmt(summary[i]['metrics'][metric]['mean'], 'metric')} with "
                          f"{fmt(summary[i]['trainable_params'], 'int')} params)" for i in front)
        lines += [f"Pareto front of {metric} against trainable parameters: {names}.", ""]
    lines += ["![quality against trainable parameters](quality_vs_params.png)", "",
              "![peak memory per method](memory.png)", "", "![training time per method](time.png)", ""]
    lines += ["## Runs", "", runs_table(records), ""]
    if data.get("failures"):
        lines += ["## Failed runs", ""]
        lines += [f"- {f['name']} seed {f['seed']}: `{f['error'].splitlines()[-1] if f['error'] else '?'}`"
                  for f in data["failures"]]
        lines += [""]
    samples = _samples(records)
    if samples:
        lines += ["## Sample generations (greedy)", "", samples, ""]
    lines += ["## What the columns mean", "", DEFINITIONS, "", "## Setup", "", _setup(data), "",
              "Bench spec (the `train:` keys are shared by every method; a method's own keys override them):", "",
              "```yaml", yaml.safe_dump(spec, sort_keys=False, width=110).rstrip(), "```", ""]
    return "\n".join(lines)


def write_report(root: Path, data: Mapping[str, Any]) -> Path:
    """Write ``report.md`` and the three plots into ``root``; returns the report's path."""
    title = f"{data['spec']['name']}: {data['spec']['train'].get('model', '')} on {data['spec']['train'].get('task', '')}"
    write_plots(root, data["summary"], title)
    path = root / "report.md"
    write_text_atomic(path, render_report(data))
    return path


__all__ = ["render_report", "write_report", "results_table", "runs_table", "fmt", "metric_names"]
