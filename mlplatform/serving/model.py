"""Loading a registered model for serving, pinned to one version, with its lineage card."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient

from mlplatform.model.fast_path import TreeRecordsPredictor
from mlplatform.model.pyfunc import TabularModel
from mlplatform.model.registry import MODEL_CARD_ARTIFACT, resolve_model_version
from mlplatform.model.spec import FeatureSpec
from mlplatform.tasks.base import ModelOutput


@dataclasses.dataclass(frozen=True)
class ModelCard:
    """What ``GET /model`` reports: identity, lineage, quality and the input contract."""

    model_name: str
    model_version: str
    model_uri: str
    mlflow_run_id: str | None
    dagster_run_id: str | None
    data_version: str | None
    metrics: dict[str, float]
    features: dict[str, str]
    task: str
    classes: list[Any]
    threshold: float | None
    example_record: dict[str, Any]
    loaded_at: float


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """A loaded model version and its card."""

    name: str
    version: str
    model: TabularModel
    card: ModelCard
    card_markdown: str | None = None
    fast_path: TreeRecordsPredictor | None = None

    @property
    def spec(self) -> FeatureSpec:
        """The model's input contract."""
        return self.model.spec

    def response_fields(self, result: ModelOutput) -> dict[str, Any]:
        """``predictions`` and ``probabilities`` of a predict result, as the endpoint returns them.

        Binary: the positive-class probability per record; multiclass: ``{class: probability}``
        per record; regression: no probabilities (``None``).
        """
        return self.spec.strategy.response_fields(result, self.spec.classes)

    def predict(self, records: Sequence[Mapping[str, Any]]) -> ModelOutput:
        """Predictions (and probabilities for classifiers) for validated records, row for row.

        Tree models take the fast path
        (:class:`~mlplatform.model.fast_path.TreeRecordsPredictor`, the same scores without pandas);
        others go through the model's pipeline.
        """
        if self.fast_path is not None:
            return self.model.output(self.fast_path.scores(records))
        frame = pd.DataFrame.from_records(records, columns=list(self.spec.features))
        return self.model.output(self.model.scores(frame))


def load_served_model(model_uri: str, tracking_uri: str | None = None) -> ServedModel:
    """Load a registered model version and assemble its card from the MLflow registry.

    Args:
        model_uri: ``models:/<name>/<version>`` or ``models:/<name>@<alias>`` (pinned at load).
        tracking_uri: the MLflow tracking/registry URI; ``None`` uses MLflow's configured one.

    Returns:
        The model ready to predict.

    Raises:
        TypeError: if the registered model is not an mlplatform tabular model.

    """
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    client = MlflowClient()
    name, version = resolve_model_version(model_uri, client)
    pinned_uri = f"models:/{name}/{version}"
    python_model = mlflow.pyfunc.load_model(pinned_uri).unwrap_python_model()
    if not isinstance(python_model, TabularModel):
        raise TypeError(
            f"{pinned_uri} is a {type(python_model).__name__}, not an mlplatform TabularModel"
        )
    model_version = client.get_model_version(name, version)
    metrics = client.get_run(model_version.run_id).data.metrics if model_version.run_id else {}
    spec = python_model.spec
    card = ModelCard(
        model_name=name,
        model_version=str(version),
        model_uri=pinned_uri,
        mlflow_run_id=model_version.run_id,
        dagster_run_id=model_version.tags.get("dagster_run_id"),
        data_version=model_version.tags.get("data_version"),
        metrics=dict(sorted(metrics.items())),
        features=dict(spec.features),
        task=spec.task,
        classes=list(spec.classes),
        threshold=python_model.threshold,
        example_record=python_model.example_record,
        loaded_at=time.time(),
    )
    return ServedModel(
        name=name,
        version=str(version),
        model=python_model,
        card=card,
        card_markdown=_model_card_markdown(client, model_version.run_id),
        fast_path=TreeRecordsPredictor.from_pipeline(python_model.pipeline, spec),
    )


def _model_card_markdown(client: MlflowClient, run_id: str | None) -> str | None:
    """The model card the evaluation logged to the model's run, if it was evaluated."""
    if not run_id:
        return None
    try:
        path = client.download_artifacts(run_id, MODEL_CARD_ARTIFACT)
    except (mlflow.exceptions.MlflowException, OSError):
        return None
    with open(path, encoding="utf-8") as handle:
        return handle.read()
