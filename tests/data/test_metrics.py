"""Metrics against hand-computed values and scipy.stats."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from unipeft.data import (
    HIGHER_IS_BETTER,
    METRICS,
    accuracy,
    compute_metrics,
    f1_binary,
    matthews_corrcoef,
    pearson,
    perplexity,
    predictions_from_logits,
    rank_average,
    spearman,
)

# TP = 2 (idx 0, 3), FP = 1 (idx 1), FN = 1 (idx 4), TN = 2 (idx 2, 5).
PRED = [1, 1, 0, 1, 0, 0]
GOLD = [1, 0, 0, 1, 1, 0]


def test_accuracy_hand_case() -> None:
    assert accuracy(PRED, GOLD) == pytest.approx(4 / 6)
    assert accuracy([2, 1, 0], [2, 1, 0]) == 1.0
    assert accuracy(np.array([0, 0]), np.array([1, 1])) == 0.0


def test_f1_hand_case() -> None:
    # precision 2/3, recall 2/3 -> F1 = 2/3 = 2*2 / (2*2 + 1 + 1)
    assert f1_binary(PRED, GOLD) == pytest.approx(2 / 3)
    # positive class 0: TP = 2 (idx 2, 5), FP = 1 (idx 4), FN = 1 (idx 1) -> 4/6
    assert f1_binary(PRED, GOLD, positive=0) == pytest.approx(2 / 3)
    # precision 1 (1/1), recall 1/3 -> F1 = 2 * 1 * (1/3) / (4/3) = 0.5
    assert f1_binary([1, 0, 0, 0], [1, 1, 1, 0]) == pytest.approx(0.5)


def test_f1_no_positives_is_zero() -> None:
    assert f1_binary([0, 0, 0], [0, 0, 0]) == 0.0
    assert f1_binary([0, 0, 0], [1, 1, 0]) == 0.0


def test_mcc_hand_case() -> None:
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (4 - 1) / sqrt(3*3*3*3) = 1/3
    assert matthews_corrcoef(PRED, GOLD) == pytest.approx(1 / 3)
    assert matthews_corrcoef([0, 1, 1, 0], [0, 1, 1, 0]) == pytest.approx(1.0)
    assert matthews_corrcoef([1, 0, 0, 1], [0, 1, 1, 0]) == pytest.approx(-1.0)


def test_mcc_degenerate_is_zero() -> None:
    assert matthews_corrcoef([1, 1, 1, 1], [0, 1, 1, 0]) == 0.0


def test_mcc_multiclass_hand_case() -> None:
    # Confusion (rows true): [[2,0,0],[1,0,1],[0,1,1]]; t = [2,2,2], p = [3,1,2], c = 3, s = 6.
    # (3*6 - (6+2+4)) / sqrt((36-14) * (36-12)) = 6 / sqrt(528)
    gold = [0, 1, 2, 0, 1, 2]
    pred = [0, 2, 1, 0, 0, 2]
    assert matthews_corrcoef(pred, gold) == pytest.approx(6 / math.sqrt(528))


def test_binary_mcc_equals_phi_coefficient() -> None:
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 2, 500)
    pred = np.where(rng.random(500) < 0.7, gold, 1 - gold)
    assert matthews_corrcoef(pred, gold) == pytest.approx(stats.pearsonr(pred, gold).statistic)


def test_pearson_matches_scipy() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=300)
    y = 0.6 * x + rng.normal(size=300)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_spearman_matches_scipy_with_ties() -> None:
    rng = np.random.default_rng(2)
    x = rng.integers(0, 6, 400).astype(float)  # many ties, like STS-B's 0-5 scores
    y = np.round(x + rng.normal(scale=1.5, size=400))
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    # Monotone but non-linear: Spearman is exactly 1.
    z = np.arange(10.0)
    assert spearman(z, np.exp(z)) == pytest.approx(1.0)


def test_rank_average_matches_scipy() -> None:
    assert rank_average([10, 20, 20, 30]).tolist() == [1.0, 2.5, 2.5, 4.0]
    v = np.random.default_rng(3).integers(0, 5, 50)
    np.testing.assert_array_equal(rank_average(v), stats.rankdata(v, method="average"))


def test_constant_correlation_is_nan() -> None:
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1, 2, 3], [5, 5, 5]))


@pytest.mark.parametrize("fn", [accuracy, f1_binary, matthews_corrcoef, pearson, spearman])
def test_length_mismatch_and_empty_raise(fn) -> None:
    with pytest.raises(ValueError, match="3 vs 2"):
        fn([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="empty"):
        fn([], [])


def test_perplexity() -> None:
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(10.0)) == pytest.approx(10.0)
    assert perplexity(1e4) == math.inf
    with pytest.raises(ValueError, match="-1"):
        perplexity(-1.0)
    with pytest.raises(ValueError):
        perplexity(float("nan"))


def test_compute_metrics_and_registry() -> None:
    out = compute_metrics(["f1", "accuracy"], PRED, GOLD)
    assert list(out) == ["f1", "accuracy"]
    assert out == {"f1": pytest.approx(2 / 3), "accuracy": pytest.approx(4 / 6)}
    with pytest.raises(ValueError, match="unknown metric 'bleu'.*accuracy"):
        compute_metrics(["bleu"], PRED, GOLD)
    assert set(METRICS) == {"accuracy", "f1", "matthews", "pearson", "spearman"}
    assert HIGHER_IS_BETTER["perplexity"] is False and HIGHER_IS_BETTER["accuracy"] is True


def test_predictions_from_logits() -> None:
    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 0.5]])
    assert predictions_from_logits(logits, "classification").tolist() == [1, 0, 1]
    assert predictions_from_logits(np.array([[3.5], [1.0]]), "regression").tolist() == [3.5, 1.0]
    with pytest.raises(ValueError, match="shape"):
        predictions_from_logits(np.zeros(3), "classification")
    with pytest.raises(ValueError, match="unknown kind 'ranking'"):
        predictions_from_logits(logits, "ranking")  # type: ignore[arg-type]
