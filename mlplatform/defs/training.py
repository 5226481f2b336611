"""Training: LightGBM and a scikit-learn baseline; the better one is registered as challenger."""

import importlib.metadata

import dagster as dg
import mlflow
import pandas as pd
from mlflow.models import infer_signature

from mlplatform.model import tuning
from mlplatform.model.dataset import FeatureSet
from mlplatform.model.pyfunc import TabularModel
from mlplatform.model.registry import CHALLENGER_ALIAS, ModelRef
from mlplatform.model.training import (
    TrainingParams,
    code_lineage,
    example_record,
    select_best,
    train_lightgbm,
    train_linear,
)
from mlplatform.resources import MlflowTracking


class TrainingConfig(TrainingParams, dg.Config):
    """Training knobs (shown in the Launchpad)."""


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
    spec, strategy = features.spec, features.spec.strategy
    # The search optimises the task's own selection metric, whatever the config selects by.
    trial_metric = f"valid_{strategy.selection_metric}"

    def log_trial(trial: tuning.TrialResult) -> None:
        """Each tuning trial is a nested MLflow run under this Dagster run's MLflow run."""
        with mlflow.start_run(run_name=f"lightgbm-trial-{trial.number}", nested=True):
            mlflow.log_params(trial.params)
            mlflow.log_metrics(
                {trial_metric: trial.valid_score, "best_iteration": trial.best_iteration}
            )

    pipelines = {
        "lightgbm": train_lightgbm(features, config, on_trial=log_trial),
        strategy.linear_algorithm: train_linear(features, config),
    }
    labels = features.labels("valid")
    scores: dict[str, dict[str, float]] = {}
    models: dict[str, TabularModel] = {}
    for algorithm, pipeline in pipelines.items():
        model = TabularModel(
            pipeline, spec, example_record=example_record(features.inputs("train"))
        )
        valid_scores = model.scores(features.inputs("valid"))
        model.threshold = strategy.choose_threshold(labels, valid_scores)
        scores[algorithm] = strategy.metrics(labels, valid_scores, model.threshold)
        if model.threshold is not None:
            scores[algorithm]["threshold"] = model.threshold
        models[algorithm] = model
        context.log.info(f"{algorithm}: validation {scores[algorithm]}")
    best = select_best(scores, config.selection_metric or strategy.selection_metric)
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
        # MLflow keeps the example beside the model: the typical record, never a training row.
        input_example=pd.DataFrame([model.example_record]),
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
