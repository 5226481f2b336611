"""Multiclass classification: judged on class probabilities, over the classes present.

Scores are the class probability matrix (columns in the order of the spec's classes); labels
are class indices. Metrics are macro one-vs-rest ROC AUC, log loss, accuracy and macro
precision/recall/F1; the prediction is the most probable class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    log_loss,
    precision_score,
    recall_score,
    roc_auc_score,
)

from mlplatform.tasks.base import (
    SCOPE,
    DataError,
    ModelOutput,
    ResampledIntervals,
    check_aligned,
    plain,
)
from mlplatform.tasks.classification import ClassificationTask, in_class_order
from mlplatform.tasks.metrics import PROBABILITY_CLIP
from mlplatform.tasks.slices import slice_table

MULTICLASS_METRICS = (
    "roc_auc",
    "log_loss",
    "accuracy",
    "macro_precision",
    "macro_recall",
    "macro_f1",
)
"""The metrics :func:`multiclass_metrics` returns, in report order."""

MULTICLASS_SLICE_COLUMNS = ("feature", "slice", "count", "accuracy", "macro_f1", "small")

PROBABILITY_PREFIX = "probability_"
"""Multiclass models output one column per class: ``probability_<class>``."""


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


def _sorted_labels(labels: Sequence[Any]) -> list[Any]:
    """Labels in a stable order: numerically when all are numbers, otherwise as text."""
    if all(isinstance(label, int | float | np.integer | np.floating) for label in labels):
        return sorted(labels)
    return sorted(labels, key=str)


class MulticlassTask(ResampledIntervals, ClassificationTask):
    """Three or more classes: scored by each class's probability, the most probable predicted."""

    name = "multiclass"
    metric_names = MULTICLASS_METRICS
    selection_metric = "log_loss"
    gate_metric = "roc_auc"
    gate_floor = 0.6
    fairness_metric = "accuracy"
    slice_columns = MULTICLASS_SLICE_COLUMNS
    permutation_scoring = "neg_log_loss"
    lightgbm_metric = "multi_logloss"

    def classes_of(self, target: pd.Series) -> tuple[Any, ...]:
        """Every label, sorted (numerically when all are numbers)."""
        return tuple(plain(label) for label in _sorted_labels(list(target.value_counts().index)))

    def encode_target(self, target: pd.Series, classes: Sequence[Any]) -> np.ndarray:
        """Each label's index in ``classes`` (labels compared as text).

        Raises:
            DataError: if a label is not one of ``classes``.

        """
        index = {str(label): i for i, label in enumerate(classes)}
        encoded = target.map(lambda label: index.get(str(plain(label)), -1)).astype(int).to_numpy()
        if (encoded < 0).any():
            unknown = sorted({str(v) for v in target[encoded < 0]})[:5]
            raise DataError(f"labels not seen in training: {', '.join(unknown)}")
        return encoded

    def describe(
        self, target: str, classes: Sequence[Any], threshold: float | None
    ) -> tuple[str, str]:
        """The classes; the prediction is the most probable one."""
        names = ", ".join(map(str, classes))
        return (
            f"multiclass classification of '{target}' ({len(classes)} classes: {names})",
            f"Gives the probability of each class of '{target}' for records shaped like the "
            f"training data; the prediction is the most probable class. {SCOPE}",
        )

    def tuning_score(
        self, labels: np.ndarray, estimator: Any, matrix: Any, iteration: int
    ) -> float:
        """Log loss of the class probabilities."""
        probability = estimator.predict_proba(matrix, num_iteration=iteration)
        return float(log_loss(labels, probability, labels=list(estimator.classes_)))

    def predicted_classes(self, scores: np.ndarray, threshold: float | None) -> np.ndarray:
        """The most probable class of each row."""
        return np.argmax(np.asarray(scores), axis=1)

    def model_scores(self, pipeline: Any, frame: pd.DataFrame, n_classes: int) -> np.ndarray:
        """The class probability matrix."""
        return self.class_probabilities(pipeline, frame, n_classes)

    def booster_scores(self, raw: np.ndarray, estimator: Any, n_classes: int) -> np.ndarray:
        """The booster's class probabilities, reordered to the spec's classes."""
        return in_class_order(raw, estimator, n_classes)

    def output(
        self, scores: np.ndarray, classes: Sequence[Any], threshold: float | None
    ) -> ModelOutput:
        """``prediction`` (the most probable class) and ``probability_<class>`` per class."""
        labels = np.asarray(classes, dtype=object)
        columns = {"prediction": labels[self.predicted_classes(scores, threshold)]}
        for position, label in enumerate(classes):
            columns[f"{PROBABILITY_PREFIX}{label}"] = scores[:, position]
        return ModelOutput(columns)

    def response_fields(self, result: ModelOutput, classes: Sequence[Any]) -> dict[str, Any]:
        """``{class: probability}`` per record."""
        names = [str(label) for label in classes]
        per_class = [result[f"{PROBABILITY_PREFIX}{label}"].tolist() for label in classes]
        probabilities = [dict(zip(names, row, strict=True)) for row in zip(*per_class, strict=True)]
        return {"predictions": result["prediction"].tolist(), "probabilities": probabilities}

    def metrics(
        self, labels: np.ndarray, scores: np.ndarray, threshold: float | None = None
    ) -> dict[str, float]:
        """See :func:`multiclass_metrics` (no threshold)."""
        return multiclass_metrics(labels, scores)

    def resampled_metrics(
        self, labels: np.ndarray, scores: np.ndarray, indices: np.ndarray
    ) -> dict[str, np.ndarray]:
        """:func:`multiclass_metrics` on every resample."""
        y, s = np.asarray(labels), np.asarray(scores, dtype=float)
        rows = [multiclass_metrics(y[row], s[row]) for row in indices]
        return {name: np.array([row[name] for row in rows]) for name in MULTICLASS_METRICS}

    def slices(
        self,
        frame: pd.DataFrame,
        labels: np.ndarray,
        scores: np.ndarray,
        threshold: float | None,
        categorical: list[str],
        numeric_bins: dict[str, int] | None = None,
        min_rows: int = 30,
        min_positives: int = 0,
    ) -> pd.DataFrame:
        """Count, accuracy and macro F1 (over the classes in the slice) per slice."""
        check_aligned(frame, labels, scores)
        y = np.asarray(labels)
        predicted = self.predicted_classes(np.asarray(scores, dtype=float), threshold)

        def measure(feature: str, value: str, mask: np.ndarray) -> dict[str, Any]:
            truth, guess = y[mask].astype(int), predicted[mask]
            return {
                "feature": feature,
                "slice": value,
                "count": int(mask.sum()),
                "accuracy": float(np.mean(truth == guess)),
                "macro_f1": float(f1_score(truth, guess, average="macro", zero_division=0)),
            }

        columns = self.slice_columns[:-1]  # slice_table adds "small"
        return slice_table(frame, categorical, numeric_bins, measure, columns, min_rows)

    def binary_views(self, labels: np.ndarray) -> list[np.ndarray]:
        """Each class against the rest."""
        return [(labels == k).astype(int) for k in np.unique(labels)]
