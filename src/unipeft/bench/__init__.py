"""unipeft.bench: methods side by side on one model and task — parameters, memory, time, latency and quality.

    from unipeft.bench import load_spec, customize, run_bench
    spec = customize(load_spec("nlu"), methods=["full", "lora"], sets=["max_steps=50"])
    outcome = run_bench(spec, "runs/bench/quick")       # results.json, results.csv, report.md, *.png

Each (method, seed) trains in its own process (:mod:`unipeft.bench.worker`); finished runs are stored and skipped
when the same benchmark runs again. The command line is ``unipeft bench``.
"""

from unipeft.bench.pareto import pareto_front
from unipeft.bench.results import ResultStore, summarize
from unipeft.bench.runner import BenchOutcome, run_bench
from unipeft.bench.spec import BenchSpec, LatencyConfig, MethodRun, spec_from_dict
from unipeft.bench.suites import customize, load_spec, suite_names

__all__ = ["BenchSpec", "MethodRun", "LatencyConfig", "spec_from_dict", "load_spec", "customize", "suite_names",
           "run_bench", "BenchOutcome", "ResultStore", "summarize", "pareto_front"]
