"""Binary classification: the positive class's probability, a decision threshold, fast intervals.

Metrics, threshold, intervals and slices are the fast paths of :mod:`mlplatform.tasks.metrics`
and :mod:`mlplatform.tasks.slices`; labels are 0/1 with 1 for the positive class (the spec's
last class).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from mlplatform.tasks import metrics
from mlplatform.tasks.base import SCOPE, ModelOutput, plain
from mlplatform.tasks.classification import ClassificationTask
from mlplatform.tasks.metrics import METRIC_NAMES, Interval
from mlplatform.tasks.plots import plot_calibration, plot_precision_recall, plot_roc
from mlplatform.tasks.slices import SLICE_COLUMNS, slice_metrics

_POSITIVE_TOKENS = ("1", "true", "yes", "y", "positive", "pos")
"""Labels taken as the positive class when present (otherwise the minority class is)."""

DEFAULT_THRESHOLD = 0.5
"""The decision threshold when none was chosen."""


def _threshold(threshold: float | None) -> float:
    return DEFAULT_THRESHOLD if threshold is None else threshold


class BinaryTask(ClassificationTask):
    """Two classes: scored by the positive class's probability, predicted at a threshold."""

    name = "binary"
    metric_names = METRIC_NAMES
    selection_metric = "roc_auc"
    gate_metric = "roc_auc"
    gate_floor = 0.6
    fairness_metric = "tpr"
    slice_columns = SLICE_COLUMNS
    permutation_scoring = "roc_auc"
    lightgbm_metric = "auc"

    def classes_of(self, target: pd.Series) -> tuple[Any, ...]:
        """``(negative, positive)``, the positive class last.

        The positive class is ``1``/``True``/``"yes"``-like when present, otherwise the minority
        class.
        """
        counts = target.value_counts()
        labels = list(counts.index)
        positive = next(
            (label for label in labels if str(label).strip().lower() in _POSITIVE_TOKENS),
            counts.idxmin(),
        )
        negative = next(label for label in labels if label != positive)
        return (plain(negative), plain(positive))

    def positive_class(self, classes: Sequence[Any]) -> Any:
        """The last of ``classes``: the scores are its probability."""
        return classes[-1]

    def encode_target(self, target: pd.Series, classes: Sequence[Any]) -> np.ndarray:
        """1 for the positive class (the last of ``classes``), 0 for anything else."""
        return (target == self.positive_class(classes)).astype(int).to_numpy()

    def describe(
        self, target: str, classes: Sequence[Any], threshold: float | None
    ) -> tuple[str, str]:
        """The positive class and the decision threshold."""
        positive = classes[-1]
        return (
            f"binary classification of '{target}' (positive class: {positive})",
            f"Scores the probability that '{target}' is {positive} for records "
            f"shaped like the training data; predictions at the decision threshold "
            f"{threshold:.3f}. {SCOPE}",
        )

    def check_tuning_labels(self, labels: np.ndarray, split: str) -> None:
        """ROC AUC needs both classes."""
        if len(np.unique(labels)) != 2:
            raise ValueError(f"{split} labels must hold both classes for ROC AUC")
        super().check_tuning_labels(labels, split)

    def tuning_score(
        self, labels: np.ndarray, estimator: Any, matrix: Any, iteration: int
    ) -> float:
        """ROC AUC of the positive class's probability."""
        probability = estimator.predict_proba(matrix, num_iteration=iteration)[:, 1]
        return float(roc_auc_score(labels, probability))

    def choose_threshold(self, labels: np.ndarray, scores: np.ndarray) -> float | None:
        """The threshold that maximises F1 (see :func:`metrics.choose_threshold`)."""
        return metrics.choose_threshold(labels, scores)

    def model_threshold(self, threshold: float | None) -> float | None:
        """Binary models keep their threshold."""
        return threshold

    def predicted_classes(self, scores: np.ndarray, threshold: float | None) -> np.ndarray:
        """1 where the probability reaches the threshold (0.5 when none), else 0."""
        return (np.asarray(scores) >= _threshold(threshold)).astype(int)

    def model_scores(self, pipeline: Any, frame: pd.DataFrame, n_classes: int) -> np.ndarray:
        """The positive class's probability."""
        return self.class_probabilities(pipeline, frame, n_classes)[:, 1]

    def booster_scores(self, raw: np.ndarray, estimator: Any, n_classes: int) -> np.ndarray:
        """The booster's output is already the probability of encoded class 1, the positive one."""
        return np.asarray(raw, dtype=float)

    def output(
        self, scores: np.ndarray, classes: Sequence[Any], threshold: float | None
    ) -> ModelOutput:
        """``prediction`` (the class at the threshold) and the positive class's ``probability``."""
        negative, positive = classes
        labels = np.where(scores >= threshold, positive, negative)
        return ModelOutput({"prediction": labels, "probability": np.asarray(scores)})

    def response_fields(self, result: ModelOutput, classes: Sequence[Any]) -> dict[str, Any]:
        """The positive-class probability per record."""
        return {
            "predictions": result["prediction"].tolist(),
            "probabilities": result["probability"].tolist(),
        }

    def metrics(
        self, labels: np.ndarray, scores: np.ndarray, threshold: float | None = None
    ) -> dict[str, float]:
        """See :func:`metrics.classification_metrics` (threshold 0.5 when none)."""
        return metrics.classification_metrics(labels, scores, _threshold(threshold))

    def bootstrap(
        self,
        labels: np.ndarray,
        scores: np.ndarray,
        threshold: float | None = None,
        n_resamples: int = 400,
        confidence: float = 0.95,
        seed: int = 0,
    ) -> dict[str, Interval]:
        """See :func:`metrics.bootstrap_metrics` (threshold 0.5 when none)."""
        return metrics.bootstrap_metrics(
            labels, scores, _threshold(threshold), n_resamples, confidence, seed
        )

    def paired_difference(
        self,
        labels: np.ndarray,
        challenger_scores: np.ndarray,
        champion_scores: np.ndarray,
        challenger_threshold: float | None = None,
        champion_threshold: float | None = None,
        n_resamples: int = 400,
        confidence: float = 0.95,
        seed: int = 0,
    ) -> dict[str, Interval]:
        """See :func:`metrics.paired_difference` (thresholds 0.5 when none)."""
        return metrics.paired_difference(
            labels,
            challenger_scores,
            champion_scores,
            _threshold(challenger_threshold),
            _threshold(champion_threshold),
            n_resamples,
            confidence,
            seed,
        )

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
        """See :func:`slice_metrics`; slices with under ``min_positives`` positives are small.

        A rate over a handful of positives is noise, not a fairness signal: such slices are
        only listed (and flagged in the card), like slices with few rows.
        """
        table = slice_metrics(
            frame, labels, scores, _threshold(threshold), categorical, numeric_bins, min_rows
        )
        positives = table["count"] * table["positive_rate"]
        table["small"] = table["small"] | (positives.round() < min_positives)
        return table

    def score_plots(
        self,
        labels: np.ndarray,
        curves: Mapping[str, np.ndarray],
        threshold: float | None,
        class_names: Sequence[str],
    ) -> dict[str, bytes]:
        """ROC, precision-recall and calibration curves, then the confusion matrix."""
        return {
            "roc": plot_roc(labels, curves),
            "precision_recall": plot_precision_recall(labels, curves),
            "calibration": plot_calibration(labels, curves),
        } | super().score_plots(labels, curves, threshold, class_names)

    def live_metrics(self, frame: pd.DataFrame, positive_class: Any = None) -> dict[str, float]:
        """``accuracy``, and ``roc_auc`` of the scores when both classes are labelled.

        Raises:
            ValueError: if ``positive_class`` is ``None`` and labels or predictions are not 0/1.

        """
        live = super().live_metrics(frame)
        labels = frame["label"].to_numpy(dtype=object)
        positive = _positive(labels, frame["prediction"].to_numpy(dtype=object), positive_class)
        scores = frame["score"].to_numpy(dtype=float)
        known = ~np.isnan(scores)
        auc = metrics.roc_auc(labels[known] == positive, scores[known])
        return live if math.isnan(auc) else live | {"roc_auc": auc}

    def binary_views(self, labels: np.ndarray) -> list[np.ndarray]:
        """The labels themselves."""
        return [labels]


def _positive(labels: np.ndarray, predictions: np.ndarray, positive_class: Any) -> Any:
    """The positive class; ``None`` means 1, accepted only when labels and predictions are 0/1."""
    if positive_class is not None:
        return positive_class
    values = set(labels.tolist()) | set(predictions.tolist())
    if values <= {0, 1}:  # also 0.0/1.0 and False/True, which hash and compare equal
        return 1
    raise ValueError(
        f"binary labels are not 0/1 ({sorted(map(str, values))[:5]}); "
        "pass positive_class (the model spec's positive class)"
    )
