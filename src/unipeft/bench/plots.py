"""The report's plots, drawn with matplotlib's Agg canvas (no pyplot, no display) and written atomically as PNG.

- ``quality_vs_params.png``: the main metric (mean over seeds, bars = standard deviation) against trainable
  parameters on a log axis, the Pareto front drawn as a line;
- ``memory.png``: peak resident memory of each method's training process;
- ``time.png``: training time of each method, with its throughput in tokens/s.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from unipeft.bench.pareto import pareto_front
from unipeft.bench.results import atomic_write

DPI = 80  # small files for the docs


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=DPI, format="png"))
    return path


def plot_quality(path: Path, summary: Sequence[Mapping[str, Any]], title: str) -> Path:
    """Main metric against trainable parameters (log x) with error bars and the Pareto front."""
    return _save(quality_figure(summary, title), path)


def quality_figure(summary: Sequence[Mapping[str, Any]], title: str) -> Any:
    """The figure of :func:`plot_quality`: one point per method (``gid`` "methods"), the front (``gid`` "front")."""
    rows = [r for r in summary if r["trainable_params"] and r["metrics"][r["main_metric"]]["mean"] is not None]
    fig = _figure(7.5, 4.8)
    ax = fig.subplots()
    if rows:
        metric, better = rows[0]["main_metric"], rows[0]["greater_is_better"]
        xs = [r["trainable_params"] for r in rows]
        ys = [r["metrics"][metric]["mean"] for r in rows]
        errs = [r["metrics"][metric]["std"] or 0.0 for r in rows]
        front = pareto_front(xs, ys, greater_is_better=better)
        points = ax.errorbar(xs, ys, yerr=errs, fmt="o", color="tab:blue", ecolor="tab:gray", capsize=3, zorder=3)
        points.lines[0].set_gid("methods")
        ax.plot([xs[i] for i in front], [ys[i] for i in front], "-", color="tab:orange", linewidth=1.5,
                marker="o", markersize=10, markerfacecolor="none", label="Pareto front", zorder=2, gid="front")
        offsets = label_offsets(xs, ys, [r["name"] for r in rows])
        for i, r in enumerate(rows):
            ax.annotate(r["name"], (xs[i], ys[i]), textcoords="offset points", xytext=offsets[i], fontsize=7,
                        color="tab:orange" if i in front else "black")
        ax.set_xscale("log")
        ax.margins(x=0.12)  # room for the rightmost point's label
        ax.set_ylabel(f"{metric} ({'higher' if better else 'lower'} is better)")
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel("trainable parameters (log scale)")
    ax.grid(alpha=0.3, which="both")
    ax.set_title(title, fontsize=10)
    return fig


def label_offsets(xs: Sequence[float], ys: Sequence[float], names: Sequence[str],
                  size: tuple[float, float] = (480.0, 300.0), char_width: float = 4.2,
                  line: float = 9.0) -> list[tuple[float, float]]:
    """Offsets (points) for point labels that do not overlap: each label goes up-right of its point, or is moved
    up/down by whole lines until its box clears the labels placed before it.

    Positions are approximated in points on an axes of ``size`` (x log-scaled, as the quality plot), a label's box
    as ``char_width`` per character by ``line`` high. Points are placed left to right.
    """
    if not xs:
        return []
    us = [math.log10(x) for x in xs]
    (ulo, uhi), (vlo, vhi) = (min(us), max(us)), (min(ys), max(ys))
    px = [(u - ulo) / ((uhi - ulo) or 1.0) * size[0] for u in us]
    py = [(y - vlo) / ((vhi - vlo) or 1.0) * size[1] for y in ys]
    placed: list[tuple[float, float, float, float]] = []
    offsets: list[tuple[float, float]] = [(4.0, 4.0)] * len(xs)
    shifts = [0.0] + [k * line * sign for k in range(1, 8) for sign in (1, -1)]
    for i in sorted(range(len(xs)), key=lambda j: (px[j], py[j])):
        width = char_width * len(names[i])
        for dy in shifts:
            x0, y0 = px[i] + 4.0, py[i] + 4.0 + dy
            box = (x0, y0, x0 + width, y0 + line)
            if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in placed):
                break
        placed.append(box)
        offsets[i] = (4.0, 4.0 + dy)
    return offsets


def bars_figure(names: Sequence[str], values: Sequence[float | None], xlabel: str, title: str,
                notes: Sequence[str] | None = None) -> Any:
    """A horizontal bar chart, the first name on top (missing values drawn as 0 and labelled n/a)."""
    fig = _figure(7.0, max(2.2, 0.9 + 0.28 * len(names)))
    ax = fig.subplots()
    shown = [v if v is not None else 0.0 for v in values]
    positions = list(range(len(names)))[::-1]  # the first method on top
    ax.barh(positions, shown, color="tab:blue")
    ax.set_yticks(positions)
    ax.set_yticklabels(names, fontsize=8)
    for pos, value, note in zip(positions, values, notes or [""] * len(names)):
        text = "n/a" if value is None else f"{value:,.0f}{note}"
        ax.annotate(text, (value or 0.0, pos), textcoords="offset points", xytext=(3, -3), fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_xlim(0, max(shown + [1.0]) * 1.3)
    ax.grid(alpha=0.3, axis="x")
    ax.set_title(title, fontsize=10)
    return fig


def plot_memory(path: Path, summary: Sequence[Mapping[str, Any]], title: str) -> Path:
    """Peak resident memory of each method's training process (MiB)."""
    return _save(bars_figure([r["name"] for r in summary], [r["peak_rss_mib"] for r in summary],
                             "peak resident memory of the training process (MiB)", title), path)


def plot_time(path: Path, summary: Sequence[Mapping[str, Any]], title: str) -> Path:
    """Training time of each method (s), annotated with tokens/s."""
    notes = [f" s ({r['tokens_per_s']:,.0f} tok/s)" if r["tokens_per_s"] else " s" for r in summary]
    return _save(bars_figure([r["name"] for r in summary], [r["train_time_s"] for r in summary],
                             "training time (s, optimizer steps only)", title, notes), path)


def write_plots(root: Path, summary: Sequence[Mapping[str, Any]], title: str) -> dict[str, Path]:
    """All three plots into ``root``; returns ``{kind: path}``."""
    return {"quality": plot_quality(root / "quality_vs_params.png", summary, title),
            "memory": plot_memory(root / "memory.png", summary, title),
            "time": plot_time(root / "time.png", summary, title)}


__all__ = ["plot_quality", "plot_memory", "plot_time", "write_plots", "quality_figure", "bars_figure",
           "label_offsets"]
