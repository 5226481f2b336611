"""The numbers and pictures behind a model evaluation report, as pure functions.

Metrics with bootstrap confidence intervals, a paired challenger-vs-champion comparison, the
F1-optimal decision threshold, per-slice metrics and fairness gaps, feature importance, PNG plots
and a Markdown model card. Nothing here imports Dagster or MLflow, so every function can be used
(and tested) on plain arrays and frames.

Labels are always 0/1 arrays with 1 for the positive class; probabilities are the model's
probability of the positive class; a row is predicted positive when ``probability >= threshold``.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.calibration import calibration_curve
from sklearn.inspection import permutation_importance
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
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
_FIGURE_SIZE = (5.0, 4.0)
_DPI = 100
_DATETIME_PARTS = ("month", "dayofweek", "hour")


# --------------------------------------------------------------------------------------------
# Metrics and threshold
# --------------------------------------------------------------------------------------------


def _as_labels(labels: Any) -> np.ndarray:
    return np.asarray(labels).astype(int).ravel()


def _as_probability(probability: Any) -> np.ndarray:
    return np.asarray(probability, dtype=float).ravel()


def _has_both_classes(labels: np.ndarray) -> bool:
    return bool(labels.size) and 0 < int(labels.sum()) < labels.size


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
    y, p = _as_labels(labels), _as_probability(probability)
    predicted = (p >= threshold).astype(int)
    both = _has_both_classes(y)
    clipped = np.clip(p, PROBABILITY_CLIP, 1 - PROBABILITY_CLIP)
    return {
        "roc_auc": float(roc_auc_score(y, p)) if both else math.nan,
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
    y, p = _as_labels(labels), _as_probability(probability)
    if not _has_both_classes(y):
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
    y, p = _as_labels(labels), _as_probability(probability)
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
    y, p = _as_labels(labels), _as_probability(probability)
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
    y = _as_labels(labels)
    challenger_p = _as_probability(challenger_probability)
    champion_p = _as_probability(champion_probability)
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


# --------------------------------------------------------------------------------------------
# Slices and fairness
# --------------------------------------------------------------------------------------------

SLICE_COLUMNS = ("feature", "slice", "count", "positive_rate", "auc", "tpr", "fpr", "small")
_SLICE_HEADERS = {"count": "rows", "positive_rate": "positive rate", "auc": "AUC"}
_SLICE_HEADERS |= {"tpr": "TPR", "fpr": "FPR"}


def _slice_row(
    feature: str, value: str, labels: np.ndarray, predicted: np.ndarray, probability: np.ndarray
) -> dict[str, Any]:
    positives = int(labels.sum())
    negatives = len(labels) - positives
    true_positives = int((predicted & (labels == 1)).sum())
    false_positives = int((predicted & (labels == 0)).sum())
    return {
        "feature": feature,
        "slice": value,
        "count": len(labels),
        "positive_rate": positives / len(labels),
        "auc": float(roc_auc_score(labels, probability)) if positives and negatives else math.nan,
        "tpr": true_positives / positives if positives else math.nan,
        "fpr": false_positives / negatives if negatives else math.nan,
    }


def _slice_labels(column: pd.Series, bins: int | None) -> list[tuple[str, np.ndarray]]:
    """``(slice label, row mask)`` per slice of one column, in a stable order."""
    missing = column.isna().to_numpy()
    slices: list[tuple[str, np.ndarray]] = []
    if bins is None:
        values = column[~missing].astype(str)
        for value in sorted(values.unique()):
            mask = np.zeros(len(column), dtype=bool)
            mask[np.flatnonzero(~missing)[values.to_numpy() == value]] = True
            slices.append((value, mask))
    elif (~missing).any():
        numeric = pd.to_numeric(column, errors="coerce")
        missing = numeric.isna().to_numpy()
        binned = pd.qcut(numeric, q=bins, duplicates="drop")
        if len(binned.cat.categories):
            for interval in binned.cat.categories:
                slices.append((str(interval), (binned == interval).to_numpy()))
        else:  # a single distinct value: no quantile edges, one slice
            slices.append((f"[{numeric.min()}, {numeric.max()}]", ~missing))
    if missing.any():
        slices.append((MISSING_SLICE, missing))
    return [(label, mask) for label, mask in slices if mask.any()]


def slice_metrics(
    frame: pd.DataFrame,
    labels: np.ndarray,
    probability: np.ndarray,
    threshold: float,
    categorical: list[str],
    numeric_bins: dict[str, int] | None = None,
    min_rows: int = 30,
) -> pd.DataFrame:
    """Metrics per slice of the data: one row per (feature, value).

    Args:
        frame: the rows' feature values, aligned by position with ``labels``.
        labels: true labels, 0/1 with 1 for the positive class.
        probability: predicted probability of the positive class.
        threshold: rows with ``probability >= threshold`` are predicted positive.
        categorical: columns sliced by value (missing values form the slice ``"<missing>"``).
        numeric_bins: numeric column -> number of quantile bins (``pd.qcut`` with duplicate edges
            dropped, each slice labelled by its interval; missing values form ``"<missing>"``).
        min_rows: slices with fewer rows are flagged ``small``.

    Returns:
        Columns ``feature``, ``slice``, ``count``, ``positive_rate``, ``auc`` (NaN when the slice
        holds one class), ``tpr``, ``fpr`` (NaN when undefined) and ``small``.

    Raises:
        ValueError: if lengths differ or a column is not in ``frame``.

    """
    y, p = _as_labels(labels), _as_probability(probability)
    if not len(frame) == len(y) == len(p):
        raise ValueError(
            f"frame ({len(frame)}), labels ({len(y)}) and probability ({len(p)}) "
            "must have the same length"
        )
    predicted = p >= threshold

    def measure(feature: str, value: str, mask: np.ndarray) -> dict[str, Any]:
        return _slice_row(feature, value, y[mask], predicted[mask], p[mask])

    return slice_table(frame, categorical, numeric_bins, measure, SLICE_COLUMNS[:-1], min_rows)


def slice_table(
    frame: pd.DataFrame,
    categorical: list[str],
    numeric_bins: dict[str, int] | None,
    measure: Callable[[str, str, np.ndarray], dict[str, Any]],
    columns: tuple[str, ...],
    min_rows: int,
) -> pd.DataFrame:
    """One row per (feature, slice) with whatever ``measure`` computes for the slice's rows.

    Args:
        frame: the rows' feature values.
        categorical: columns sliced by value (missing values form the slice ``"<missing>"``).
        numeric_bins: numeric column -> number of quantile bins.
        measure: ``measure(feature, slice label, row mask)`` -> the row's values, including
            ``feature``, ``slice`` and ``count``.
        columns: the table's columns, in order.
        min_rows: slices with fewer rows are flagged ``small`` (an extra last column).

    Raises:
        ValueError: if a column is not in ``frame``.

    """
    plan = [(name, None) for name in categorical] + list((numeric_bins or {}).items())
    unknown = [name for name, _ in plan if name not in frame.columns]
    if unknown:
        raise ValueError(f"columns not in the frame: {', '.join(map(str, unknown))}")
    rows = [
        measure(str(name), label, mask)
        for name, bins in plan
        for label, mask in _slice_labels(frame[name], bins)
    ]
    # Metrics are numbers even when there is no slice at all (no categorical feature): an empty
    # table keeps its column types, so code computing on it needs no special case.
    result = pd.DataFrame(rows, columns=list(columns)).astype(
        {name: float for name in columns if name not in ("feature", "slice")}
    )
    result["count"] = result["count"].astype(int)
    result["small"] = result["count"] < min_rows
    return result


def fairness_gaps(slices: pd.DataFrame, metric: str = "tpr") -> dict[str, float]:
    """Per feature, the largest difference of ``metric`` between its slices.

    Small slices and slices where the metric is NaN are ignored; features with fewer than two
    remaining slices are left out.

    Args:
        slices: the output of :func:`slice_metrics`.
        metric: the slice column to compare (``"tpr"`` for equal opportunity, ``"fpr"``,
            ``"positive_rate"`` or ``"auc"``).

    Returns:
        Feature -> ``max - min`` of the metric over its eligible slices.

    """
    if slices.empty or metric not in slices.columns:
        return {}
    eligible = slices[~slices["small"].astype(bool)] if "small" in slices else slices
    eligible = eligible[pd.to_numeric(eligible[metric], errors="coerce").notna()]
    gaps = {}
    for feature, group in eligible.groupby("feature", sort=False):
        values = group[metric].astype(float)
        if len(values) >= 2:
            gaps[str(feature)] = float(values.max() - values.min())
    return gaps


def known_limitations(
    slices: pd.DataFrame, fairness: dict[str, float], fairness_bound: float
) -> list[str]:
    """Human sentences for small slices and fairness gaps above the bound.

    Args:
        slices: the output of :func:`slice_metrics` (may be empty).
        fairness: feature -> gap, as from :func:`fairness_gaps`.
        fairness_bound: the largest acceptable gap.

    Returns:
        One sentence per small slice, then one per feature whose gap exceeds the bound.

    """
    sentences = []
    if not slices.empty and {"feature", "slice", "small"} <= set(slices.columns):
        for row in slices[slices["small"].astype(bool)].itertuples(index=False):
            count, rate = getattr(row, "count", None), getattr(row, "positive_rate", None)
            size = f"only {int(count)} rows" if _is_number(count) else "too few rows"
            if _is_number(count) and _is_number(rate):
                size += f" ({round(count * rate)} positive)"
            sentences.append(
                f"Slice {row.feature} = {row.slice} has {size} in the evaluation data; "
                "its metrics are unreliable and it is excluded from the fairness gaps."
            )
    for feature, gap in sorted(fairness.items()):
        if _is_number(gap) and _is_number(fairness_bound) and gap > fairness_bound:
            sentences.append(
                f"Performance differs across {feature} slices: the fairness gap of {gap:.3f} "
                f"exceeds the bound of {fairness_bound:.3f}."
            )
    return sentences


# --------------------------------------------------------------------------------------------
# Feature importance
# --------------------------------------------------------------------------------------------


def _tree_output_widths(preprocess: Any, spec: Any) -> list[tuple[str, int]]:
    """``(input column, number of output columns)`` in the fitted column transformer's order.

    Each numeric, boolean or categorical input gives one output column; each datetime input
    gives one per part of its expander (month, day of week, hour).
    """
    kinds = dict(getattr(spec, "features", None) or {})
    widths = []
    for _, transformer, columns in preprocess.transformers_:
        if isinstance(transformer, str) and transformer == "drop":
            continue
        parts = getattr(transformer, "parts", None)
        for column in [columns] if isinstance(columns, str) else list(columns):
            expands = parts is not None or kinds.get(column) == "datetime"
            widths.append((str(column), len(parts or _DATETIME_PARTS) if expands else 1))
    return widths


_PERMUTATION_SCORING = {"binary": "roc_auc", "multiclass": "neg_log_loss", "regression": "r2"}


def feature_importance(
    model: Any, frame: pd.DataFrame, labels: np.ndarray, seed: int = 0
) -> tuple[pd.Series, str]:
    """How much each input column matters to the model.

    For a LightGBM pipeline (the final estimator has ``booster_``), the total split gain of each
    preprocessed column, summed back to the input column it came from (a datetime column feeds
    month, day of week and hour). Otherwise permutation importance of the whole pipeline on the
    raw ``frame``: the mean drop in the task's score (ROC AUC for binary, negative log loss for
    multiclass, R2 for regression) over 5 shuffles of each input column.

    Args:
        model: a :class:`mlplatform.tabular.TabularModel` (``.pipeline`` and ``.spec``).
        frame: raw input records (for permutation importance; typically the test split).
        labels: their true labels as the model learns them (see ``encode_target``).
        seed: random seed of the permutations.

    Returns:
        ``(importance, method)``: one value per input column, sorted descending, and ``"gain"``
        or ``"permutation"``.

    Raises:
        ValueError: if the gains do not line up with the column transformer's outputs.

    """
    pipeline = model.pipeline
    estimator = pipeline[-1]
    if hasattr(estimator, "booster_"):
        gains = np.asarray(estimator.booster_.feature_importance("gain"), dtype=float)
        widths = _tree_output_widths(pipeline.named_steps["preprocess"], model.spec)
        if sum(width for _, width in widths) != len(gains):
            raise ValueError(
                f"the booster has {len(gains)} features but the column transformer produces "
                f"{sum(width for _, width in widths)}"
            )
        bounds = np.cumsum([0] + [width for _, width in widths])
        values = {
            column: float(gains[bounds[i] : bounds[i + 1]].sum())
            for i, (column, _) in enumerate(widths)
        }
        importance, method = pd.Series(values, dtype=float), "gain"
    else:
        inputs = frame[list(model.spec.features)]
        task = getattr(model.spec, "task", "binary")
        result = permutation_importance(
            pipeline,
            inputs,
            np.asarray(labels, dtype=float) if task == "regression" else _as_labels(labels),
            scoring=_PERMUTATION_SCORING[task],
            n_repeats=5,
            random_state=seed,
        )
        importance = pd.Series(result.importances_mean, index=inputs.columns, dtype=float)
        method = "permutation"
    importance = importance.sort_values(ascending=False, kind="stable").rename("importance")
    return importance, method


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def new_figure(size: tuple[float, float] = _FIGURE_SIZE) -> Figure:
    """A matplotlib figure on the Agg canvas (no pyplot state, safe in worker threads)."""
    figure = Figure(figsize=size, dpi=_DPI)
    FigureCanvasAgg(figure)
    return figure


def png(figure: Figure) -> bytes:
    """The figure, laid out tightly, as PNG bytes."""
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def _one_class_note(axes: Any) -> None:
    axes.text(0.5, 0.5, "needs both classes", ha="center", va="center", transform=axes.transAxes)


def _curves_figure(
    labels: np.ndarray,
    curves: Mapping[str, np.ndarray],
    draw: Callable[[Any, np.ndarray, str, np.ndarray], None],
    baseline: Callable[[Any, np.ndarray], None],
    axes_settings: dict[str, Any],
    legend_loc: str,
    needs_both_classes: bool = True,
) -> bytes:
    """One figure with a reference line and one curve per model, as PNG bytes.

    Args:
        labels: true labels, 0/1 with 1 for the positive class.
        curves: model name -> its positive-class probabilities for the same rows.
        draw: draws one model's curve: ``draw(axes, labels, name, probability)``.
        baseline: draws the reference line: ``baseline(axes, labels)``.
        axes_settings: axis labels, title and limits.
        legend_loc: where the legend goes.
        needs_both_classes: with one class only, show a note instead of curves.

    """
    y = _as_labels(labels)
    figure = new_figure()
    axes = figure.add_subplot()
    baseline(axes, y)
    if needs_both_classes and not _has_both_classes(y):
        _one_class_note(axes)
    else:
        for name, probability in curves.items():
            draw(axes, y, name, _as_probability(probability))
    axes.set(**axes_settings)
    axes.legend(loc=legend_loc, fontsize="small")
    return png(figure)


def _diagonal(label: str) -> Callable[[Any, np.ndarray], None]:
    def draw(axes: Any, _: np.ndarray) -> None:
        axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label=label)

    return draw


def plot_roc(labels: np.ndarray, curves: Mapping[str, np.ndarray]) -> bytes:
    """ROC curves, one per model, with each model's AUC in the legend (PNG bytes)."""

    def draw(axes: Any, y: np.ndarray, name: str, p: np.ndarray) -> None:
        fpr, tpr, _ = roc_curve(y, p)
        axes.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(y, p):.3f})")

    settings = {"xlabel": "False positive rate", "ylabel": "True positive rate"}
    settings |= {"title": "ROC curve", "xlim": (0, 1), "ylim": (0, 1.02)}
    return _curves_figure(labels, curves, draw, _diagonal("chance"), settings, "lower right")


