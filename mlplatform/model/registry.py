"""Registered model versions: how assets name a model, the registry aliases, loading a version."""

import dataclasses
import itertools
import re
import time
from collections.abc import Callable
from typing import TypeVar

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from mlplatform.model.pyfunc import TabularModel

_T = TypeVar("_T")

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


class RegistryUnavailable(RuntimeError):
    """The model registry did not answer (a locked store, a server down): not "no champion"."""


def _is_not_found(error: MlflowException) -> bool:
    """Whether the registry answered that the model or the alias does not exist.

    MLflow reports a missing model as RESOURCE_DOES_NOT_EXIST and a missing alias of an existing
    model as INVALID_PARAMETER_VALUE ("Registered model alias ... not found").
    """
    if error.error_code == "RESOURCE_DOES_NOT_EXIST":
        return True
    message = str(error.message).lower()
    return (
        error.error_code == "INVALID_PARAMETER_VALUE"
        and "alias" in message
        and "not found" in message
    )


def version_by_alias(
    client: MlflowClient, name: str, alias: str, attempts: int = 3, backoff_s: float = 1.0
) -> ModelVersion | None:
    """The version of model ``name`` behind ``alias``; ``None`` only when the registry says none.

    Every other registry error (a SQLite store locked by another writer, a tracking server that
    does not answer) is retried ``attempts`` times, waiting ``backoff_s``, then twice that, and
    so on, then raised: reading it as "no alias" would let the gate compare a challenger against
    nobody and the sensors report "no champion yet" while one serves.

    Raises:
        RegistryUnavailable: the registry did not answer after ``attempts`` tries.

    """
    return _read_registry(
        lambda: client.get_model_version_by_alias(name, alias),
        f"{name}@{alias}",
        attempts,
        backoff_s,
    )


def registered_model_tag(
    client: MlflowClient, name: str, tag: str, attempts: int = 3, backoff_s: float = 1.0
) -> str | None:
    """A tag of registered model ``name``; ``None`` when the model or the tag does not exist.

    Registry errors are retried and raised as in :func:`version_by_alias`.

    Raises:
        RegistryUnavailable: the registry did not answer after ``attempts`` tries.

    """
    model = _read_registry(
        lambda: client.get_registered_model(name), f"{name}'s tags", attempts, backoff_s
    )
    return None if model is None else model.tags.get(tag)


def _read_registry(read: Callable[[], _T], what: str, attempts: int, backoff_s: float) -> _T | None:
    """``read()``, ``None`` when the registry says it does not exist, else retried, then raised."""
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    for attempt in itertools.count(1):
        try:
            return read()
        except MlflowException as error:
            if _is_not_found(error):
                return None
            if attempt == attempts:
                raise RegistryUnavailable(
                    f"the model registry did not answer for {what} after {attempts} "
                    f"tries ({error.error_code}: {_first_line(str(error.message))}); "
                    "nothing was changed"
                ) from error
        time.sleep(backoff_s * 2 ** (attempt - 1))
    raise AssertionError("unreachable")  # itertools.count never ends


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "no message"
