"""The search's outputs, written from the study (so a report can be rebuilt from ``study.db`` alone):

- ``pareto.md`` / ``pareto.csv``: the Pareto front (Optuna's ``study.best_trials``: no trained trial has a better
  metric at a lower cost), one row per point: trial, recipe summary, lr, metric, trainable params and %, time;
- ``pareto.png``: every trained trial (pruned ones at their last intermediate value) and the front;
- ``recipes/<trial>.yaml``: each front point's recipe (``unipeft train CONFIG method=recipes/t007.yaml``), and
  ``bench.yaml``: the front points with their learning rates and the config's training keys, a spec that
  ``unipeft bench`` runs;
- ``search.json``: the cost of the search (wall time over every session, trials by status, training steps).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from unipeft.search.config import SearchConfig

STATUSES = ("trained", "pruned", "infeasible", "repeated")


def front(study: optuna.Study) -> list[FrozenTrial]:
    """The trained trials on the Pareto front, by cost."""
    best = [t for t in study.best_trials if t.user_attrs.get("status") == "trained"]
    return sorted(best, key=lambda t: (t.values[1], -t.values[0]))


def _row(t: FrozenTrial, cost: str) -> dict[str, Any]:
    a = t.user_attrs
    return {"trial": f"t{t.number:03d}", "recipe": a.get("summary", ""), "lr": a.get("lr"),
            "metric": round(t.values[0], 4), "params": a.get("params"), "percent": round(a.get("percent", 0.0), 4),
            "train_time_s": round(a.get("train_time_s", 0.0), 1),
            **({"step_s": round(a.get("step_s", 0.0), 4)} if cost == "time" else {})}


def write_report(config: SearchConfig, study: optuna.Study, *, wall_time_s: float, steps: int,
                 stopped_early: str | None = None) -> dict[str, Path]:
    """Write the outputs of the module docstring into ``config.output_dir``; returns their paths by name."""
    out = Path(config.output_dir)
    points = front(study)
    rows = [_row(t, config.objectives.cost) for t in points]
    paths = {"md": out / "pareto.md", "csv": out / "pareto.csv", "png": out / "pareto.png",
             "json": out / "search.json", "bench": out / "bench.yaml", "recipes": out / "recipes"}
    header = list(rows[0]) if rows else ["trial", "recipe", "lr", "metric", "params", "percent", "train_time_s"]
    with paths["csv"].open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    metric = config.metric
    lines = [f"# Pareto front: {metric} against {config.objectives.cost}", "",
             "| " + " | ".join(h if h != "metric" else metric for h in header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(f"{r[h]:,}" if h == "params" and r[h] is not None else str(r[h]) for h in header)
              + " |" for r in rows]
    paths["md"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    shutil.rmtree(paths["recipes"], ignore_errors=True)
    paths["recipes"].mkdir()
    methods = []
    for t in points:
        name = f"t{t.number:03d}"
        target = paths["recipes"] / f"{name}.yaml"
        shutil.copyfile(t.user_attrs["recipe"], target)
        methods.append({"name": name, "method": str(target.resolve()), "lr": t.user_attrs["lr"]})
    train = {k: v for k, v in config.train.items() if k not in ("progress", "threads")}
    bench = {"name": f"search_{config.study_name}", "description": f"the Pareto front of {out}",
             "train": {**train, "max_steps": config.budget.steps}, "seeds": [0, 1, 2], "methods": methods}
    if methods:
        paths["bench"].write_text(yaml.safe_dump(bench, sort_keys=False), encoding="utf-8")
    _plot(paths["png"], study, points, metric, config.objectives.cost)
    _write_cost(paths["json"], config, study, wall_time_s, steps, stopped_early, rows)
    return paths


def _plot(path: Path, study: optuna.Study, points: list[FrozenTrial], metric: str, cost: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def x(t: FrozenTrial) -> float:
        return float(t.user_attrs.get("step_s" if cost == "time" else "params", 0.0))

    trials = study.get_trials(deepcopy=False)
    trained = [t for t in trials if t.user_attrs.get("status") == "trained"]
    pruned = [t for t in trials if t.user_attrs.get("status") == "pruned"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([x(t) for t in trained], [t.values[0] for t in trained], c="0.6", label="trained")
    last = [(x(t), max((v for k, v in t.user_attrs.items() if k.startswith("eval_")), default=None)) for t in pruned]
    last = [(a, b) for a, b in last if b is not None]
    if last:
        ax.scatter(*zip(*last), marker="x", c="0.75", label="pruned (last evaluation)")
    ax.plot([x(t) for t in points], [t.values[0] for t in points], "o-", c="C3", label="Pareto front")
    for t in points:
        ax.annotate(f"t{t.number:03d}", (x(t), t.values[0]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("seconds per training step (alone)" if cost == "time" else "trainable parameters")
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write_cost(path: Path, config: SearchConfig, study: optuna.Study, wall_time_s: float, steps: int,
                stopped_early: str | None, rows: list[dict[str, Any]]) -> None:
    previous = json.loads(path.read_text()) if path.is_file() else {}
    sessions = previous.get("sessions", []) + [{"wall_time_s": round(wall_time_s, 1), "steps": steps}]
    trials = study.get_trials(deepcopy=False)
    counts = {s: sum(1 for t in trials if t.user_attrs.get("status") == s) for s in STATUSES}
    counts["failed"] = sum(1 for t in trials if t.state == TrialState.FAIL)
    total_steps = sum(int(t.user_attrs.get("steps", 0)) for t in trials)
    data = {"config": config.to_dict(), "metric": config.metric, "trials": len(trials), **counts,
            "wall_time_s": round(sum(s["wall_time_s"] for s in sessions), 1), "training_steps": total_steps,
            "sessions": sessions, "stopped_early": stopped_early, "front": rows}
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


__all__ = ["write_report", "front"]
