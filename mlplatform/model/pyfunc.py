"""The registered MLflow model: a fitted pipeline, its spec and decision threshold."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from sklearn.pipeline import Pipeline

from mlplatform.model.spec import FeatureSpec
from mlplatform.tasks.base import ModelOutput


class TabularModel(mlflow.pyfunc.PythonModel):
    """The registered MLflow model: a fitted pipeline plus its spec and decision threshold.

    ``predict`` returns one row per input record with ``prediction`` (a class label, or the
    predicted value for regression) and the probabilities behind it: ``probability`` of the
    positive class for binary models, ``probability_<class>`` per class for multiclass ones. So
    every consumer (the endpoint, evaluation, a user calling ``mlflow.pyfunc.load_model``) gets
    the same answer.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        spec: FeatureSpec,
        threshold: float | None = 0.5,
        example_record: Mapping[str, Any] | None = None,
    ):
        self.pipeline = pipeline
        self.spec = spec
        self.threshold = spec.strategy.model_threshold(threshold)
        self.typical_record = dict(example_record or {})

    @property
    def example_record(self) -> dict[str, Any]:
        """A record to show and try the model with: typical training values, no row of the data.

        Each feature's value given at training (:func:`mlplatform.model.training.example_record`)
        or, without one, a value of its kind (the first known category, 0, false, a fixed date).
        Models registered before typical values were kept stored a training row as
        ``example_record``; it is never shown (this property hides it), their record comes
        from the spec.
        """
        typical = self.__dict__.get("typical_record", {})
        return {
            name: typical[name] if name in typical else _value_of_kind(self.spec, name, kind)
            for name, kind in self.spec.features.items()
        }

    def scores(self, frame: pd.DataFrame) -> np.ndarray:
        """What evaluation scores, per task.

        The positive-class probability (binary), the class probability matrix (multiclass) or
        the predicted values (regression).
        """
        return self.spec.strategy.model_scores(self.pipeline, frame, len(self.spec.classes))

    def predict_frame(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Predictions (and probabilities for classification) for raw records."""
        return self.output(self.scores(frame)).frame(frame.index)

    def output(self, scores: np.ndarray) -> ModelOutput:
        """:meth:`scores` as the model's output: ``prediction`` and the probabilities behind it."""
        return self.spec.strategy.output(scores, self.spec.classes, self.threshold)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        """MLflow pyfunc entry point; see :meth:`predict_frame`."""
        return self.predict_frame(pd.DataFrame(model_input))


def _value_of_kind(spec: FeatureSpec, name: str, kind: str) -> Any:
    """A valid value for a feature, from its kind alone (the first category known for it)."""
    if kind == "categorical":
        return next(iter(spec.categories.get(name, [])), None)
    return {"numeric": 0, "boolean": False, "datetime": "2000-01-01"}[kind]


def encode_target(target: pd.Series, spec: FeatureSpec) -> np.ndarray:
    """Target labels -> what the model learns.

    0/1 with 1 for the positive class (binary), the index in ``spec.classes`` (multiclass), or
    floats (regression).

    Raises:
        DataError: if a multiclass label is not one of the spec's classes.

    """
    return spec.strategy.encode_target(target, spec.classes)
