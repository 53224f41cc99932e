"""Running a benchmark: every (method, seed) in its own process, finished runs skipped, results and report written.

``run_bench(spec, root)`` goes through the seeds, and within a seed through the line-up, so an interrupted
benchmark has whole seeds done first. A run whose record is already stored for the same job is skipped (resume);
otherwise a fresh ``python -m unipeft.bench.worker`` process trains and measures it, its log lines are relayed to
stderr (and kept in ``runs/<method>/seed<k>/worker.log``), and its peak memory as the operating system saw it is
taken from ``wait4``. A run that fails is reported and the others go on. At the end (and with ``report_only``
without running anything) the results, the report and the plots are written from the stored records.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from unipeft.bench.env import environment, load_average
from unipeft.bench.results import ResultStore, summarize, write_json_atomic, write_results
from unipeft.bench.spec import BenchSpec, MethodRun

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class BenchOutcome:
    """What :func:`run_bench` did.

    Attributes:
        root: the benchmark folder.
        ran: ``(method, seed)`` runs done in this call.
        skipped: runs already finished before this call.
        failed: ``(method, seed, error)`` for runs that failed in this call.
        data: the content of ``results.json``.
    """

    root: Path
    ran: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[tuple[str, int]] = field(default_factory=list)
    failed: list[tuple[str, int, str]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


def job_for(spec: BenchSpec, method: MethodRun, seed: int, run_dir: Path) -> dict[str, Any]:
    """The job of one run: its training config and measurement settings, as plain JSON data."""
    config = spec.config(method, seed, str(run_dir)).to_dict()
    config["progress"] = False  # the worker's log lines are relayed; a bar would not survive the pipe
    job = {"name": method.name, "config": config, "latency": spec.to_dict()["latency"], "samples": spec.samples,
           "malloc_mmap_threshold": spec.malloc_mmap_threshold}
    return json.loads(json.dumps(job))


def _relay(proc: subprocess.Popen, log_path: Path, echo: Callable[[str], None]) -> list[str]:
    """Copy the worker's stderr to its log file and to ``echo``; returns the last lines."""
    tail: list[str] = []
    assert proc.stderr is not None
    with open(log_path, "w", encoding="utf-8") as out:
        for line in proc.stderr:
            out.write(line)
            out.flush()
            echo(line.rstrip("\n"))
            tail = (tail + [line.rstrip("\n")])[-20:]
    return tail


def run_worker(job: dict[str, Any], run_dir: Path, echo: Callable[[str], None]) -> tuple[dict[str, Any] | None, str]:
    """Run one job in a fresh process; returns ``(record or None, error text)``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    job_path, out_path = run_dir / "job.json", run_dir / "worker_result.json"
    write_json_atomic(job_path, job)
    out_path.unlink(missing_ok=True)
    started = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if job.get("malloc_mmap_threshold") is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(job["malloc_mmap_threshold"])
    proc = subprocess.Popen([sys.executable, "-m", "unipeft.bench.worker", str(job_path), str(out_path)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        tail = _relay(proc, run_dir / "worker.log", echo)
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not out_path.is_file():
        return None, "\n".join(tail[-8:]) or f"worker exited with code {proc.returncode}"
    record = json.loads(out_path.read_text(encoding="utf-8"))
    record["process_peak_rss_mib"] = usage.ru_maxrss / 1024  # Linux: KiB
    record["process_wall_s"] = time.perf_counter() - started
    return record, ""


def _quality(record: dict[str, Any]) -> str:
    value = record["metrics"].get(record["main_metric"])
    return f"{record['main_metric']}={value:.4f}" if isinstance(value, (int, float)) else "no metric"


def run_bench(spec: BenchSpec, root: str | os.PathLike[str], *, command: str = "", report_only: bool = False,
              echo: Callable[[str], None] | None = None) -> BenchOutcome:
    """Run every (method, seed) of ``spec`` not yet done in ``root``, then write results, report and plots.

    Args:
        spec: the benchmark.
        root: its folder (created if needed).
        command: the command line, recorded in the report.
        report_only: run nothing; rebuild results and report from the stored records.
        echo: where the workers' log lines go (default: stderr, indented).

    Returns:
        What ran, what was skipped, what failed, and the results data.
    """
    from unipeft.bench.report import write_report

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    echo = echo or (lambda line: print(f"    | {line}", file=sys.stderr, flush=True))
    store = ResultStore(root)
    outcome = BenchOutcome(root=root)
    started, load_start = time.perf_counter(), load_average()
    env = environment()  # the code this invocation imported: taken before any run, stamped on each record
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    jobs = [(m, s) for s in spec.seeds for m in spec.methods]
    for index, (method, seed) in enumerate(jobs, 1):
        run_dir = store.run_dir(method.name, seed)
        job = job_for(spec, method, seed, run_dir)
        identity = {k: v for k, v in job.items()}
        if store.is_done(method.name, seed, identity):
            outcome.skipped.append((method.name, seed))
            log.info("[%d/%d] %s seed %d: done before, skipped", index, len(jobs), method.name, seed)
            continue
        if report_only:
            continue
        log.info("[%d/%d] %s seed %d: training (%s)", index, len(jobs), method.name, seed, run_dir)
        record, error = run_worker(job, run_dir, echo)
        if record is None:
            outcome.failed.append((method.name, seed, error))
            log.error("[%d/%d] %s seed %d failed:\n%s", index, len(jobs), method.name, seed, error)
            continue
        record["job"] = identity
        record["git"] = env.get("git")
        store.save(method.name, seed, record)
        outcome.ran.append((method.name, seed))
        log.info("[%d/%d] %s seed %d: %s, %.0f s training, peak %.0f MiB", index, len(jobs), method.name, seed,
                 _quality(record), record["train_time_s"], record["peak_rss_mib"])
    records = [r for m, s in jobs if (r := store.load(m.name, s)) is not None
               and r.get("job") == job_for(spec, m, s, store.run_dir(m.name, s))]
    outcome.data = {
        "spec": spec.to_dict(), "command": command, "started_at": started_at,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_time_s": time.perf_counter() - started,
        "run_time_s": sum(r.get("process_wall_s") or 0.0 for r in records),
        "load_average": {"start": load_start, "end": load_average()},
        "environment": env, "ran": len(outcome.ran), "skipped": len(outcome.skipped),
        "failures": [{"name": n, "seed": s, "error": e} for n, s, e in outcome.failed],
        "records": records, "summary": summarize(records, [m.name for m in spec.methods]),
    }
    write_results(root, outcome.data)
    if records:
        write_report(root, outcome.data)
    return outcome


__all__ = ["run_bench", "run_worker", "job_for", "BenchOutcome"]
