"""What every learning task answers: the :class:`TaskStrategy` interface and what tasks share.

A task (binary classification, multiclass classification, regression) decides how a target is
encoded, which estimators fit it, what the model outputs, which metrics judge it, how it is
sliced and plotted, and what a model card says about it. Each task is one strategy class; the
rest of the platform asks the strategy (``spec.strategy`` or
:func:`mlplatform.tasks.strategies.strategy_for`) instead of branching on the task's name.
Nothing here imports Dagster, MLflow, Ray or the layers above ``tasks``.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd

from mlplatform.tasks.metrics import (
    LOWER_IS_BETTER,
    Interval,
    bootstrap_indices,
    check_bootstrap_arguments,
    percentile_interval,
)
from mlplatform.tasks.plots import plot_feature_importance

Task = Literal["binary", "multiclass", "regression"]

SCOPE = "Not for populations or periods the training data does not cover."
"""The model card's limit of every model's intended use."""


class DataError(ValueError):
    """Raised when a dataset cannot be used for training, with a message saying why."""


def plain(value: Any) -> Any:
    """Numpy scalars -> Python scalars, so specs serialise to JSON cleanly."""
    return value.item() if isinstance(value, np.generic) else value


def check_aligned(frame: pd.DataFrame, labels: np.ndarray, scores: np.ndarray) -> None:
    """Raise ``ValueError`` unless the frame, the labels and the scores have the same length."""
    if not len(frame) == len(labels) == len(scores):
        raise ValueError(
            f"frame ({len(frame)}), labels ({len(labels)}) and scores ({len(scores)}) "
            "must have the same length"
        )


@dataclasses.dataclass(frozen=True)
class ModelOutput:
    """A model's output for some records, column by column, row for row.

    ``prediction``, and for classifiers the probabilities behind it (see
    :meth:`TaskStrategy.output`). Columns of plain arrays, not a pandas frame: building a frame
    costs more than scoring a few records with a tree model, and the endpoint answers from the
    columns alone; the traffic recorder stacks many outputs into one frame, in its own process.
    """

    columns: dict[str, np.ndarray]

    @classmethod
    def of_frame(cls, frame: pd.DataFrame) -> ModelOutput:
        """The output a pyfunc model's ``predict`` returned as a frame."""
        return cls({str(name): frame[name].to_numpy() for name in frame.columns})

    @property
    def names(self) -> list[str]:
        """The column names, ``prediction`` first."""
        return list(self.columns)

    def __len__(self) -> int:
        return len(self.columns["prediction"])

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def rows(self, start: int, stop: int) -> ModelOutput:
        """The output of records ``start`` to ``stop`` (excluded)."""
        return ModelOutput({name: column[start:stop] for name, column in self.columns.items()})

    def frame(self, index: pd.Index | None = None) -> pd.DataFrame:
        """The output as a frame (what the MLflow pyfunc model returns)."""
        return pd.DataFrame(self.columns, index=index)


