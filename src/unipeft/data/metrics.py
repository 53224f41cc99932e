"""Evaluation metrics for the GLUE tasks and language modelling, in plain numpy.

Each function takes predictions first and references second (like scikit-learn's ``(y_true, y_pred)``
reversed) and returns a Python float. Correlations of a constant input are undefined and return NaN,
as scipy does; F1 and MCC with a zero denominator return 0.0, as scikit-learn does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

from unipeft.data.textmetrics import TEXT_METRICS

ArrayLike = npt.ArrayLike


def _pair(predictions: ArrayLike, labels: ArrayLike, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """Both inputs as flat arrays of the same non-zero length."""
    p = np.asarray(predictions, dtype=dtype).reshape(-1)
    y = np.asarray(labels, dtype=dtype).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"predictions and labels differ in length: {p.size} vs {y.size}")
    if p.size == 0:
        raise ValueError("predictions and labels are empty")
    return p, y


def accuracy(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of exact matches: ``acc = (1/n) * sum_i [p_i == y_i]``.

    Raises:
        ValueError: the inputs are empty or differ in length.
    """
    p, y = _pair(predictions, labels, np.int64)
    return float(np.mean(p == y))


def f1_binary(predictions: ArrayLike, labels: ArrayLike, positive: int = 1) -> float:
    """Binary F1 of the ``positive`` class: ``F1 = 2 TP / (2 TP + FP + FN)``.

    Equal to the harmonic mean of precision ``TP/(TP+FP)`` and recall ``TP/(TP+FN)``; 0.0 when there
    are neither predicted nor true positives.

    Raises:
        ValueError: the inputs are empty or differ in length.
    """
    p, y = _pair(predictions, labels, np.int64)
    tp = int(np.sum((p == positive) & (y == positive)))
    fp = int(np.sum((p == positive) & (y != positive)))
    fn = int(np.sum((p != positive) & (y == positive)))
    denom = 2 * tp + fp + fn
    return 2.0 * tp / denom if denom else 0.0


def matthews_corrcoef(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Matthews correlation coefficient (multi-class form of Gorodkin 2004).

    With confusion matrix ``C`` (rows true, columns predicted), ``s = n``, ``c = trace(C)``,
    ``t_k`` the true count and ``p_k`` the predicted count of class ``k``::

        MCC = (c*s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2) * (s^2 - sum_k t_k^2))

    For two classes this is ``(TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))``. 0.0 when the
    denominator is zero (all predictions or all labels in one class).

    Raises:
        ValueError: the inputs are empty or differ in length.
    """
    p, y = _pair(predictions, labels, np.int64)
    classes, inv = np.unique(np.concatenate([y, p]), return_inverse=True)
    k = classes.size
    y_idx, p_idx = inv[: y.size], inv[y.size :]
    conf = np.zeros((k, k), dtype=np.float64)
    np.add.at(conf, (y_idx, p_idx), 1.0)
    t = conf.sum(axis=1)
    pk = conf.sum(axis=0)
    c = np.trace(conf)
    s = conf.sum()
    cov_ytp = c * s - pk @ t
    cov_pp = s * s - pk @ pk
    cov_yy = s * s - t @ t
    denom = math.sqrt(cov_pp * cov_yy)
    return float(cov_ytp / denom) if denom else 0.0


def pearson(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Pearson correlation ``r = sum (x-x̄)(y-ȳ) / sqrt(sum (x-x̄)^2 * sum (y-ȳ)^2)``.

    NaN when either input is constant.

    Raises:
        ValueError: the inputs are empty or differ in length.
    """
    x, y = _pair(predictions, labels, np.float64)
    xc = x - x.mean()
    yc = y - y.mean()
    denom = math.sqrt(float(xc @ xc) * float(yc @ yc))
    if denom == 0.0:
        return float("nan")
    return float(np.clip((xc @ yc) / denom, -1.0, 1.0))


