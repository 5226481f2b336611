"""Regression: predicted values judged by RMSE, MAE and R2; no classes, no threshold."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightgbm
import numpy as np
import pandas as pd
from scipy import stats
from sklearn.linear_model import Ridge
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from mlplatform.tasks.base import SCOPE, ModelOutput, ResampledIntervals, check_aligned
from mlplatform.tasks.plots import plot_predicted_vs_actual, plot_residuals
from mlplatform.tasks.rules import LOOKUP_KINDS, as_numbers, value_lookup
from mlplatform.tasks.slices import slice_table

REGRESSION_METRICS = ("rmse", "mae", "r2")
"""The metrics :func:`regression_metrics` returns, in report order."""

REGRESSION_SLICE_COLUMNS = (
    "feature",
    "slice",
    "count",
    "target_mean",
    "mae",
    "rmse",
    "relative_mae",
    "small",
)


def rmse(values: np.ndarray, predicted: np.ndarray) -> float:
    """Root mean squared error of predicted values."""
    return float(math.sqrt(mean_squared_error(values, predicted)))


def mae(values: np.ndarray, predicted: np.ndarray) -> float:
    """Mean absolute error of predicted values."""
    return float(mean_absolute_error(values, predicted))


def regression_metrics(values: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """RMSE, MAE and R2 (NaN when the true values are constant) of predicted values."""
    y, p = np.asarray(values, dtype=float), np.asarray(predicted, dtype=float)
    return {
        "rmse": rmse(y, p),
        "mae": mae(y, p),
        "r2": float(r2_score(y, p)) if np.ptp(y) > 0 else math.nan,
    }


class RegressionTask(ResampledIntervals):
    """A numeric target: values predicted directly, errors measured in the target's unit."""

    name = "regression"
    metric_names = REGRESSION_METRICS
    selection_metric = "rmse"
    # R2 is scale-free, so one floor (better than predicting the mean) suits any target.
    gate_metric = "r2"
    gate_floor = 0.0
    fairness_metric = "relative_mae"
    slice_columns = REGRESSION_SLICE_COLUMNS
    permutation_scoring = "r2"
    lightgbm_metric = "rmse"
    linear_algorithm = "sklearn_ridge"
    has_classes = False
    target_kind = "value"
    leakage_measure = "fit"
    target_summary_name = "target"

    def classes_of(self, target: pd.Series) -> tuple[Any, ...]:
        """None: values have no classes."""
        return ()

    def encode_target(self, target: pd.Series, classes: Sequence[Any]) -> np.ndarray:
        """The values as floats (NaN where not a number)."""
        return pd.to_numeric(target, errors="coerce").astype(float).to_numpy()

    def target_balance(self, labels: np.ndarray, classes: Sequence[Any]) -> dict[str, float]:
        """The values' mean and standard deviation."""
        return {"mean": float(labels.mean()), "std": float(labels.std())}

    def target_summary(self, labels: np.ndarray, classes: Sequence[Any]) -> dict[str, float]:
        """The values' mean, standard deviation, minimum and maximum."""
        extremes = {"min": float(np.min(labels)), "max": float(np.max(labels))}
        return self.target_balance(labels, classes) | extremes

    def describe(
        self, target: str, classes: Sequence[Any], threshold: float | None
    ) -> tuple[str, str]:
        """The target predicted."""
        return (
            f"regression of '{target}'",
            f"Predicts the value of '{target}' for records shaped like the training data. {SCOPE}",
        )

    def lightgbm_estimator(self, params: Mapping[str, Any]) -> Any:
        """An unfitted ``LGBMRegressor``."""
        return lightgbm.LGBMRegressor(**params)

    def linear_estimator(self, regularization: float, seed: int) -> Any:
        """Ridge regression with ``alpha = regularization``."""
        return Ridge(alpha=regularization)

    def tuning_score(
        self, labels: np.ndarray, estimator: Any, matrix: Any, iteration: int
    ) -> float:
        """RMSE of the predicted values."""
        return rmse(labels, estimator.predict(matrix, num_iteration=iteration))

    def model_scores(self, pipeline: Any, frame: pd.DataFrame, n_classes: int) -> np.ndarray:
        """The predicted values."""
        return np.asarray(pipeline.predict(frame), dtype=float)

    def booster_scores(self, raw: np.ndarray, estimator: Any, n_classes: int) -> np.ndarray:
        """The booster's output is the predicted value."""
        return np.asarray(raw, dtype=float)

    def output(
        self, scores: np.ndarray, classes: Sequence[Any], threshold: float | None
    ) -> ModelOutput:
        """``prediction``: the predicted value."""
        return ModelOutput({"prediction": np.asarray(scores)})

    def response_fields(self, result: ModelOutput, classes: Sequence[Any]) -> dict[str, Any]:
        """No probabilities (``None``)."""
        return {"predictions": result["prediction"].tolist(), "probabilities": None}

    def metrics(
        self, labels: np.ndarray, scores: np.ndarray, threshold: float | None = None
    ) -> dict[str, float]:
        """See :func:`regression_metrics` (no threshold)."""
        return regression_metrics(labels, scores)

    def resampled_metrics(
        self, labels: np.ndarray, scores: np.ndarray, indices: np.ndarray
    ) -> dict[str, np.ndarray]:
        """RMSE, MAE and R2 of every resample at once (R2 NaN where the values are constant)."""
        y, s = np.asarray(labels), np.asarray(scores, dtype=float)
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
        """Count, mean target, MAE, RMSE and the MAE relative to the overall MAE per slice."""
        check_aligned(frame, labels, scores)
        y, s = np.asarray(labels), np.asarray(scores, dtype=float)
        overall_mae = float(np.abs(s - y).mean())

        def measure(feature: str, value: str, mask: np.ndarray) -> dict[str, Any]:
            errors = s[mask] - y[mask]
            slice_mae = float(np.abs(errors).mean())
            return {
                "feature": feature,
                "slice": value,
                "count": int(mask.sum()),
                "target_mean": float(y[mask].mean()),
                "mae": slice_mae,
                "rmse": float(np.sqrt((errors**2).mean())),
                "relative_mae": slice_mae / overall_mae if overall_mae > 0 else math.nan,
            }

        columns = self.slice_columns[:-1]  # slice_table adds "small"
        return slice_table(frame, categorical, numeric_bins, measure, columns, min_rows)

    def score_plots(
        self,
        labels: np.ndarray,
        curves: Mapping[str, np.ndarray],
        threshold: float | None,
        class_names: Sequence[str],
    ) -> dict[str, bytes]:
        """Predicted against actual values, and the residuals."""
        return {
            "predicted_vs_actual": plot_predicted_vs_actual(labels, curves),
            "residuals": plot_residuals(labels, curves),
        }

    def scoring_targets(self, labels: np.ndarray) -> np.ndarray:
        """Values as floats."""
        return np.asarray(labels, dtype=float)

    def live_metrics(self, frame: pd.DataFrame, positive_class: Any = None) -> dict[str, float]:
        """``mae`` and ``rmse`` of the served predictions.

        Raises:
            ValueError: if a label or prediction is not a number.

        """
        try:
            predicted = frame["prediction"].to_numpy(dtype=object).astype(float)
            values = frame["label"].to_numpy(dtype=object).astype(float)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"regression labels and predictions must be numbers: {error}"
            ) from None
        return {"mae": mae(values, predicted), "rmse": rmse(values, predicted)}

    def rule_fit(
        self,
        kind: str,
        train: tuple[pd.Series, np.ndarray],
        other: tuple[pd.Series, np.ndarray],
    ) -> float:
        """R2 of each value's mean (categorical, boolean), or |Spearman| (ordered features).

        Any monotone recoding of the target leaks, so ordered features have nothing to learn:
        their absolute rank correlation on each split counts (0 with under three known values
        or no spread).
        """
        if kind not in LOOKUP_KINDS:
            correlations = []
            for x, y in (train, other):
                values = as_numbers(x)
                known = ~np.isnan(values)
                if known.sum() < 3 or np.ptp(values[known]) == 0 or np.ptp(y[known]) == 0:
                    return 0.0
                correlations.append(abs(float(stats.spearmanr(values[known], y[known]).statistic)))
            return min(correlations)
        x_train, y_train = train
        guess = value_lookup(x_train, y_train, "mean", float(np.mean(y_train)))
        return min(
            float(r2_score(y, guess(x))) if np.ptp(y) > 0 else 0.0 for x, y in (train, other)
        )

    def binary_views(self, labels: np.ndarray) -> list[np.ndarray]:
        """Values above the median against the rest."""
        return [(labels > np.median(labels)).astype(int)]
