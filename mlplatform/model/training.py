"""Training: a tuned LightGBM and a scikit-learn baseline on the same split; the better wins."""

import importlib.metadata
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field
from sklearn.pipeline import Pipeline

from mlplatform.model import tuning
from mlplatform.model.dataset import FeatureSet
from mlplatform.model.pipeline import boolean_value, build_preprocessor, make_model_pipeline
from mlplatform.model.spec import infer_feature_kind
from mlplatform.tasks.metrics import LOWER_IS_BETTER


class TrainingParams(BaseModel):
    """Training knobs: LightGBM's starting point and search budget, the baseline's strength."""

    model_config = ConfigDict(frozen=True)

    seed: int = Field(default=42, description="Random seed for every estimator.")
    n_estimators: int = Field(
        default=600, description="LightGBM boosting rounds (upper bound; early stopping)."
    )
    learning_rate: float = Field(default=0.05, description="LightGBM learning rate.")
    num_leaves: int = Field(default=15, description="LightGBM leaves per tree.")
    min_child_samples: int = Field(default=20, description="LightGBM minimum rows per leaf.")
    early_stopping_rounds: int = Field(
        default=50, description="Stop LightGBM after this many rounds without gain."
    )
    tuning_trials: int = Field(
        default=10, description="Hyperparameter search trials for LightGBM (1 = no search)."
    )
    tuning_timeout_s: float = Field(default=60.0, description="Time budget of the search.")
    linear_regularization: float = Field(
        default=1.0,
        description="L2 strength of the linear baseline (logistic regression: 1/C; ridge: alpha).",
    )
    selection_metric: str = Field(
        default="",
        description="Validation metric that picks the candidate; empty = the task's default "
        "(roc_auc for binary, log_loss for multiclass, rmse for regression).",
    )


def train_lightgbm(
    feature_set: FeatureSet,
    params: TrainingParams,
    on_trial: Callable[[tuning.TrialResult], None] | None = None,
) -> Pipeline:
    """Gradient boosting, tuned on the validation split within a bounded budget.

    The first trial is the configured parameters, so tuning never picks worse on validation; the
    winner is refitted with its early-stopped number of rounds.
    """
    spec = feature_set.spec
    preprocessor = build_preprocessor(spec, for_trees=True)
    coerce = make_model_pipeline(spec, preprocessor, "passthrough")
    train_matrix = coerce.fit_transform(feature_set.inputs("train"))
    valid_matrix = coerce.transform(feature_set.inputs("valid"))
    base_params = {
        "n_estimators": params.n_estimators,
        "learning_rate": params.learning_rate,
        "num_leaves": params.num_leaves,
        "min_child_samples": params.min_child_samples,
        "subsample": 0.8,
        "subsample_freq": 1,
        "colsample_bytree": 0.8,
        "random_state": params.seed,
    }
    budget = tuning.TuningBudget(
        trials=params.tuning_trials, timeout_s=params.tuning_timeout_s, seed=params.seed
    )
    best_params, _ = tuning.tune_lightgbm(
        train_matrix,
        feature_set.labels("train"),
        valid_matrix,
        feature_set.labels("valid"),
        budget,
        base_params,
        early_stopping_rounds=params.early_stopping_rounds,
        on_trial=on_trial,
        task=spec.task,
    )
    # One thread per prediction call: serving predicts small batches, where threads add overhead.
    estimator = spec.strategy.lightgbm_estimator(best_params | {"verbose": -1, "n_jobs": 1})
    estimator.fit(train_matrix, feature_set.labels("train"))
    return make_model_pipeline(spec, preprocessor, estimator)


def train_linear(feature_set: FeatureSet, params: TrainingParams) -> Pipeline:
    """The scikit-learn baseline on scaled, one-hot encoded inputs.

    Logistic regression for classification (multinomial for several classes), ridge regression
    for values.
    """
    spec = feature_set.spec
    estimator = spec.strategy.linear_estimator(params.linear_regularization, params.seed)
    pipeline = make_model_pipeline(spec, build_preprocessor(spec, for_trees=False), estimator)
    return pipeline.fit(feature_set.inputs("train"), feature_set.labels("train"))


def select_best(scores: dict[str, dict[str, float]], metric: str) -> str:
    """The algorithm with the best validation ``metric`` (losses minimised, others maximised)."""
    lower_is_better = metric in LOWER_IS_BETTER
    ranked = sorted(scores, key=lambda name: scores[name][metric], reverse=not lower_is_better)
    return ranked[0]


def code_lineage() -> dict[str, str]:
    """Package version and, when running from a git checkout, its commit."""
    lineage = {"code_version": importlib.metadata.version("mlplatform")}
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        lineage["git_sha"] = sha
    except (OSError, subprocess.SubprocessError):
        pass
    return lineage


def example_record(frame: pd.DataFrame) -> dict[str, Any]:
    """A typical record of the training inputs as JSON-ready values, and no row of them.

    ``GET /model`` shows it and the deployment's smoke test posts it, so it must reveal no one's
    data: each column gets its own typical value (see :func:`_typical_value`), never the values
    of one row together.
    """
    return {name: _typical_value(str(name), frame[name]) for name in frame.columns}


def _typical_value(name: str, column: pd.Series) -> Any:
    """A column's typical value as a client would send it.

    The median for numbers (3 significant digits; a whole number for an integer column) and for
    dates (the day, ISO 8601), the most common value for flags (a boolean) and categories (a
    string). ``None`` (a missing value, which the model imputes) when the column is empty or no
    category occurs twice, since a value seen once would single out its row.
    """
    values = column.dropna()
    if values.empty:
        return None
    kind, _ = infer_feature_kind(name, column)  # as the spec reads the column
    if pd.api.types.is_bool_dtype(values) or kind == "boolean":
        return bool(boolean_value(values.value_counts().index[0]))
    if pd.api.types.is_numeric_dtype(values):
        median = float(values.astype(float).median())
        if pd.api.types.is_integer_dtype(values):
            return round(median)
        return float(f"{median:.3g}")
    if pd.api.types.is_datetime64_any_dtype(values) or kind == "datetime":
        stamps = pd.to_datetime(values, errors="coerce", utc=True, format="mixed").dropna()
        return None if stamps.empty else stamps.median().strftime("%Y-%m-%d")
    counts = values.astype(str).value_counts()
    return str(counts.index[0]) if counts.iloc[0] >= 2 else None
