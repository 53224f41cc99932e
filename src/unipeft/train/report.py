"""The outputs of a finished run: ``metrics.json``, ``history.json`` and ``curves.png``, each written atomically."""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any

from unipeft.util.atomic import atomic_write_file


def peak_rss_mib() -> float:
    """The peak resident memory of this process so far, in MiB (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def peak_memory_mib(device: "torch.device") -> float:
    """The peak memory so far: allocated on a CUDA device (``torch.cuda.max_memory_allocated``), else the process's
    peak RSS, in MiB."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mib()


def _finite(value: Any) -> Any:
    """JSON has no inf/nan: write them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path``, atomically (temporary file + ``os.replace``)."""
    text = json.dumps(_finite(data), indent=2) + "\n"
    atomic_write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def plot_curves(path: Path, history: dict[str, list[dict[str, float]]], metric: str, title: str) -> None:
    """Plot the training loss (raw and smoothed) and the evaluation ``metric`` against the step into ``path`` (PNG),
    atomically, with matplotlib's Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    train, evals = history.get("train", []), history.get("eval", [])
    fig = Figure(figsize=(10, 3.8))
    FigureCanvasAgg(fig)
    ax_loss, ax_metric = fig.subplots(1, 2)
    if train:
        steps = [r["step"] for r in train]
        losses = [r["loss"] for r in train]
        ax_loss.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss")
        smooth, ema = [], losses[0]
        for value in losses:
            ema = 0.9 * ema + 0.1 * value
            smooth.append(ema)
        ax_loss.plot(steps, smooth, color="tab:blue", linewidth=1.5, label="loss (EMA 0.9)")
        ax_loss.legend()
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    points = [(r["step"], r[metric]) for r in evals if metric in r]
    if points:
        ax_metric.plot(*zip(*points), marker="o", color="tab:orange")
    ax_metric.set_xlabel("step")
    ax_metric.set_ylabel(f"eval {metric}")
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write_file(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


__all__ = ["peak_rss_mib", "write_json", "plot_curves"]