def plot_precision_recall(labels: np.ndarray, curves: Mapping[str, np.ndarray]) -> bytes:
    """Precision-recall curves, one per model, average precision in the legend (PNG bytes)."""

    def base_rate(axes: Any, y: np.ndarray) -> None:
        rate = float(y.mean())
        axes.axhline(rate, linestyle="--", color="grey", linewidth=1, label=f"base rate {rate:.3f}")

    def draw(axes: Any, y: np.ndarray, name: str, p: np.ndarray) -> None:
        precision, recall, _ = precision_recall_curve(y, p)
        average = average_precision_score(y, p)
        axes.step(recall, precision, where="post", label=f"{name} (AP {average:.3f})")

    settings = {"xlabel": "Recall", "ylabel": "Precision", "title": "Precision-recall curve"}
    settings |= {"xlim": (0, 1), "ylim": (0, 1.02)}
    return _curves_figure(labels, curves, draw, base_rate, settings, "upper right")


def plot_calibration(
    labels: np.ndarray, curves: Mapping[str, np.ndarray], n_bins: int = 10
) -> bytes:
    """Reliability diagram: observed positive rate against mean predicted probability (PNG bytes).

    ``n_bins`` equal-width probability bins; empty bins are not drawn.
    """

    def draw(axes: Any, y: np.ndarray, name: str, p: np.ndarray) -> None:
        observed, predicted = calibration_curve(
            y, np.clip(p, 0.0, 1.0), n_bins=n_bins, strategy="uniform"
        )
        axes.plot(predicted, observed, marker="o", markersize=3, label=name)

    settings = {"xlabel": "Mean predicted probability", "ylabel": "Observed positive rate"}
    settings |= {"title": "Calibration", "xlim": (0, 1), "ylim": (0, 1)}
    return _curves_figure(
        labels,
        curves,
        draw,
        _diagonal("perfectly calibrated"),
        settings,
        "upper left",
        needs_both_classes=False,
    )


