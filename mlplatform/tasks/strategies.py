"""Evaluation per learning task: metrics, intervals, slices and plots that fit the target.

Binary classification uses the fast paths of :mod:`mlplatform.tasks.metrics` (threshold
metrics, ROC and precision-recall curves). Multiclass models are judged on class probabilities
(macro one-vs-rest ROC AUC, log loss, accuracy, macro precision/recall/F1) and regression models
on predicted values (RMSE, MAE, R2). Every function takes ``scores`` as
:meth:`TabularModel.scores` returns them: the positive-class probability (binary), the class
probability matrix (multiclass) or the predicted values (regression). No Dagster, MLflow or Ray.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    log_loss,
    mean_absolute_error,
    mean_squared_error,
    precision_score,
    r2_score,
    recall_score,
    roc_auc_score,
)

from mlplatform.tasks.metrics import (
    METRIC_NAMES,
    PROBABILITY_CLIP,
    Interval,
    bootstrap_indices,
    bootstrap_metrics,
    check_bootstrap_arguments,
    classification_metrics,
    paired_difference,
    percentile_interval,
)
from mlplatform.tasks.plots import (
    new_figure,
    plot_calibration,
    plot_confusion_matrix,
    plot_feature_importance,
    plot_precision_recall,
    plot_roc,
    png,
)
from mlplatform.tasks.slices import slice_metrics, slice_table

Task = Literal["binary", "multiclass", "regression"]
TASKS: tuple[Task, ...] = ("binary", "multiclass", "regression")

MULTICLASS_METRICS = (
    "roc_auc",
    "log_loss",
    "accuracy",
    "macro_precision",
    "macro_recall",
    "macro_f1",
)
REGRESSION_METRICS = ("rmse", "mae", "r2")


@dataclasses.dataclass(frozen=True)
class TaskProfile:
    """The defaults that make a task's evaluation meaningful.

    Attributes:
        metrics: the metrics reported, in report order.
        selection_metric: the validation metric that picks between candidate algorithms.
        gate_metric: the test metric the promotion gate compares.
        gate_floor: the gate metric's absolute floor (a ceiling for losses).
        fairness_metric: the slice column whose spread between slices is the fairness gap
            (scale-free for every task, so one bound fits any data).

    """

    metrics: tuple[str, ...]
    selection_metric: str
    gate_metric: str
    gate_floor: float
    fairness_metric: str


PROFILES: dict[str, TaskProfile] = {
    "binary": TaskProfile(METRIC_NAMES, "roc_auc", "roc_auc", 0.6, "tpr"),
    "multiclass": TaskProfile(MULTICLASS_METRICS, "log_loss", "roc_auc", 0.6, "accuracy"),
    # R2 is scale-free, so one floor (better than predicting the mean) suits any target.
    "regression": TaskProfile(REGRESSION_METRICS, "rmse", "r2", 0.0, "relative_mae"),
}
"""Each task's :class:`TaskProfile`."""


def multiclass_metrics(labels: np.ndarray, probability: np.ndarray) -> dict[str, float]:
    """Quality of class probabilities (columns = classes 0..k-1) against class indices.

    Every metric is over the classes present in ``labels``: a class absent from a split (a rare
    seasonal class missing from the newest rows) has no recall or AUC there, and counting it as
    zero would punish the model for the data's calendar. ``roc_auc`` is the macro average of the
    present classes' one-vs-rest AUCs (NaN with fewer than two); ``log_loss`` clips
    probabilities like binary log loss; thresholded metrics use the most probable class.
    """
    y = np.asarray(labels).astype(int)
    p = np.asarray(probability, dtype=float)
    present = np.unique(y)
    predicted = np.argmax(p, axis=1)
    clipped = np.clip(p, PROBABILITY_CLIP, 1.0)
    clipped = clipped / clipped.sum(axis=1, keepdims=True)
    macro = {"labels": present, "average": "macro", "zero_division": 0}
    return {
        "roc_auc": float(np.mean([roc_auc_score(y == k, p[:, k]) for k in present]))
        if len(present) > 1
        else math.nan,
        "log_loss": float(log_loss(y, clipped, labels=list(range(p.shape[1])))),
        "accuracy": float(accuracy_score(y, predicted)),
        "macro_precision": float(precision_score(y, predicted, **macro)),
        "macro_recall": float(recall_score(y, predicted, **macro)),
        "macro_f1": float(f1_score(y, predicted, **macro)),
    }


def absent_classes(labels: np.ndarray, classes: Sequence[Any]) -> list[Any]:
    """The classes with no row among ``labels`` (class indices): metrics leave them out."""
    present = set(np.unique(np.asarray(labels).astype(int)).tolist())
    return [label for index, label in enumerate(classes) if index not in present]


