"""Training: LightGBM and a scikit-learn baseline; the better one is registered as challenger."""

import dataclasses
import importlib.metadata
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
import mlflow
import numpy as np
import pandas as pd
from mlflow.models import infer_signature
from pydantic import Field
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import Pipeline

from mlplatform import reporting, tasks, tuning
from mlplatform.defs.features import FeatureSet
from mlplatform.resources import MlflowTracking
from mlplatform.tabular import TabularModel, build_preprocessor, make_model_pipeline

CHALLENGER_ALIAS = "challenger"
CHAMPION_ALIAS = "champion"


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """A registered model version: how assets hand a model to each other (never "latest file")."""

    name: str
    version: str
    mlflow_run_id: str
    algorithm: str

    @property
    def uri(self) -> str:
        """The pinned MLflow model URI."""
        return f"models:/{self.name}/{self.version}"


class TrainingConfig(dg.Config):
    """Training knobs (shown in the Launchpad)."""

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
    config: TrainingConfig,
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
        "n_estimators": config.n_estimators,
        "learning_rate": config.learning_rate,
        "num_leaves": config.num_leaves,
        "min_child_samples": config.min_child_samples,
        "subsample": 0.8,
        "subsample_freq": 1,
        "colsample_bytree": 0.8,
        "random_state": config.seed,
    }
    budget = tuning.TuningBudget(
        trials=config.tuning_trials, timeout_s=config.tuning_timeout_s, seed=config.seed
    )
    task = spec.task
    best_params, _ = tuning.tune_lightgbm(
        train_matrix,
        feature_set.labels("train"),
        valid_matrix,
        feature_set.labels("valid"),
        budget,
        base_params,
        early_stopping_rounds=config.early_stopping_rounds,
        on_trial=on_trial,
        task=task,
    )
    # One thread per prediction call: serving predicts small batches, where threads add overhead.
    estimator = tuning.lightgbm_estimator(task, best_params | {"verbose": -1, "n_jobs": 1})
    estimator.fit(train_matrix, feature_set.labels("train"))
    return make_model_pipeline(spec, preprocessor, estimator)


def train_linear(feature_set: FeatureSet, config: TrainingConfig) -> Pipeline:
    """The scikit-learn baseline on scaled, one-hot encoded inputs.

    Logistic regression for classification (multinomial for several classes), ridge regression
    for values.
    """
    spec = feature_set.spec
    if spec.is_classification:
        estimator: Any = LogisticRegression(
            C=1.0 / config.linear_regularization, max_iter=2000, random_state=config.seed
        )
    else:
        estimator = Ridge(alpha=config.linear_regularization)
    pipeline = make_model_pipeline(spec, build_preprocessor(spec, for_trees=False), estimator)
    return pipeline.fit(feature_set.inputs("train"), feature_set.labels("train"))


def linear_algorithm_name(feature_set: FeatureSet) -> str:
    """The baseline's name in the registry tags: sklearn_logistic or sklearn_ridge."""
    return "sklearn_logistic" if feature_set.spec.is_classification else "sklearn_ridge"


def select_best(scores: dict[str, dict[str, float]], metric: str) -> str:
    """The algorithm with the best validation ``metric`` (losses minimised, others maximised)."""
    lower_is_better = metric in reporting.LOWER_IS_BETTER
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


def _example_record(frame: pd.DataFrame) -> dict[str, Any]:
    """One training row as JSON-ready values (what a client would send)."""
    row = frame.iloc[0]
    return {
        name: (None if pd.isna(value) else value.item() if isinstance(value, np.generic) else value)
        for name, value in row.items()
    }


@dg.asset(
    group_name="training",
    kinds={"lightgbm", "sklearn", "mlflow"},
    owners=["team:ml-platform"],
    code_version="1",
)
def candidate_model(
    context: dg.AssetExecutionContext,
    config: TrainingConfig,
    features: FeatureSet,
    mlflow_tracking: MlflowTracking,
) -> dg.Output[ModelRef]:
    """The better of LightGBM and a scikit-learn baseline on validation, alias `challenger`."""
    spec = features.spec
    trial_metric = f"valid_{tuning.OBJECTIVES[spec.task].metric}"

    def log_trial(trial: tuning.TrialResult) -> None:
        """Each tuning trial is a nested MLflow run under this Dagster run's MLflow run."""
        with mlflow.start_run(run_name=f"lightgbm-trial-{trial.number}", nested=True):
            mlflow.log_params(trial.params)
            mlflow.log_metrics(
                {trial_metric: trial.valid_score, "best_iteration": trial.best_iteration}
            )

    pipelines = {
        "lightgbm": train_lightgbm(features, config, on_trial=log_trial),
        linear_algorithm_name(features): train_linear(features, config),
    }
    labels = features.labels("valid")
    scores: dict[str, dict[str, float]] = {}
    models: dict[str, TabularModel] = {}
    for algorithm, pipeline in pipelines.items():
        model = TabularModel(
            pipeline, spec, example_record=_example_record(features.inputs("train"))
        )
        valid_scores = model.scores(features.inputs("valid"))
        if spec.task == "binary":
            model.threshold = reporting.choose_threshold(labels, valid_scores)
        scores[algorithm] = tasks.task_metrics(spec.task, labels, valid_scores, model.threshold)
        if model.threshold is not None:
            scores[algorithm]["threshold"] = model.threshold
        models[algorithm] = model
        context.log.info(f"{algorithm}: validation {scores[algorithm]}")
    best = select_best(
        scores, config.selection_metric or tasks.PROFILES[spec.task].selection_metric
    )
    model = models[best]
    # The signature keeps the data's own dtypes: integer columns without gaps stay integers, as
    # clients send them; the pipeline's FrameCoercer converts to training dtypes either way.
    sample = features.inputs("train").head(20)
    lineage = {
        "dagster_run_id": context.run_id,
        "data_version": features.data_version,
        **code_lineage(),
    }
    mlflow.log_params(
        {
            "algorithm": best,
            "task": spec.task,
            "features": len(spec.features),
            "train_rows": len(features.train),
            **config.model_dump(),
        }
    )
    mlflow.log_metrics(
        {
            f"valid_{metric}_{algorithm}": value
            for algorithm, s in scores.items()
            for metric, value in s.items()
        }
        | {f"valid_{metric}": value for metric, value in scores[best].items()}
    )
    mlflow.set_tags(lineage)
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=model,
        signature=infer_signature(sample, model.predict_frame(sample)),
        input_example=sample.head(3),
        registered_model_name=mlflow_tracking.registered_model_name,
        pip_requirements=[
            f"{package}=={importlib.metadata.version(package)}"
            for package in ("mlflow", "scikit-learn", "lightgbm", "pandas", "numpy")
        ],
    )
    name, version = mlflow_tracking.registered_model_name, str(info.registered_model_version)
    client = mlflow_tracking.client()
    for key, value in (lineage | {"algorithm": best}).items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, CHALLENGER_ALIAS, version)
    ref = ModelRef(name=name, version=version, mlflow_run_id=mlflow_tracking.run_id, algorithm=best)
    return dg.Output(
        ref,
        metadata={
            "model_name": name,
            "model_version": version,
            "model_uri": ref.uri,
            "mlflow_run_id": ref.mlflow_run_id,
            "algorithm": best,
            **{f"valid_{metric}": round(value, 4) for metric, value in scores[best].items()},
            "candidates": dg.MetadataValue.md(
                pd.DataFrame(scores).T.round(4).rename_axis("algorithm").to_markdown()
            ),
        },
    )
