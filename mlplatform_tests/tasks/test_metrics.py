"""Binary metrics, the decision threshold and bootstrap intervals, checked against sklearn."""

import math

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    f1_score,
    log_loss,
    precision_score,
    recall_score,
    roc_auc_score,
)

from mlplatform.tasks.metrics import (
    LOWER_IS_BETTER,
    METRIC_NAMES,
    Interval,
    bootstrap_indices,
    bootstrap_metrics,
    choose_threshold,
    classification_metrics,
    paired_difference,
    resampled_metrics,
)
from mlplatform_tests.support import scored


def sklearn_metrics(labels, probability, threshold):
    predicted = (probability >= threshold).astype(int)
    return {
        "roc_auc": roc_auc_score(labels, probability),
        "pr_auc": average_precision_score(labels, probability),
        "log_loss": log_loss(labels, np.clip(probability, 1e-7, 1 - 1e-7), labels=[0, 1]),
        "brier": brier_score_loss(labels, probability),
        "accuracy": accuracy_score(labels, predicted),
        "precision": precision_score(labels, predicted, zero_division=0),
        "recall": recall_score(labels, predicted, zero_division=0),
        "f1": f1_score(labels, predicted, zero_division=0),
    }


def test_classification_metrics_equal_sklearn():
    labels, probability = scored(700, seed=1)
    probability[:5] = [0.0, 1.0, 0.0, 1.0, 0.5]  # exercises the log-loss clipping
    metrics = classification_metrics(labels, probability, 0.35)
    expected = sklearn_metrics(labels, probability, 0.35)
    assert list(metrics) == list(METRIC_NAMES)
    assert metrics == pytest.approx(expected, abs=1e-12)
    assert all(isinstance(value, float) for value in metrics.values())
    assert {"log_loss", "brier", "rmse", "mae"} == LOWER_IS_BETTER


def test_classification_metrics_with_a_single_class():
    metrics = classification_metrics(np.zeros(10, int), np.linspace(0, 0.9, 10), 0.5)
    assert math.isnan(metrics["roc_auc"]) and math.isnan(metrics["pr_auc"])
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["precision"] == metrics["recall"] == metrics["f1"] == 0.0


def test_choose_threshold_beats_half_on_an_imbalanced_split():
    # Calibrated probabilities of a rare class: P(y=1 | score) for score ~ N(2 y, 1).
    rng = np.random.default_rng(2)
    labels = (rng.random(3000) < 0.08).astype(int)
    score = 2.0 * labels + rng.normal(0, 1, 3000)
    probability = 1 / (1 + np.exp(-(np.log(0.08 / 0.92) + 2.0 * score - 2.0)))
    threshold = choose_threshold(labels, probability)
    assert threshold == choose_threshold(labels, probability)  # deterministic
    assert 0 < threshold < 0.5
    tuned = f1_score(labels, probability >= threshold)
    assert tuned > f1_score(labels, probability >= 0.5) + 0.02
    # No candidate threshold does better.
    candidates = np.unique(probability)[:, None]
    predicted = probability[None, :] >= candidates
    true_positives = (predicted & (labels == 1)).sum(axis=1)
    f1 = 2 * true_positives / (predicted.sum(axis=1) + labels.sum())
    assert tuned == pytest.approx(f1.max(), abs=1e-12)


def test_choose_threshold_single_class_is_half():
    assert choose_threshold(np.ones(20, int), np.linspace(0, 1, 20)) == 0.5


def test_resampled_metrics_equal_sklearn_on_every_resample():
    labels, probability = scored(400, seed=3)
    probability = probability.round(2)  # many tied scores
    indices = bootstrap_indices(len(labels), 25, seed=4)
    assert indices.shape == (25, 400)
    np.testing.assert_array_equal(indices, bootstrap_indices(len(labels), 25, seed=4))
    per_resample = resampled_metrics(labels, probability, 0.3, indices)
    for row, rows in enumerate(indices):
        expected = sklearn_metrics(labels[rows], probability[rows], 0.3)
        actual = {name: values[row] for name, values in per_resample.items()}
        assert actual == pytest.approx(expected, abs=1e-10)


