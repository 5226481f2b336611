"""Checking that a model version can serve, before it replaces the version that does.

A replica that cannot load its model never becomes ready, and with one replica Ray Serve's
rolling update has already stopped the old one: the endpoint is down. So a version is loaded
here first, in the deploying process, the way a replica loads it
(:func:`~mlplatform.serving.model.load_served_model`), and scores records synthesized from its
feature spec through the endpoint's own request check. A corrupt artifact or a pipeline that
cannot score fails here, with the reason, while the old version keeps serving.
"""

from __future__ import annotations

from typing import Any

from mlplatform.model.spec import FeatureSpec
from mlplatform.serving.model import ServedModel, load_served_model
from mlplatform.serving.validation import check_records

# A value of each kind of feature that any model of that kind accepts.
_TYPICAL = {"numeric": 0.0, "boolean": False, "datetime": "2000-01-01T00:00:00"}


class UnservableModel(RuntimeError):
    """A model version that cannot be loaded or cannot score: it must not be deployed."""


def synthesized_records(spec: FeatureSpec) -> list[dict[str, Any]]:
    """Two records any model of ``spec`` must answer: one of typical values, one all missing.

    The first has a value of each feature's kind (a category seen in training for categorical
    features), the second none at all (the endpoint accepts ``null`` for every feature).
    """
    typical = {
        name: (spec.categories.get(name) or [None])[0]
        if kind == "categorical"
        else _TYPICAL.get(kind)
        for name, kind in spec.features.items()
    }
    return [typical, dict.fromkeys(spec.features)]


def preflight(model_uri: str, tracking_uri: str | None = None) -> ServedModel:
    """Load a model version as a replica would and score synthesized records with it.

    Args:
        model_uri: ``models:/<name>/<version>`` (or an alias, pinned when loaded).
        tracking_uri: the MLflow tracking/registry URI; ``None`` uses MLflow's configured one.

    Returns:
        The loaded model.

    Raises:
        UnservableModel: naming the cause, when the version cannot be loaded, is not an
            mlplatform model, or fails to score the synthesized records.

    """
    try:
        served = load_served_model(model_uri, tracking_uri)
    except Exception as error:  # whatever stops the load stops a replica the same way
        raise UnservableModel(
            f"{model_uri} cannot be loaded: {type(error).__name__}: {error}"
        ) from error
    records = synthesized_records(served.spec)
    try:
        check_records(records, served.spec, len(records))
        answer = served.response_fields(served.predict(records))
    except Exception as error:  # a model that cannot score would answer every request with 500
        raise UnservableModel(
            f"{model_uri} loads but cannot score synthesized records: "
            f"{type(error).__name__}: {error}"
        ) from error
    if len(answer["predictions"]) != len(records):
        raise UnservableModel(
            f"{model_uri} answered {len(answer['predictions'])} predictions for "
            f"{len(records)} records"
        )
    return served