def regression_metrics(values: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """RMSE, MAE and R2 (NaN when the true values are constant) of predicted values."""
    y, p = np.asarray(values, dtype=float), np.asarray(predicted, dtype=float)
    return {
        "rmse": float(math.sqrt(mean_squared_error(y, p))),
        "mae": float(mean_absolute_error(y, p)),
        "r2": float(r2_score(y, p)) if np.ptp(y) > 0 else math.nan,
    }


def task_metrics(
    task: Task, labels: np.ndarray, scores: np.ndarray, threshold: float | None = None
) -> dict[str, float]:
    """The task's metrics (see :data:`PROFILES`) of ``scores`` against ``labels``."""
    if task == "binary":
        return classification_metrics(labels, scores, _threshold(threshold))
    if task == "multiclass":
        return multiclass_metrics(labels, scores)
    return regression_metrics(labels, scores)


def _threshold(threshold: float | None) -> float:
    return 0.5 if threshold is None else threshold


def _resampled(
    task: Task, labels: np.ndarray, scores: np.ndarray, n_resamples: int, seed: int
) -> dict[str, np.ndarray]:
    """Each metric on every bootstrap resample (the same resamples for the same arguments)."""
    y, s = np.asarray(labels), np.asarray(scores, dtype=float)
    indices = bootstrap_indices(len(y), n_resamples, seed)
    if task == "regression":
        errors = s[indices] - y[indices]
        truth = y[indices]
        residual = (errors**2).sum(axis=1)
        total = ((truth - truth.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            r2 = np.where(total > 0, 1 - residual / total, np.nan)
        return {
            "rmse": np.sqrt((errors**2).mean(axis=1)),
            "mae": np.abs(errors).mean(axis=1),
            "r2": r2,
        }
    rows = [multiclass_metrics(y[row], s[row]) for row in indices]
    return {name: np.array([row[name] for row in rows]) for name in MULTICLASS_METRICS}


def task_bootstrap(
    task: Task,
    labels: np.ndarray,
    scores: np.ndarray,
    threshold: float | None = None,
    n_resamples: int = 400,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Interval]:
    """Percentile bootstrap intervals of every metric of the task (see ``bootstrap_metrics``).

    Raises:
        ValueError: on an empty split or invalid ``n_resamples`` or ``confidence``.

    """
    if task == "binary":
        return bootstrap_metrics(
            labels, scores, _threshold(threshold), n_resamples, confidence, seed
        )
    check_bootstrap_arguments(len(labels), n_resamples, confidence)
    point = task_metrics(task, labels, scores)
    samples = _resampled(task, labels, scores, n_resamples, seed)
    return {name: percentile_interval(point[name], samples[name], confidence) for name in point}


def task_paired_difference(
    task: Task,
    labels: np.ndarray,
    challenger_scores: np.ndarray,
    champion_scores: np.ndarray,
    challenger_threshold: float | None = None,
    champion_threshold: float | None = None,
    n_resamples: int = 400,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Interval]:
    """Paired bootstrap of challenger - champion on the same resamples (see ``paired_difference``).

    Raises:
        ValueError: on an empty split, mismatched lengths or invalid arguments.

    """
    if task == "binary":
        return paired_difference(
            labels,
            challenger_scores,
            champion_scores,
            _threshold(challenger_threshold),
            _threshold(champion_threshold),
            n_resamples,
            confidence,
            seed,
        )
    if not len(labels) == len(challenger_scores) == len(champion_scores):
        raise ValueError(
            f"labels ({len(labels)}), challenger ({len(challenger_scores)}) and champion "
            f"({len(champion_scores)}) scores must have the same length"
        )
    check_bootstrap_arguments(len(labels), n_resamples, confidence)
    first = task_metrics(task, labels, challenger_scores)
    second = task_metrics(task, labels, champion_scores)
    first_samples = _resampled(task, labels, challenger_scores, n_resamples, seed)
    second_samples = _resampled(task, labels, champion_scores, n_resamples, seed)
    return {
        name: percentile_interval(
            first[name] - second[name], first_samples[name] - second_samples[name], confidence
        )
        for name in first
    }


def predicted_classes(task: Task, scores: np.ndarray, threshold: float | None) -> np.ndarray:
    """Predicted class indices of a classifier's scores (binary: at the threshold)."""
    if task == "binary":
        return (np.asarray(scores) >= _threshold(threshold)).astype(int)
    return np.argmax(np.asarray(scores), axis=1)


MULTICLASS_SLICE_COLUMNS = ("feature", "slice", "count", "accuracy", "macro_f1")
REGRESSION_SLICE_COLUMNS = (
    "feature",
    "slice",
    "count",
    "target_mean",
    "mae",
    "rmse",
    "relative_mae",
)


def task_slices(
    task: Task,
    frame: pd.DataFrame,
    labels: np.ndarray,
    scores: np.ndarray,
    threshold: float | None,
    categorical: list[str],
    numeric_bins: dict[str, int] | None = None,
    min_rows: int = 30,
) -> pd.DataFrame:
    """Per-slice metrics of the task, one row per (feature, slice).

    Binary as ``slice_metrics``; multiclass: count, accuracy and macro F1; regression: count,
    mean target, MAE, RMSE and the slice's MAE relative to the overall MAE. Slices under
    ``min_rows`` are flagged ``small``.

    Raises:
        ValueError: if lengths differ or a column is not in ``frame``.

    """
    if task == "binary":
        return slice_metrics(
            frame, labels, scores, _threshold(threshold), categorical, numeric_bins, min_rows
        )
    if not len(frame) == len(labels) == len(scores):
        raise ValueError(
            f"frame ({len(frame)}), labels ({len(labels)}) and scores ({len(scores)}) "
            "must have the same length"
        )
    y, s = np.asarray(labels), np.asarray(scores, dtype=float)
    if task == "multiclass":
        predicted = np.argmax(s, axis=1)

        def measure(feature: str, value: str, mask: np.ndarray) -> dict[str, Any]:
            truth, guess = y[mask].astype(int), predicted[mask]
            return {
                "feature": feature,
                "slice": value,
                "count": int(mask.sum()),
                "accuracy": float(np.mean(truth == guess)),
                "macro_f1": float(f1_score(truth, guess, average="macro", zero_division=0)),
            }

        columns = MULTICLASS_SLICE_COLUMNS
    else:
        overall_mae = float(np.abs(s - y).mean())

        def measure(feature: str, value: str, mask: np.ndarray) -> dict[str, Any]:
            errors = s[mask] - y[mask]
            mae = float(np.abs(errors).mean())
            return {
                "feature": feature,
                "slice": value,
                "count": int(mask.sum()),
                "target_mean": float(y[mask].mean()),
                "mae": mae,
                "rmse": float(np.sqrt((errors**2).mean())),
                "relative_mae": mae / overall_mae if overall_mae > 0 else math.nan,
            }

        columns = REGRESSION_SLICE_COLUMNS
    return slice_table(frame, categorical, numeric_bins, measure, columns, min_rows)


def plot_predicted_vs_actual(values: np.ndarray, curves: Mapping[str, np.ndarray]) -> bytes:
    """Scatter of predicted against true values per model, with the identity line (PNG)."""
    y = np.asarray(values, dtype=float)
    figure = new_figure()
    axes = figure.add_subplot()
    low, high = float(np.min(y)), float(np.max(y))
    axes.plot([low, high], [low, high], linestyle="--", color="grey", linewidth=1, label="ideal")
    for name, predicted in curves.items():
        axes.scatter(y, np.asarray(predicted, dtype=float), s=6, alpha=0.5, label=name)
    axes.set(xlabel="Actual", ylabel="Predicted", title="Predicted vs actual")
    axes.legend(loc="upper left", fontsize="small")
    return png(figure)


def plot_residuals(values: np.ndarray, curves: Mapping[str, np.ndarray], bins: int = 40) -> bytes:
    """Histogram of residuals (predicted - actual) per model (PNG)."""
    y = np.asarray(values, dtype=float)
    figure = new_figure()
    axes = figure.add_subplot()
    for name, predicted in curves.items():
        axes.hist(np.asarray(predicted, dtype=float) - y, bins=bins, alpha=0.5, label=name)
    axes.axvline(0, linestyle="--", color="grey", linewidth=1)
    axes.set(xlabel="Residual (predicted - actual)", ylabel="Rows", title="Residuals")
    axes.legend(loc="upper right", fontsize="small")
    return png(figure)


def task_plots(
    task: Task,
    labels: np.ndarray,
    curves: Mapping[str, np.ndarray],
    predicted: np.ndarray | None,
    class_names: Sequence[str],
    importance: pd.Series,
) -> dict[str, bytes]:
    """The report's figures for the task, as PNG bytes by name.

    Args:
        task: the learning task.
        labels: true labels (class indices) or values.
        curves: model name -> its scores on the same rows (challenger first).
        predicted: the challenger's predicted class indices (classification only).
        class_names: display names of the classes (classification only).
        importance: the challenger's feature importance.

    Returns:
        Binary: ROC, precision-recall, calibration, confusion matrix; multiclass: confusion
        matrix; regression: predicted vs actual and residuals. All: feature importance.

    """
    plots: dict[str, bytes] = {}
    if task == "binary":
        plots["roc"] = plot_roc(labels, curves)
        plots["precision_recall"] = plot_precision_recall(labels, curves)
        plots["calibration"] = plot_calibration(labels, curves)
    if task == "regression":
        plots["predicted_vs_actual"] = plot_predicted_vs_actual(labels, curves)
        plots["residuals"] = plot_residuals(labels, curves)
    elif predicted is not None:
        plots["confusion_matrix"] = plot_confusion_matrix(labels, predicted, class_names)
    plots["feature_importance"] = plot_feature_importance(importance)
    return plots