def plot_confusion_matrix(
    labels: np.ndarray, predicted: np.ndarray, class_names: Sequence[str]
) -> bytes:
    """Confusion matrix with the count in every cell.

    Args:
        labels: true labels as class indices (0/1 for binary, 1 = the positive class).
        predicted: predicted class indices.
        class_names: display names of class 0, 1, ...

    Returns:
        The figure as PNG bytes.

    """
    ticks = list(range(len(class_names)))
    matrix = confusion_matrix(_as_labels(labels), _as_labels(predicted), labels=ticks)
    side = max(_FIGURE_SIZE[1], 1.5 + 0.45 * len(ticks))
    figure = new_figure((side + 1.0, side))
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    middle = matrix.max() / 2 if matrix.size else 0
    for (row, column), count in np.ndenumerate(matrix):
        axes.text(
            column,
            row,
            f"{count:,}",
            ha="center",
            va="center",
            color="white" if count > middle else "black",
        )
    names = [str(name) for name in class_names]
    axes.set_xticks(ticks, labels=names, rotation=45 if len(ticks) > 4 else 0)
    axes.set_yticks(ticks, labels=names)
    axes.set(xlabel="Predicted", ylabel="Actual", title="Confusion matrix")
    return png(figure)


def plot_feature_importance(importance: pd.Series, top: int = 20) -> bytes:
    """Horizontal bars of the ``top`` most important features, the largest at the top.

    Args:
        importance: feature -> importance (as from :func:`feature_importance`).
        top: how many features to show.

    Returns:
        The figure as PNG bytes.

    """
    shown = importance.sort_values(ascending=False, kind="stable").head(top)
    figure = new_figure((_FIGURE_SIZE[0], max(_FIGURE_SIZE[1], 1.0 + 0.22 * len(shown))))
    axes = figure.add_subplot()
    positions = np.arange(len(shown))
    axes.barh(positions, shown.to_numpy(dtype=float), color="tab:blue")
    axes.set_yticks(positions, labels=[str(name) for name in shown.index], fontsize="small")
    axes.invert_yaxis()
    title = f"Feature importance ({importance.name})" if importance.name else "Feature importance"
    axes.set(xlabel="Importance", title=title)
    return png(figure)


