"""Registered model versions: how assets name a model, the registry aliases, loading a version."""

import dataclasses
import re

import mlflow
from mlflow import MlflowClient

from mlplatform.model.pyfunc import TabularModel

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


MODEL_CARD_ARTIFACT = "model_card.md"
"""The model card's path in the MLflow run that produced the model version."""

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")


def load_tabular_model(ref: ModelRef) -> TabularModel:
    """Load a registered version's :class:`TabularModel`."""
    return mlflow.pyfunc.load_model(ref.uri).unwrap_python_model()


def resolve_model_version(model_uri: str, client: MlflowClient) -> tuple[str, str]:
    """Resolve a ``models:/`` URI to ``(name, version)``; aliases are pinned to their version now.

    Raises:
        ValueError: if the URI is not a ``models:/<name>/<version>`` or ``models:/<name>@<alias>``.

    """
    match = _MODELS_URI.match(model_uri)
    if match is None:
        raise ValueError(
            f"expected models:/<name>/<version> or models:/<name>@<alias>, got {model_uri!r}"
        )
    name = match["name"]
    if match["version"]:
        return name, match["version"]
    return name, client.get_model_version_by_alias(name, match["alias"]).version
