"""Does a recipe found by ``unipeft search`` beat the best shipped recipe at the same parameter budget, by more than
the spread over seeds? The verdict of issue 14's goal, read from one ``unipeft bench`` output folder in which the
shipped recipes and the found ones were trained on the same budget and the same seeds.

    unipeft bench configs/search_sst2_baselines.yaml                  # the shipped recipes and found_* entries
    python benchmarks/search_compare.py runs/bench/search_sst2_baselines --max-percent 0.5

Found recipes are the methods named ``found*`` (or those given with ``--found``); every other method at most
``--max-percent`` trainable parameters is a shipped one. For each method it prints the seeds' metric values, their
mean, sample standard deviation and range (max - min); then the best shipped and the best found method by mean,
the margin between them, the spread (the larger of the two ranges) and the verdict: the found recipe beats the
shipped one when the margin exceeds the spread. Both sides must have run the same seeds and training steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Method:
    """One method's runs: its metric per seed and its trainable percentage."""

    name: str
    percent: float
    values: dict[int, float]
    steps: int

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values.values())

    @property
    def std(self) -> float:
        return statistics.stdev(self.values.values()) if len(self.values) > 1 else 0.0

    @property
    def range(self) -> float:
        return max(self.values.values()) - min(self.values.values())


def load_methods(folder: Path) -> tuple[list[Method], str, bool]:
    """Every method of a bench output folder, its main metric's name and whether greater is better."""
    records = [json.loads(p.read_text()) for p in sorted((folder / "results").glob("*/seed*.json"))]
    if not records:
        raise SystemExit(f"no bench records under {folder / 'results'}")
    metric, greater = records[0]["main_metric"], bool(records[0]["greater_is_better"])
    by_name: dict[str, list[dict]] = {}
    for r in records:
        by_name.setdefault(r["name"], []).append(r)
    methods = [Method(name=name, percent=float(runs[0]["trainable_percent"]), steps=int(runs[0]["steps"]),
                      values={int(r["seed"]): float(r["metrics"][metric]) for r in runs})
               for name, runs in by_name.items()]
    return methods, metric, greater


def compare(methods: list[Method], found_names: set[str] | None, max_percent: float, greater: bool) -> dict:
    """The verdict (see the module docstring) as a dict: ``shipped``, ``found`` (the best of each), ``margin``,
    ``spread``, ``beats``."""
    within = [m for m in methods if m.percent <= max_percent]
    is_found = (lambda m: m.name in found_names) if found_names else (lambda m: m.name.startswith("found"))
    found = [m for m in within if is_found(m)]
    shipped = [m for m in within if not is_found(m)]
    if not found or not shipped:
        raise SystemExit(f"need found and shipped methods at <= {max_percent}% trainable parameters; found: "
                         f"{[m.name for m in found]}, shipped: {[m.name for m in shipped]}")
    seeds = {tuple(sorted(m.values)) for m in within}
    steps = {m.steps for m in within}
    if len(seeds) != 1 or len(steps) != 1:
        raise SystemExit(f"methods ran different seeds {sorted(seeds)} or steps {sorted(steps)}: not comparable")
    sign = 1.0 if greater else -1.0
    best_shipped = max(shipped, key=lambda m: sign * m.mean)
    best_found = max(found, key=lambda m: sign * m.mean)
    margin = sign * (best_found.mean - best_shipped.mean)
    spread = max(best_found.range, best_shipped.range)
    return {"shipped": best_shipped, "found": best_found, "margin": margin, "spread": spread,
            "beats": margin > spread, "within": within}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a unipeft bench output folder")
    parser.add_argument("--found", default=None, help="comma-separated names of the found methods (default: found*)")
    parser.add_argument("--max-percent", type=float, default=0.5, help="the trainable-parameter budget, in percent")
    args = parser.parse_args(argv)
    methods, metric, greater = load_methods(args.folder)
    found = set(args.found.split(",")) if args.found else None
    verdict = compare(methods, found, args.max_percent, greater)
    print(f"{args.folder}: {metric} ({'higher' if greater else 'lower'} is better), methods at <= "
          f"{args.max_percent}% trainable parameters, seeds {sorted(verdict['found'].values)}, "
          f"{verdict['found'].steps} steps\n")
    print(f"| method | trainable % | {metric} per seed | mean | std | range |")
    print("|---|---|---|---|---|---|")
    for m in sorted(verdict["within"], key=lambda m: -m.mean if greater else m.mean):
        per_seed = ", ".join(f"{m.values[s]:.4f}" for s in sorted(m.values))
        print(f"| {m.name} | {m.percent:.4f} | {per_seed} | {m.mean:.4f} | {m.std:.4f} | {m.range:.4f} |")
    s, f = verdict["shipped"], verdict["found"]
    print(f"\nbest shipped: {s.name} {s.mean:.4f}; best found: {f.name} {f.mean:.4f}; margin {verdict['margin']:+.4f}"
          f" against a spread of {verdict['spread']:.4f} (the larger seed range of the two)")
    print(f"verdict: the found recipe {'BEATS' if verdict['beats'] else 'does NOT beat'} the best shipped recipe "
          "by more than the spread over seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