class TaskStrategy(abc.ABC):
    """Everything that differs between learning tasks, for one task.

    ``scores`` are what :meth:`model_scores` returns: the positive-class probability (binary),
    the class probability matrix (multiclass) or the predicted values (regression). ``labels``
    are targets as :meth:`encode_target` returns them. ``classes`` are the spec's class labels
    (binary: negative then positive; multiclass: sorted; regression: none).

    Attributes:
        name: the task's name, as specs and reports carry it.
        metric_names: the metrics :meth:`metrics` returns, in report order.
        selection_metric: the validation metric that picks between candidate algorithms; also
            what the hyperparameter search optimises.
        gate_metric: the test metric the promotion gate compares by default.
        gate_floor: the gate metric's default absolute floor (a ceiling for losses).
        fairness_metric: the slice column whose spread between slices is the fairness gap
            (scale-free for every task, so one bound fits any data).
        slice_columns: the columns of :meth:`slices`, in order.
        permutation_scoring: scikit-learn's scorer for permutation importance.
        lightgbm_metric: LightGBM's name of the selection metric (it decides early stopping).
        linear_algorithm: the linear baseline's name in the registry tags.
        has_classes: whether the target is class labels: random splits are stratified by it and
            the data checks count rows per class.
        target_kind: what one distinct target value is called in messages.
        leakage_measure: what :meth:`rule_fit` measures, in messages.
        target_summary_name: the model card's name of :meth:`target_summary`.

    """

    name: ClassVar[Task]
    metric_names: ClassVar[tuple[str, ...]]
    selection_metric: ClassVar[str]
    gate_metric: ClassVar[str]
    gate_floor: ClassVar[float]
    fairness_metric: ClassVar[str]
    slice_columns: ClassVar[tuple[str, ...]]
    permutation_scoring: ClassVar[str]
    lightgbm_metric: ClassVar[str]
    linear_algorithm: ClassVar[str]
    has_classes: ClassVar[bool]
    target_kind: ClassVar[str]
    leakage_measure: ClassVar[str]
    target_summary_name: ClassVar[str]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def positive_class(self, classes: Sequence[Any]) -> Any:
        """The class a score is the probability of; ``None`` when scores are not one class's."""
        return None

    @property
    def lower_is_better(self) -> frozenset[str]:
        """The task's metrics where smaller is better (losses and errors)."""
        return LOWER_IS_BETTER & frozenset(self.metric_names)

    @abc.abstractmethod
    def classes_of(self, target: pd.Series) -> tuple[Any, ...]:
        """The class labels of a target the task suits (see :attr:`FeatureSpec.classes`)."""

    @abc.abstractmethod
    def encode_target(self, target: pd.Series, classes: Sequence[Any]) -> np.ndarray:
        """Target labels -> what the model learns.

        Raises:
            DataError: if a label is not one of ``classes``.

        """

    def absent_classes(self, labels: np.ndarray, classes: Sequence[Any]) -> list[Any]:
        """The classes with no row among ``labels`` (class indices): metrics leave them out."""
        present = set(np.unique(np.asarray(labels).astype(int)).tolist())
        return [label for index, label in enumerate(classes) if index not in present]

    @abc.abstractmethod
    def target_balance(self, labels: np.ndarray, classes: Sequence[Any]) -> dict[str, float]:
        """How one split's labels are spread (class shares, or the values' mean and spread)."""

    @abc.abstractmethod
    def target_summary(self, labels: np.ndarray, classes: Sequence[Any]) -> dict[str, float]:
        """The training labels as the model card shows them."""

    @abc.abstractmethod
    def describe(
        self, target: str, classes: Sequence[Any], threshold: float | None
    ) -> tuple[str, str]:
        """``(task, intended use)`` sentences for the model card."""

    @abc.abstractmethod
    def lightgbm_estimator(self, params: Mapping[str, Any]) -> Any:
        """An unfitted LightGBM estimator for the task with these keyword arguments."""

    @abc.abstractmethod
    def linear_estimator(self, regularization: float, seed: int) -> Any:
        """The unfitted linear baseline with this L2 strength."""

    def check_tuning_labels(self, labels: np.ndarray, split: str) -> None:
        """Raise ``ValueError`` if a split's labels cannot score the search's metric."""
        if len(np.unique(labels)) < 2:
            raise ValueError(f"{split} labels must hold at least two distinct values")

    @abc.abstractmethod
    def tuning_score(
        self, labels: np.ndarray, estimator: Any, matrix: Any, iteration: int
    ) -> float:
        """The selection metric of a fitted LightGBM estimator at a boosting iteration."""

    def choose_threshold(self, labels: np.ndarray, scores: np.ndarray) -> float | None:
        """The decision threshold learned on the validation split (none by default)."""
        return None

    def model_threshold(self, threshold: float | None) -> float | None:
        """The decision threshold a model of this task carries (none by default)."""
        return None

    @abc.abstractmethod
    def model_scores(self, pipeline: Any, frame: pd.DataFrame, n_classes: int) -> np.ndarray:
        """The scores of a fitted scikit-learn pipeline for raw records."""

    @abc.abstractmethod
    def booster_scores(self, raw: np.ndarray, estimator: Any, n_classes: int) -> np.ndarray:
        """The scores from a LightGBM booster's raw ``predict`` output (the serving fast path)."""

    @abc.abstractmethod
    def output(
        self, scores: np.ndarray, classes: Sequence[Any], threshold: float | None
    ) -> ModelOutput:
        """The model's output for scores: ``prediction`` and the probabilities behind it."""

    @abc.abstractmethod
    def response_fields(self, result: ModelOutput, classes: Sequence[Any]) -> dict[str, Any]:
        """``predictions`` and ``probabilities`` of a model's output, as the endpoint answers."""

    @abc.abstractmethod
    def metrics(
        self, labels: np.ndarray, scores: np.ndarray, threshold: float | None = None
    ) -> dict[str, float]:
        """The task's :attr:`metric_names` of ``scores`` against ``labels``."""

    @abc.abstractmethod
    def bootstrap(
        self,
        labels: np.ndarray,
        scores: np.ndarray,
        threshold: float | None = None,
        n_resamples: int = 400,
        confidence: float = 0.95,
        seed: int = 0,
    ) -> dict[str, Interval]:
        """Percentile bootstrap intervals of every metric; ``point`` is the metric on all rows.

        Raises:
            ValueError: on an empty split or invalid ``n_resamples`` or ``confidence``.

        """

    @abc.abstractmethod
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
        """Paired bootstrap of challenger - champion, both scored on the same resamples.

        Raises:
            ValueError: on an empty split, mismatched lengths or invalid arguments.

        """

    @abc.abstractmethod
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
        """Per-slice metrics, one row per (feature, slice), with :attr:`slice_columns`.

        Slices under ``min_rows`` rows (binary: also under ``min_positives`` positive rows)
        are flagged ``small``.

        Raises:
            ValueError: if lengths differ or a column is not in ``frame``.

        """

    @abc.abstractmethod
    def score_plots(
        self,
        labels: np.ndarray,
        curves: Mapping[str, np.ndarray],
        threshold: float | None,
        class_names: Sequence[str],
    ) -> dict[str, bytes]:
        """The task's figures of the models' scores, as PNG bytes by name (see :meth:`plots`)."""

    def plots(
        self,
        labels: np.ndarray,
        curves: Mapping[str, np.ndarray],
        threshold: float | None,
        class_names: Sequence[str],
        importance: pd.Series,
    ) -> dict[str, bytes]:
        """The report's figures, as PNG bytes by name.

        Args:
            labels: true labels (class indices) or values.
            curves: model name -> its scores on the same rows, the challenger first (the
                confusion matrix is the challenger's, at ``threshold``).
            threshold: the challenger's decision threshold (binary only).
            class_names: display names of the classes (classification only).
            importance: the challenger's feature importance.

        Returns:
            Binary: ROC, precision-recall, calibration, confusion matrix; multiclass: confusion
            matrix; regression: predicted vs actual and residuals. All: feature importance.

        """
        figures = self.score_plots(labels, curves, threshold, class_names)
        return figures | {"feature_importance": plot_feature_importance(importance)}

    @abc.abstractmethod
    def scoring_targets(self, labels: np.ndarray) -> np.ndarray:
        """Labels as scikit-learn's :attr:`permutation_scoring` scorer takes them."""

    @abc.abstractmethod
    def live_metrics(self, frame: pd.DataFrame, positive_class: Any = None) -> dict[str, float]:
        """Metrics of served predictions against posted labels (one row per labelled record).

        Args:
            frame: columns ``prediction`` and ``label`` as given (``1 == 1.0``, ``"1" != 1``)
                and ``score`` (the positive-class probability; binary only).
            positive_class: the class ``score`` is the probability of (binary only).

        Raises:
            ValueError: if the labels cannot be scored (see the task).

        """

    @abc.abstractmethod
    def rule_fit(
        self,
        kind: str,
        train: tuple[pd.Series, np.ndarray],
        other: tuple[pd.Series, np.ndarray],
    ) -> float:
        """How exactly the simplest rule on one feature, learned on ``train``, gives the target.

        Args:
            kind: the feature's kind (``categorical``, ``boolean``, ``numeric``, ``datetime``;
                datetimes as seconds).
            train: the feature's coerced values and the labels of the training split.
            other: the same of the split the rule is checked on (the validation split).

        Returns:
            The lower of the rule's score on ``train`` and on ``other``; 1.0 means the feature
            reproduces the target exactly.

        """

    @abc.abstractmethod
    def binary_views(self, labels: np.ndarray) -> list[np.ndarray]:
        """The target as 0/1 arrays a single feature can be ranked against."""


