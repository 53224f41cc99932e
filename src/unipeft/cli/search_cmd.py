"""``unipeft search CONFIG.yaml [key=value ...]``: search the design space under a budget (see docs/search.md).

    unipeft search configs/search_sst2.yaml
    unipeft search configs/search_sst2.yaml budget.trials=8 train.task=rte output_dir=runs/search_rte

Rerunning the same command resumes the study in ``output_dir/study.db``.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("search", help="search the design space under a parameter budget (Optuna)",
                              description="Sample points of He et al.'s design space with Optuna, train them several "
                                          "at once on one base, prune poor ones, and write the Pareto front "
                                          "(pareto.md/.csv/.png), its recipes (recipes/*.yaml, bench.yaml) and the "
                                          "cost (search.json). Rerunning resumes the study in output_dir/study.db.")
    p.add_argument("config", help="search config YAML (see configs/search_sst2.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override config keys, e.g. budget.trials=8 train.task=rte output_dir=runs/s")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import logging

    from unipeft.search import front, load_search_config, search

    config = load_search_config(args.config, args.overrides)
    if not args.quiet:
        logging.getLogger("unipeft.search").setLevel(logging.INFO)
    outcome, paths = search(config)
    rows = [(f"t{t.number:03d}", t.user_attrs.get("summary", ""), f"{t.values[0]:.4f}",
             f"{t.user_attrs.get('params', 0):,} ({t.user_attrs.get('percent', 0.0):.3f}%)")
            for t in front(outcome.study)]
    for row in rows:
        print("  ".join(row))
    print(f"{len(outcome.trained_now)} trials trained now, {outcome.steps} steps, {outcome.wall_time_s:.0f} s"
          + (f"; stopped early: {outcome.stopped_early}" if outcome.stopped_early else ""))
    for name in ("md", "png", "json", "recipes"):
        print(f"{name}: {paths[name]}")
    return 0