def test_resampled_metrics_skip_auc_for_single_class_resamples():
    labels = np.array([0, 0, 0, 1])
    probability = np.array([0.1, 0.2, 0.3, 0.9])
    per_resample = resampled_metrics(
        labels, probability, 0.5, np.array([[0, 1, 2, 2], [0, 3, 3, 1]])
    )
    assert math.isnan(per_resample["roc_auc"][0]) and math.isnan(per_resample["pr_auc"][0])
    assert per_resample["roc_auc"][1] == 1.0
    assert per_resample["accuracy"].tolist() == [1.0, 1.0]


def test_bootstrap_intervals_contain_the_point_and_shrink_with_more_data():
    small = bootstrap_metrics(*scored(300, seed=5), threshold=0.3)
    large = bootstrap_metrics(*scored(5000, seed=5), threshold=0.3)
    for name in METRIC_NAMES:
        assert small[name].contains(small[name].point), name
        assert large[name].contains(large[name].point), name
        assert large[name].width < small[name].width, name
    labels, probability = scored(300, seed=5)
    assert small["roc_auc"].point == roc_auc_score(labels, probability)
    assert small["roc_auc"].as_dict() == {
        "point": small["roc_auc"].point,
        "low": small["roc_auc"].low,
        "high": small["roc_auc"].high,
    }


def test_bootstrap_is_seeded():
    labels, probability = scored(1000, seed=6)
    first = bootstrap_metrics(labels, probability, 0.3, n_resamples=400)
    assert first == bootstrap_metrics(labels, probability, 0.3, n_resamples=400)
    assert first != bootstrap_metrics(labels, probability, 0.3, n_resamples=400, seed=1)


def test_bootstrap_interval_is_the_percentile_of_the_resamples():
    labels, probability = scored(500, seed=7)
    intervals = bootstrap_metrics(labels, probability, 0.3, n_resamples=200, confidence=0.9)
    per_resample = resampled_metrics(labels, probability, 0.3, bootstrap_indices(500, 200, 0))
    low, high = np.quantile(per_resample["brier"], [0.05, 0.95])
    assert intervals["brier"] == Interval(brier_score_loss(labels, probability), low, high)


def test_bootstrap_rejects_bad_arguments():
    with pytest.raises(ValueError, match="empty"):
        bootstrap_metrics(np.array([], int), np.array([]), 0.5)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_metrics(np.array([0, 1]), np.array([0.2, 0.8]), 0.5, confidence=95)


def test_paired_difference_of_a_model_with_itself_is_exactly_zero():
    labels, probability = scored(800, seed=8)
    difference = paired_difference(labels, probability, probability, 0.3, 0.3)
    assert set(difference) == set(METRIC_NAMES)
    for interval in difference.values():
        assert (interval.point, interval.low, interval.high) == (0.0, 0.0, 0.0)


def test_paired_difference_finds_a_clearly_better_model():
    rng = np.random.default_rng(9)
    labels = (rng.random(1000) < 0.3).astype(int)
    shared = rng.normal(0, 1, 1000)
    champion = 1 / (1 + np.exp(-(0.7 * labels + shared - 1)))
    challenger = 1 / (1 + np.exp(-(2.5 * labels + shared - 1.8)))
    difference = paired_difference(labels, challenger, champion, 0.4, 0.4)
    assert difference["roc_auc"].low > 0
    assert difference["pr_auc"].low > 0
    assert difference["log_loss"].high < 0  # lower is better
    expected = roc_auc_score(labels, challenger) - roc_auc_score(labels, champion)
    assert difference["roc_auc"].point == pytest.approx(expected, abs=1e-12)


def test_paired_difference_uses_the_same_resamples_for_both_models():
    labels, challenger = scored(300, seed=10)
    champion = np.clip(challenger + np.random.default_rng(11).normal(0, 0.1, 300), 0, 1)
    difference = paired_difference(labels, challenger, champion, 0.3, 0.4, n_resamples=100)
    indices = bootstrap_indices(300, 100, seed=0)
    per_resample = (
        resampled_metrics(labels, challenger, 0.3, indices)["f1"]
        - resampled_metrics(labels, champion, 0.4, indices)["f1"]
    )
    assert (difference["f1"].low, difference["f1"].high) == pytest.approx(
        tuple(np.quantile(per_resample, [0.025, 0.975]))
    )


def test_interval_helpers():
    interval = Interval(0.5, 0.4, 0.6)
    assert interval.contains(0.4) and interval.contains(0.6) and not interval.contains(0.61)
    assert not Interval(0.5, math.nan, math.nan).contains(0.5)
    assert interval.as_dict() == {"point": 0.5, "low": 0.4, "high": 0.6}