class ResampledIntervals(TaskStrategy):
    """Bootstrap intervals from the task's metrics on each resample (no fast path)."""

    @abc.abstractmethod
    def resampled_metrics(
        self, labels: np.ndarray, scores: np.ndarray, indices: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Each metric on every resample, one row of ``indices`` (row numbers) per resample."""

    def _samples(
        self, labels: np.ndarray, scores: np.ndarray, n_resamples: int, seed: int
    ) -> dict[str, np.ndarray]:
        indices = bootstrap_indices(len(labels), n_resamples, seed)
        return self.resampled_metrics(labels, scores, indices)

    def bootstrap(
        self,
        labels: np.ndarray,
        scores: np.ndarray,
        threshold: float | None = None,
        n_resamples: int = 400,
        confidence: float = 0.95,
        seed: int = 0,
    ) -> dict[str, Interval]:
        """Percentile bootstrap intervals of every metric (see :meth:`TaskStrategy.bootstrap`)."""
        check_bootstrap_arguments(len(labels), n_resamples, confidence)
        point = self.metrics(labels, scores)
        samples = self._samples(labels, scores, n_resamples, seed)
        return {name: percentile_interval(point[name], samples[name], confidence) for name in point}

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
        """Paired bootstrap of challenger - champion (see ``TaskStrategy.paired_difference``)."""
        if not len(labels) == len(challenger_scores) == len(champion_scores):
            raise ValueError(
                f"labels ({len(labels)}), challenger ({len(challenger_scores)}) and champion "
                f"({len(champion_scores)}) scores must have the same length"
            )
        check_bootstrap_arguments(len(labels), n_resamples, confidence)
        first = self.metrics(labels, challenger_scores)
        second = self.metrics(labels, champion_scores)
        first_samples = self._samples(labels, challenger_scores, n_resamples, seed)
        second_samples = self._samples(labels, champion_scores, n_resamples, seed)
        return {
            name: percentile_interval(
                first[name] - second[name], first_samples[name] - second_samples[name], confidence
            )
            for name in first
        }