def rank_average(values: ArrayLike) -> np.ndarray:
    """Ranks 1..n of ``values``, tied values sharing the mean of their ranks (``scipy.stats.rankdata``).

    Example: ``[10, 20, 20, 30] -> [1, 2.5, 2.5, 4]``.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    order = np.argsort(v, kind="mergesort")
    sorted_v = v[order]
    # Start index of each run of equal values in sorted order.
    starts = np.flatnonzero(np.concatenate([[True], sorted_v[1:] != sorted_v[:-1]]))
    ends = np.concatenate([starts[1:], [v.size]])
    run_rank = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(v.size, dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def spearman(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Spearman rank correlation: the Pearson correlation of the average ranks (ties share ranks).

    ``rho = pearson(rank(x), rank(y))``; NaN when either input is constant.

    Raises:
        ValueError: the inputs are empty or differ in length.
    """
    x, y = _pair(predictions, labels, np.float64)
    return pearson(rank_average(x), rank_average(y))


def perplexity(mean_loss: float) -> float:
    """Perplexity from the mean token cross-entropy in nats: ``ppl = exp(mean_loss)``.

    Returns ``inf`` when the exponential overflows.

    Raises:
        ValueError: ``mean_loss`` is NaN or negative.
    """
    loss = float(mean_loss)
    if math.isnan(loss) or loss < 0:
        raise ValueError(f"mean_loss must be a non-negative number of nats, got {mean_loss}")
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


# Metrics computed from (predictions, labels). Perplexity is computed from a loss, not listed here.
METRICS: dict[str, Callable[[ArrayLike, ArrayLike], float]] = {
    "accuracy": accuracy,
    "f1": f1_binary,
    "matthews": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
}
# Generated-text metrics (bleu, rouge_l) are computed from generations (:mod:`unipeft.data.textmetrics`).
ALL_METRICS: tuple[str, ...] = (*METRICS, "perplexity", *TEXT_METRICS)
# Whether a larger value is better, for model selection.
HIGHER_IS_BETTER: dict[str, bool] = {name: True for name in (*METRICS, *TEXT_METRICS)} | {"perplexity": False}


def compute_metrics(names: Sequence[str], predictions: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """Compute several prediction metrics at once.

    Args:
        names: metric names from :data:`METRICS` (``"accuracy"``, ``"f1"``, ``"matthews"``,
            ``"pearson"``, ``"spearman"``).
        predictions: predicted class ids (classification) or scores (regression), shape ``(n,)``.
        labels: reference labels, shape ``(n,)``.

    Returns:
        ``{name: value}`` in the order of ``names``.

    Raises:
        ValueError: an unknown metric name (the message lists the valid ones), or bad inputs.
    """
    out: dict[str, float] = {}
    for name in names:
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; valid metrics from predictions: {', '.join(METRICS)}")
        out[name] = METRICS[name](predictions, labels)
    return out


def predictions_from_logits(logits: ArrayLike, kind: Literal["classification", "regression"]) -> np.ndarray:
    """Turn model outputs into predictions: argmax over the last axis for classification, the single
    score for regression.

    Args:
        logits: shape ``(n, num_labels)`` for classification, ``(n,)`` or ``(n, 1)`` for regression.
        kind: ``"classification"`` or ``"regression"``.

    Raises:
        ValueError: unknown ``kind`` or a shape that does not fit it.
    """
    arr = np.asarray(logits)
    if kind == "classification":
        if arr.ndim != 2:
            raise ValueError(f"classification logits must have shape (n, num_labels), got {arr.shape}")
        return arr.argmax(axis=-1)
    if kind == "regression":
        if arr.ndim == 2 and arr.shape[1] == 1:
            arr = arr[:, 0]
        if arr.ndim != 1:
            raise ValueError(f"regression outputs must have shape (n,) or (n, 1), got {arr.shape}")
        return arr.astype(np.float64)
    raise ValueError(f"unknown kind {kind!r}; valid kinds: classification, regression")
