"""What binary and multiclass classification share: class labels, classifiers, class shares."""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any

import lightgbm
import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score
from sklearn.tree import DecisionTreeClassifier

from mlplatform.tasks.base import TaskStrategy
from mlplatform.tasks.metrics import as_labels
from mlplatform.tasks.plots import plot_confusion_matrix
from mlplatform.tasks.rules import LOOKUP_KINDS, as_numbers, value_lookup


def in_class_order(probability: np.ndarray, estimator: Any, n_classes: int) -> np.ndarray:
    """Probability columns reordered from the estimator's ``classes_`` to class 0, 1, ..."""
    encoded = list(estimator.classes_)
    return probability[:, [encoded.index(i) for i in range(n_classes)]]


def label_codes(labels: np.ndarray, predictions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels and predictions as codes of one shared vocabulary, values compared as given.

    Equal values share a code (``1 == 1.0``), others do not (``"1" != 1``), so metrics on the
    codes are metrics on the labels as posted, whatever their types.
    """
    vocabulary: dict[Any, int] = {}
    codes = [
        [vocabulary.setdefault(value, len(vocabulary)) for value in values]
        for values in (labels, predictions)
    ]
    return np.asarray(codes[0], dtype=int), np.asarray(codes[1], dtype=int)


class ClassificationTask(TaskStrategy):
    """A target of class labels: classifiers, stratified splits, class shares, accuracy."""

    linear_algorithm = "sklearn_logistic"
    has_classes = True
    target_kind = "class"
    leakage_measure = "accuracy"
    target_summary_name = "class_balance"

    @abc.abstractmethod
    def predicted_classes(self, scores: np.ndarray, threshold: float | None) -> np.ndarray:
        """Predicted class indices of the scores (binary: at the threshold)."""

    def class_shares(self, labels: np.ndarray, classes: Sequence[Any]) -> dict[str, float]:
        """Each class's share of the labels (class indices), by class label."""
        shares = np.bincount(labels, minlength=len(classes)) / max(len(labels), 1)
        return {str(label): float(share) for label, share in zip(classes, shares, strict=True)}

    def target_balance(self, labels: np.ndarray, classes: Sequence[Any]) -> dict[str, float]:
        """Class shares of one split, rounded to four digits."""
        return {
            label: round(share, 4) for label, share in self.class_shares(labels, classes).items()
        }

    def target_summary(self, labels: np.ndarray, classes: Sequence[Any]) -> dict[str, float]:
        """Class shares of the training labels."""
        return self.class_shares(labels, classes)

    def lightgbm_estimator(self, params: Mapping[str, Any]) -> Any:
        """An unfitted ``LGBMClassifier``."""
        return lightgbm.LGBMClassifier(**params)

    def linear_estimator(self, regularization: float, seed: int) -> Any:
        """Logistic regression (multinomial for several classes) with ``C = 1 / regularization``."""
        return LogisticRegression(C=1.0 / regularization, max_iter=2000, random_state=seed)

    def class_probabilities(self, pipeline: Any, frame: pd.DataFrame, n_classes: int) -> np.ndarray:
        """Probability of each class (columns in the order of the spec's classes) per row."""
        return in_class_order(pipeline.predict_proba(frame), pipeline[-1], n_classes)

    def score_plots(
        self,
        labels: np.ndarray,
        curves: Mapping[str, np.ndarray],
        threshold: float | None,
        class_names: Sequence[str],
    ) -> dict[str, bytes]:
        """The confusion matrix of the first model (the challenger) at ``threshold``."""
        predicted = self.predicted_classes(next(iter(curves.values())), threshold)
        return {"confusion_matrix": plot_confusion_matrix(labels, predicted, class_names)}

    def scoring_targets(self, labels: np.ndarray) -> np.ndarray:
        """Class indices as a flat integer array."""
        return as_labels(labels)

    def live_metrics(self, frame: pd.DataFrame, positive_class: Any = None) -> dict[str, float]:
        """``accuracy`` of the served predictions against the labels as posted."""
        labels = frame["label"].to_numpy(dtype=object)
        predictions = frame["prediction"].to_numpy(dtype=object)
        return {"accuracy": float(accuracy_score(*label_codes(labels, predictions)))}

    def rule_fit(
        self,
        kind: str,
        train: tuple[pd.Series, np.ndarray],
        other: tuple[pd.Series, np.ndarray],
    ) -> float:
        """Accuracy of the majority class of each value (categorical, boolean) or of a small tree.

        The tree (numeric features: a few thresholds) has two leaves per class; the rule is
        learned once on ``train`` and scored on both splits.
        """
        x_train, y_train = train
        if kind in LOOKUP_KINDS:
            majority = np.bincount(y_train).argmax()
            guess = value_lookup(x_train, y_train, _most_common, majority)
        else:
            tree = DecisionTreeClassifier(
                max_leaf_nodes=2 * max(len(np.unique(y_train)), 2), random_state=0
            ).fit(as_numbers(x_train)[:, None], y_train)

            def guess(x: pd.Series) -> np.ndarray:
                return tree.predict(as_numbers(x)[:, None])

        return min(float(np.mean(guess(x) == y)) for x, y in (train, other))


def _most_common(group: pd.Series) -> Any:
    return group.value_counts().index[0]