# --------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, int | float | np.integer | np.floating)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _text(value: Any, digits: int = 4) -> str:
    """A value for Markdown: numbers rounded, missing values as ``n/a``, pipes escaped."""
    if value is None or isinstance(value, bool | np.bool_):
        return NOT_AVAILABLE if value is None else ("yes" if value else "no")
    if isinstance(value, float | np.floating):
        return f"{float(value):.{digits}f}" if math.isfinite(float(value)) else NOT_AVAILABLE
    if isinstance(value, np.integer):
        value = int(value)
    if isinstance(value, int):
        return f"{value:,}"
    text = str(value).strip()
    return text.replace("|", "\\|").replace("\n", " ") if text else NOT_AVAILABLE


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_text(cell) for cell in row) + " |" for row in rows]
    return lines


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _records(value: Any) -> list[Mapping[str, Any]]:
    if isinstance(value, pd.DataFrame):
        return value.to_dict("records")
    if isinstance(value, list | tuple):
        return [record for record in value if isinstance(record, Mapping)]
    return []


def _interval_parts(value: Any) -> tuple[Any, Any, Any]:
    if isinstance(value, Interval):
        return value.point, value.low, value.high
    if isinstance(value, Mapping):
        return value.get("point"), value.get("low"), value.get("high")
    return value, None, None


