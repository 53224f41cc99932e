"""The Pareto front of (cost, quality) points: the methods no other method beats on both at once.

A point ``a`` dominates ``b`` when ``cost(a) <= cost(b)`` and ``quality(a)`` is at least as good as ``quality(b)``,
with one of the two strictly better. The front is the set of points that no point dominates; points with a missing
(None or NaN) coordinate are never on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _ok(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def pareto_front(costs: Sequence[float | None], qualities: Sequence[float | None], *,
                 greater_is_better: bool = True) -> list[int]:
    """Indices of the non-dominated points, sorted by cost (then by quality, best first).

    Args:
        costs: lower is better (e.g. trainable parameters).
        qualities: higher is better if ``greater_is_better``, else lower (e.g. perplexity).

    Raises:
        ValueError: the two sequences differ in length.
    """
    if len(costs) != len(qualities):
        raise ValueError(f"{len(costs)} costs but {len(qualities)} qualities")
    sign = 1.0 if greater_is_better else -1.0
    points = [(i, float(c), sign * float(q)) for i, (c, q) in enumerate(zip(costs, qualities))
              if _ok(c) and _ok(q)]
    front = [i for i, c, q in points
             if not any(c2 <= c and q2 >= q and (c2 < c or q2 > q) for _, c2, q2 in points)]
    return sorted(front, key=lambda i: (float(costs[i]), -sign * float(qualities[i])))  # type: ignore[arg-type]


__all__ = ["pareto_front"]
