"""Helpers shared by the benchmarks: facts about the machine and versions, peak-memory probes, statistics, tables.

Peak memory on CPU is read from Linux's ``/proc/self/status``: ``VmHWM`` is the high-water mark of the resident set,
and writing ``5`` to ``/proc/self/clear_refs`` resets it to the current resident size (Linux >= 4.0), so the peak of
one stretch of code is ``VmHWM`` after it minus ``VmRSS`` before it. Where that is unavailable the fallback is
``ru_maxrss`` (the peak since the process started, which cannot be reset).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from unipeft.bench.env import cpu_model, version_of
from unipeft.util.atomic import atomic_write_text

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    """One ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), or None where there is no such file."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """The resident set size of this process now (falls back to the peak where /proc is missing)."""
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else peak_rss_bytes()


def peak_rss_bytes() -> int:
    """The high-water mark of this process's resident set since the last :func:`reset_peak_rss` (or its start)."""
    kib = _status_kib("VmHWM")
    if kib is None:  # ru_maxrss is in KiB on Linux, bytes on macOS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
    return kib * 1024


def reset_peak_rss() -> bool:
    """Reset the resident-set high-water mark to the current size; False where the kernel does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def environment(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Versions, machine and command line, for a results file."""
    argv = list(sys.argv if argv is None else argv)
    try:
        usable_cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable_cpus = os.cpu_count()
    return {
        "command": shlex.join([Path(sys.executable).name, *argv]),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": version_of("transformers"),
            "peft": version_of("peft"),
            "unipeft": version_of("unipeft"),
        },
        "machine": {
            "platform": platform.platform(),
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "usable_cpus": usable_cpus,
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
        },
    }


def timing_stats(seconds: Sequence[float]) -> dict[str, float]:
    """Median, mean, min, max, quartiles and standard deviation of a list of durations (seconds)."""
    values = sorted(seconds)
    quartiles = statistics.quantiles(values, n=4, method="inclusive") if len(values) >= 2 else [values[0]] * 3
    return {
        "n": len(values),
        "median_s": statistics.median(values),
        "mean_s": statistics.fmean(values),
        "min_s": values[0],
        "max_s": values[-1],
        "p25_s": quartiles[0],
        "p75_s": quartiles[2],
        "stdev_s": statistics.stdev(values) if len(values) >= 2 else 0.0,
    }


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (readable as plain text too); floats keep the formatting the caller gave them."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON, creating the parent folder, atomically; returns the path."""
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")
