"""Metrics per slice of a feature's values and the fairness gaps between slices."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import (
    roc_auc_score,
)

from mlplatform.tasks.metrics import MISSING_SLICE, as_labels, as_probability, is_number

# --------------------------------------------------------------------------------------------
# Slices and fairness
# --------------------------------------------------------------------------------------------

SLICE_COLUMNS = ("feature", "slice", "count", "positive_rate", "auc", "tpr", "fpr", "small")
SLICE_HEADERS = {"count": "rows", "positive_rate": "positive rate", "auc": "AUC"}
SLICE_HEADERS |= {"tpr": "TPR", "fpr": "FPR"}


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
    y, p = as_labels(labels), as_probability(probability)
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
            size = f"only {int(count)} rows" if is_number(count) else "too few rows"
            if is_number(count) and is_number(rate):
                size += f" ({round(count * rate)} positive)"
            sentences.append(
                f"Slice {row.feature} = {row.slice} has {size} in the evaluation data; "
                "its metrics are unreliable and it is excluded from the fairness gaps."
            )
    for feature, gap in sorted(fairness.items()):
        if is_number(gap) and is_number(fairness_bound) and gap > fairness_bound:
            sentences.append(
                f"Performance differs across {feature} slices: the fairness gap of {gap:.3f} "
                f"exceeds the bound of {fairness_bound:.3f}."
            )
    return sentences