def _percent(value: Any) -> str:
    return f"{float(value):.1%}" if _is_number(value) else NOT_AVAILABLE


def render_model_card(card: dict) -> str:
    """A Markdown model card from a plain dictionary; missing values render as ``n/a``.

    Args:
        card: keys ``model_name``, ``model_version``, ``task``, ``intended_use``,
            ``training_data`` (``source``, ``data_version``, ``rows``, ``time_range``,
            ``class_balance`` {label: share} or, for regression, ``target`` {statistic:
            value}), ``features`` {name: kind}, ``dropped``
            {name: reason}, ``threshold``, ``metrics`` {name: {point, low, high}},
            ``champion_comparison``, ``slices`` (records of :func:`slice_metrics`),
            ``fairness_gaps`` {feature: gap}, ``fairness_bound``, ``fairness_metric`` (the
            slice column the gaps compare, ``tpr`` by default), ``limitations`` (sentences)
            and ``lineage`` (``dagster_run_id``, ``mlflow_run_id``, ``code_version``,
            ``git_sha``). Every key is optional.

    Returns:
        The card: title, Intended use, Training data, Features, Metrics (with 95% intervals),
        Slices and fairness (features whose gap exceeds the bound flagged), Known limitations
        (the given ones plus every small slice and gap above the bound) and Lineage.

    """
    card = _mapping(card)
    name, version = _text(card.get("model_name")), _text(card.get("model_version"))
    lines = [f"# Model card: {name} v{version}", "", f"**Task:** {_text(card.get('task'))}", ""]

    lines += ["## Intended use", "", _text(card.get("intended_use")), ""]

    data = _mapping(card.get("training_data"))
    lines += [
        "## Training data",
        "",
        f"- **Source:** {_text(data.get('source'))}",
        f"- **Data version:** {_text(data.get('data_version'))}",
        f"- **Rows:** {_text(data.get('rows'))}",
        f"- **Time range:** {_text(data.get('time_range'))}",
    ]
    balance = _mapping(data.get("class_balance"))
    target = _mapping(data.get("target"))
    if target:
        summary = ", ".join(f"{name} {_text(value)}" for name, value in target.items())
        lines += [f"- **Target:** {summary}", ""]
    else:
        shares = ", ".join(f"{_text(label)}: {_percent(share)}" for label, share in balance.items())
        lines += [f"- **Class balance:** {shares or NOT_AVAILABLE}", ""]

    features = _mapping(card.get("features"))
    lines += ["## Features", ""]
    if features:
        lines += _table(["feature", "kind"], [[n, k] for n, k in features.items()])
    else:
        lines.append(NOT_AVAILABLE)
    dropped = _mapping(card.get("dropped"))
    if dropped:
        lines += ["", "Columns not used as features:", ""]
        lines += _table(["column", "reason"], [[n, r] for n, r in dropped.items()])
    lines.append("")

    metrics = _mapping(card.get("metrics"))
    lines += ["## Metrics", "", f"**Decision threshold:** {_text(card.get('threshold'))}", ""]
    if metrics:
        rows = []
        for metric, value in metrics.items():
            point, low, high = _interval_parts(value)
            interval = (
                f"[{_text(low)}, {_text(high)}]"
                if _is_number(low) and _is_number(high)
                else NOT_AVAILABLE
            )
            direction = "lower is better" if metric in LOWER_IS_BETTER else "higher is better"
            rows.append([metric, point, interval, direction])
        lines += _table(["metric", "value", "95% interval", "direction"], rows)
    else:
        lines.append(NOT_AVAILABLE)
    lines += ["", f"**Against the champion:** {_text(card.get('champion_comparison'))}", ""]

    slice_records = _records(card.get("slices"))
    gaps = {str(k): v for k, v in _mapping(card.get("fairness_gaps")).items()}
    bound = card.get("fairness_bound")
    lines += ["## Slices and fairness", ""]
    if slice_records:
        columns = list(slice_records[0])
        header = [_SLICE_HEADERS.get(column, column.replace("_", " ")) for column in columns]
        lines += _table(header, [[record.get(c) for c in columns] for record in slice_records])
    else:
        lines.append("No slice metrics.")
    metric = _text(card.get("fairness_metric") or "tpr")
    lines += [
        "",
        f"**Fairness gap:** the largest difference in {metric} between a feature's slices "
        f"(small slices ignored); **bound:** {_text(bound)}",
        "",
        "**Declared sensitive (bounded by the promotion gate):** "
        + (", ".join(map(str, card.get("sensitive_features") or [])) or "none"),
        "",
    ]
    if gaps:
        rows = []
        for feature, gap in gaps.items():
            if not (_is_number(gap) and _is_number(bound)):
                status = NOT_AVAILABLE
            elif gap > bound:
                status = "**EXCEEDS BOUND**"
            else:
                status = "within bound"
            rows.append([feature, gap, status])
        lines += _table(["feature", "gap", "status"], rows)
    else:
        lines.append("No fairness gaps computed.")
    lines.append("")

    given = [str(item) for item in card.get("limitations") or [] if str(item).strip()]
    automatic = known_limitations(
        pd.DataFrame(slice_records),
        {k: float(v) for k, v in gaps.items() if _is_number(v)},
        float(bound) if _is_number(bound) else math.inf,
    )
    limitations = list(dict.fromkeys(given + automatic))
    lines += ["## Known limitations", ""]
    lines += [f"- {item}" for item in limitations] or ["None recorded."]
    lines.append("")

    lineage = _mapping(card.get("lineage"))
    lines += [
        "## Lineage",
        "",
        f"- **Dagster run:** {_text(lineage.get('dagster_run_id'))}",
        f"- **MLflow run:** {_text(lineage.get('mlflow_run_id'))}",
        f"- **Code version:** {_text(lineage.get('code_version'))}",
        f"- **Git commit:** {_text(lineage.get('git_sha'))}",
        "",
    ]
    return "\n".join(lines)
