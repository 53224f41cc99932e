"""``unipeft bench SUITE|FILE.yaml``: run methods side by side and write results (JSON, CSV) and a report.

    unipeft bench nlu                                   # the NLU suite on SST-2 -> runs/bench/nlu_sst2/
    unipeft bench nlu --task rte --seeds 0,1            # another GLUE task, two seeds
    unipeft bench nlu --methods full,lora --set max_steps=50 --out runs/bench/quick
    unipeft bench my_bench.yaml                         # a user's spec (e.g. a JSONL task)
    unipeft bench nlu --report-only                     # rebuild the report from the stored results
    unipeft bench --list                                # the built-in suites

Rerunning the same command skips the runs that finished (resume after an interruption).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,2, got {text!r}") from None


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="benchmark methods side by side (params, memory, time, quality)",
                              description="Train every method of a suite (one process per method and seed), measure "
                                          "trainable parameters, adapter size, peak memory, training time, latency "
                                          "and the task metric, and write results.json/.csv, report.md and plots. "
                                          "Finished runs are skipped when the command is repeated.")
    p.add_argument("suite", nargs="?", help="a built-in suite (see --list) or a bench YAML file")
    p.add_argument("--list", action="store_true", help="list the built-in suites and exit")
    p.add_argument("--task", help="run the suite on another task (e.g. cola for the nlu suite)")
    p.add_argument("--methods", help="comma-separated method names of the suite to run, in this order")
    p.add_argument("--seeds", type=_ints, help="comma-separated seeds (default: the suite's)")
    p.add_argument("--set", action="append", default=[], metavar="key=value", dest="sets",
                   help="change a shared training key, e.g. --set max_steps=50 --set eval_limit=200 (repeatable)")
    p.add_argument("--out", help="output folder (default: runs/bench/<suite name>)")
    p.add_argument("--report-only", action="store_true", help="run nothing; rebuild results and report")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from unipeft.bench import customize, load_spec, run_bench, suite_names
    from unipeft.cli.common import UsageError, table

    if args.list or not args.suite:
        if not args.list:
            raise UsageError("give a suite name or a bench YAML file (see unipeft bench --list)")
        rows = [(name, load_spec(name).description) for name in suite_names()]
        print(table(rows, header=("suite", "description")))
        return 0
    if not args.quiet:
        logging.getLogger("unipeft.bench").setLevel(logging.INFO)
    spec = customize(load_spec(args.suite), task=args.task, sets=args.sets,
                     methods=[m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None,
                     seeds=args.seeds)
    out = args.out or f"runs/bench/{spec.name}"
    command = "unipeft " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "unipeft bench"
    outcome = run_bench(spec, out, command=command, report_only=args.report_only)
    rows = []
    for r in outcome.data["summary"]:
        stats = r["metrics"][r["main_metric"]]
        quality = "–" if stats["mean"] is None else f"{stats['mean']:.4f}" + (
            f" ± {stats['std']:.4f}" if len(r["seeds"]) > 1 else "")
        rows.append((r["name"], f"{r['trainable_params']:,}", f"{r['trainable_percent']:.4f}%",
                     f"{r['peak_rss_mib']:,.0f}", f"{r['train_time_s']:.1f}", quality))
    metric = outcome.data["summary"][0]["main_metric"] if outcome.data["summary"] else "metric"
    if rows:
        print(table(rows, header=("method", "trainable", "%", "peak MiB", "train s", metric)))
    print(f"ran {len(outcome.ran)}, skipped {len(outcome.skipped)} (done before), failed {len(outcome.failed)}")
    print(f"results: {outcome.root / 'results.json'}, {outcome.root / 'results.csv'}")
    if outcome.data["records"]:
        print(f"report:  {outcome.root / 'report.md'}")
    for name, seed, error in outcome.failed:
        last = error.strip().splitlines()[-1] if error.strip() else "?"
        print(f"failed:  {name} seed {seed}: {last}", file=sys.stderr)
    return 1 if outcome.failed else 0
