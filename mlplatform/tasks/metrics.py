"""Binary classification metrics, the decision threshold and bootstrap confidence intervals.

Labels are always 0/1 arrays with 1 for the positive class; probabilities are the model's
probability of the positive class; a row is predicted positive when ``probability >= threshold``.
Everything works on plain arrays: nothing here imports Dagster, MLflow or Ray.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    f1_score,
    log_loss,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
)

LOWER_IS_BETTER = frozenset({"log_loss", "brier", "rmse", "mae"})
"""Metrics where a smaller value is better; every other metric is better when larger."""

METRIC_NAMES = (
    "roc_auc",
    "pr_auc",
    "log_loss",
    "brier",
    "accuracy",
    "precision",
    "recall",
    "f1",
)
"""The metrics :func:`classification_metrics` returns, in report order."""

RANKING_METRICS = frozenset({"roc_auc", "pr_auc"})
"""Metrics that need both classes present (resamples with one class are skipped for these)."""

PROBABILITY_CLIP = 1e-7
MISSING_SLICE = "<missing>"
NOT_AVAILABLE = "n/a"

# Bootstrap work is done in chunks of resamples of at most this many (resample, row) cells, so
# memory stays bounded on large test splits.
_CHUNK_CELLS = 2_000_000
# --------------------------------------------------------------------------------------------
# Metrics and threshold
# --------------------------------------------------------------------------------------------


def as_labels(labels: Any) -> np.ndarray:
    """Labels as a flat 0/1 integer array."""
    return np.asarray(labels).astype(int).ravel()


def as_probability(probability: Any) -> np.ndarray:
    """Probabilities as a flat float array."""
    return np.asarray(probability, dtype=float).ravel()


def has_both_classes(labels: np.ndarray) -> bool:
    """Whether 0/1 labels hold both classes (ranking metrics need both)."""
    return bool(labels.size) and 0 < int(labels.sum()) < labels.size


def roc_auc(labels: np.ndarray, probability: np.ndarray) -> float:
    """ROC AUC of positive-class probabilities; NaN when the labels hold a single class."""
    y, p = as_labels(labels), as_probability(probability)
    return float(roc_auc_score(y, p)) if has_both_classes(y) else math.nan


def classification_metrics(
    labels: np.ndarray, probability: np.ndarray, threshold: float
) -> dict[str, float]:
    """Threshold-free and thresholded quality of positive-class probabilities.

    Args:
        labels: true labels, 0/1 with 1 for the positive class.
        probability: predicted probability of the positive class, one per label.
        threshold: rows with ``probability >= threshold`` are predicted positive.

    Returns:
        ``roc_auc``, ``pr_auc`` (average precision), ``log_loss`` (probabilities clipped to
        ``[1e-7, 1 - 1e-7]``), ``brier``, and ``accuracy``, ``precision``, ``recall`` and ``f1``
        at the threshold (0 where undefined). ``roc_auc`` and ``pr_auc`` are NaN when the labels
        hold a single class.

    """
    y, p = as_labels(labels), as_probability(probability)
    predicted = (p >= threshold).astype(int)
    both = has_both_classes(y)
    clipped = np.clip(p, PROBABILITY_CLIP, 1 - PROBABILITY_CLIP)
    return {
        "roc_auc": roc_auc(y, p),
        "pr_auc": float(average_precision_score(y, p)) if both else math.nan,
        "log_loss": float(log_loss(y, clipped, labels=[0, 1])),
        "brier": float(brier_score_loss(y, p, pos_label=1)),
        "accuracy": float(accuracy_score(y, predicted)),
        "precision": float(precision_score(y, predicted, zero_division=0)),
        "recall": float(recall_score(y, predicted, zero_division=0)),
        "f1": float(f1_score(y, predicted, zero_division=0)),
    }


def choose_threshold(labels: np.ndarray, probability: np.ndarray) -> float:
    """The decision threshold that maximises F1 on the given (validation) split.

    Candidates are the distinct probabilities (the precision-recall curve's thresholds); among
    equally good thresholds the lowest is chosen, so the result is deterministic.

    Args:
        labels: true labels, 0/1 with 1 for the positive class.
        probability: predicted probability of the positive class.

    Returns:
        The threshold, or 0.5 when the labels hold a single class.

    """
    y, p = as_labels(labels), as_probability(probability)
    if not has_both_classes(y):
        return 0.5
    precision, recall, thresholds = precision_recall_curve(y, p)
    precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
    denominator = precision + recall
    f1 = np.divide(
        2 * precision * recall,
        denominator,
        out=np.zeros_like(denominator),
        where=denominator > 0,
    )
    return float(thresholds[int(np.argmax(f1))])


# --------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Interval:
    """A point estimate with a confidence interval around it.

    Attributes:
        point: the estimate on the full data.
        low: lower end of the interval.
        high: upper end of the interval.

    """

    point: float
    low: float
    high: float

    @property
    def width(self) -> float:
        """``high - low`` (NaN when the interval is undefined)."""
        return self.high - self.low

    def contains(self, value: float) -> bool:
        """Whether ``low <= value <= high`` (False when the interval is undefined)."""
        return bool(self.low <= value <= self.high)

    def as_dict(self) -> dict[str, float]:
        """``{"point": ..., "low": ..., "high": ...}``, as a model card expects."""
        return {"point": self.point, "low": self.low, "high": self.high}


def bootstrap_indices(n_rows: int, n_resamples: int, seed: int = 0) -> np.ndarray:
    """Row indices of ``n_resamples`` bootstrap resamples (with replacement) of ``n_rows`` rows.

    Returns:
        An integer array of shape ``(n_resamples, n_rows)``; the same arguments always give the
        same indices. The bootstrap functions draw exactly these indices.

    """
    return np.concatenate(list(_index_chunks(n_rows, n_resamples, seed)), axis=0)


def _index_chunks(n_rows: int, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_CELLS // max(n_rows, 1))
    for start in range(0, n_resamples, chunk):
        yield rng.integers(0, n_rows, size=(min(chunk, n_resamples - start), n_rows))


class _ScoredRows:
    """One model's scores, prepared for fast bootstrap metrics.

    Every metric depends on a resample only through how many positive and negative rows it
    holds at each distinct score: thresholded counts, log loss and Brier score are sums over
    those groups, ROC AUC is the Mann-Whitney statistic over them (tied scores count one half)
    and average precision is the step-wise precision-recall sum over distinct scores, exactly
    as scikit-learn computes them on the resampled rows. So each resample is reduced to a
    ``(negatives, positives)`` count per score group with a single ``bincount``.
    """

    def __init__(self, labels: np.ndarray, probability: np.ndarray, threshold: float):
        scores, group = np.unique(-probability, return_inverse=True)  # highest score first
        self.scores = -scores
        self.n_groups = len(scores)
        self.cell = 2 * group.ravel() + labels  # (score group, label) of each row
        self.predicted = self.scores >= threshold
        clipped = np.clip(self.scores, PROBABILITY_CLIP, 1 - PROBABILITY_CLIP)
        self.loss_negative, self.loss_positive = -np.log1p(-clipped), -np.log(clipped)
        self.brier_negative, self.brier_positive = self.scores**2, (1 - self.scores) ** 2

    def metrics(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Every metric for each resample (one row of ``indices`` per resample)."""
        n_resamples, size = indices.shape
        cells = 2 * self.n_groups
        keys = (self.cell[indices] + (np.arange(n_resamples) * cells)[:, None]).ravel()
        counts = np.bincount(keys, minlength=n_resamples * cells).reshape(n_resamples, -1, 2)
        negative, positive = counts[..., 0].astype(float), counts[..., 1].astype(float)
        negatives, positives = negative.sum(axis=1), positive.sum(axis=1)

        tp = positive @ self.predicted.astype(float)
        fp = negative @ self.predicted.astype(float)
        fn = positives - tp
        loss = negative @ self.loss_negative + positive @ self.loss_positive
        brier = negative @ self.brier_negative + positive @ self.brier_positive

        negatives_seen = np.cumsum(negative, axis=1)
        positives_seen = np.cumsum(positive, axis=1)
        negatives_below = negatives[:, None] - negatives_seen
        concordant = (positive * (negatives_below + 0.5 * negative)).sum(axis=1)
        precision_at = _ratio(positives_seen, positives_seen + negatives_seen)
        both = (positives > 0) & (negatives > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            roc_auc = np.where(both, concordant / (positives * negatives), np.nan)
            pr_auc = np.where(both, (positive * precision_at).sum(axis=1) / positives, np.nan)
        return {
            "roc_auc": roc_auc,
            "pr_auc": pr_auc,
            "log_loss": loss / size,
            "brier": brier / size,
            "accuracy": (size - fp - fn) / size,
            "precision": _ratio(tp, tp + fp),
            "recall": _ratio(tp, positives),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        }


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``numerator / denominator``, 0 where the denominator is 0 (like zero_division=0)."""
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def resampled_metrics(
    labels: np.ndarray, probability: np.ndarray, threshold: float, indices: np.ndarray
) -> dict[str, np.ndarray]:
    """Every metric of :func:`classification_metrics` on each of the given resamples.

    Args:
        labels: true labels, 0/1 with 1 for the positive class.
        probability: predicted probability of the positive class.
        threshold: the decision threshold for the thresholded metrics.
        indices: row indices, shape ``(n_resamples, n_rows_per_resample)``.

    Returns:
        Metric name -> array with one value per resample; ``roc_auc`` and ``pr_auc`` are NaN for
        resamples that hold a single class.

    """
    y, p = as_labels(labels), as_probability(probability)
    indices = np.atleast_2d(np.asarray(indices))
    return _ScoredRows(y, p, threshold).metrics(indices)


def percentile_interval(point: float, values: np.ndarray, confidence: float) -> Interval:
    """The central ``confidence`` interval of the finite resampled ``values`` around ``point``."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return Interval(point, math.nan, math.nan)
    tail = (1 - confidence) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return Interval(float(point), float(low), float(high))


def check_bootstrap_arguments(n_rows: int, n_resamples: int, confidence: float) -> None:
    """Raise ``ValueError`` on an empty split, no resamples or a confidence outside (0, 1)."""
    if n_rows == 0:
        raise ValueError("cannot bootstrap an empty split")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be within (0, 1), got {confidence}")


def _bootstrap(
    n_rows: int,
    n_resamples: int,
    seed: int,
    statistic: Callable[[np.ndarray], dict[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """Apply ``statistic`` to the indices of every resample, chunk by chunk, and concatenate."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in METRIC_NAMES}
    for indices in _index_chunks(n_rows, n_resamples, seed):
        for name, values in statistic(indices).items():
            parts[name].append(values)
    return {name: np.concatenate(values) for name, values in parts.items()}


def bootstrap_metrics(
    labels: np.ndarray,
    probability: np.ndarray,
    threshold: float,
    n_resamples: int = 400,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Interval]:
    """Percentile bootstrap confidence intervals for every metric.

    Rows are resampled with replacement; resamples holding a single class are skipped for
    ``roc_auc`` and ``pr_auc``.

    Args:
        labels: true labels, 0/1 with 1 for the positive class.
        probability: predicted probability of the positive class.
        threshold: the decision threshold for the thresholded metrics.
        n_resamples: number of bootstrap resamples.
        confidence: coverage of the intervals.
        seed: random seed; the same arguments always give the same intervals.

    Returns:
        Metric name -> :class:`Interval` whose ``point`` is the metric on the full data.

    Raises:
        ValueError: on an empty split or invalid ``n_resamples`` or ``confidence``.

    """
    y, p = as_labels(labels), as_probability(probability)
    check_bootstrap_arguments(len(y), n_resamples, confidence)
    point = classification_metrics(y, p, threshold)
    samples = _bootstrap(len(y), n_resamples, seed, _ScoredRows(y, p, threshold).metrics)
    return {
        name: percentile_interval(point[name], samples[name], confidence) for name in METRIC_NAMES
    }


def paired_difference(
    labels: np.ndarray,
    challenger_probability: np.ndarray,
    champion_probability: np.ndarray,
    challenger_threshold: float,
    champion_threshold: float,
    n_resamples: int = 400,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Interval]:
    """Paired bootstrap of challenger minus champion, metric by metric.

    Both models are scored on the same resampled rows in every resample, so the shared
    difficulty of the rows cancels and the interval reflects the difference between the models
    only. For losses (:data:`LOWER_IS_BETTER`) a negative difference favours the challenger.

    Args:
        labels: true labels of the shared split, 0/1 with 1 for the positive class.
        challenger_probability: the challenger's positive-class probabilities.
        champion_probability: the champion's positive-class probabilities on the same rows.
        challenger_threshold: the challenger's decision threshold.
        champion_threshold: the champion's decision threshold.
        n_resamples: number of bootstrap resamples.
        confidence: coverage of the intervals.
        seed: random seed; the same arguments always give the same intervals.

    Returns:
        Metric name -> :class:`Interval` of ``challenger - champion``; ``point`` is the
        difference on the full data.

    Raises:
        ValueError: on an empty split, mismatched lengths or invalid arguments.

    """
    y = as_labels(labels)
    challenger_p = as_probability(challenger_probability)
    champion_p = as_probability(champion_probability)
    if not len(y) == len(challenger_p) == len(champion_p):
        raise ValueError(
            f"labels ({len(y)}), challenger ({len(challenger_p)}) and champion "
            f"({len(champion_p)}) probabilities must have the same length"
        )
    check_bootstrap_arguments(len(y), n_resamples, confidence)
    challenger = classification_metrics(y, challenger_p, challenger_threshold)
    champion = classification_metrics(y, champion_p, champion_threshold)

    first_rows = _ScoredRows(y, challenger_p, challenger_threshold)
    second_rows = _ScoredRows(y, champion_p, champion_threshold)

    def difference(indices: np.ndarray) -> dict[str, np.ndarray]:
        first, second = first_rows.metrics(indices), second_rows.metrics(indices)
        return {name: first[name] - second[name] for name in METRIC_NAMES}

    samples = _bootstrap(len(y), n_resamples, seed, difference)
    return {
        name: percentile_interval(challenger[name] - champion[name], samples[name], confidence)
        for name in METRIC_NAMES
    }


def is_number(value: Any) -> bool:
    """Whether a value is a finite number worth formatting as one (booleans are not)."""
    return (
        isinstance(value, int | float | np.integer | np.floating)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )
