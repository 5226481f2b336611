"""The registered MLflow model: a fitted pipeline, its spec and decision threshold."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from sklearn.pipeline import Pipeline

from mlplatform.model.spec import DataError, FeatureSpec, plain

PROBABILITY_PREFIX = "probability_"
"""Multiclass models output one column per class: ``probability_<class>``."""


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
        self.threshold = threshold if spec.task == "binary" else None
        self.example_record = dict(example_record or {})

    def class_probabilities(self, frame: pd.DataFrame) -> np.ndarray:
        """Probability of each class (columns in the order of ``spec.classes``) per row."""
        encoded = list(self.pipeline[-1].classes_)
        probability = self.pipeline.predict_proba(frame)
        return probability[:, [encoded.index(i) for i in range(len(self.spec.classes))]]

    def positive_probability(self, frame: pd.DataFrame) -> np.ndarray:
        """Probability of the positive class for each row of a binary model's input."""
        return self.class_probabilities(frame)[:, 1]

    def scores(self, frame: pd.DataFrame) -> np.ndarray:
        """What evaluation scores, per task.

        The positive-class probability (binary), the class probability matrix (multiclass) or
        the predicted values (regression).
        """
        if self.spec.task == "binary":
            return self.positive_probability(frame)
        if self.spec.task == "multiclass":
            return self.class_probabilities(frame)
        return np.asarray(self.pipeline.predict(frame), dtype=float)

    def predict_frame(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Predictions (and probabilities for classification) for raw records."""
        return self.output_frame(self.scores(frame), frame.index)

    def output_frame(self, scores: np.ndarray, index: pd.Index | None = None) -> pd.DataFrame:
        """:meth:`scores` as the model's output: ``prediction`` and the probabilities behind it."""
        if self.spec.task == "regression":
            return pd.DataFrame({"prediction": scores}, index=index)
        if self.spec.task == "multiclass":
            classes = np.asarray(self.spec.classes, dtype=object)
            columns = {"prediction": classes[np.argmax(scores, axis=1)]}
            for position, label in enumerate(self.spec.classes):
                columns[f"{PROBABILITY_PREFIX}{label}"] = scores[:, position]
            return pd.DataFrame(columns, index=index)
        negative, positive = self.spec.classes
        labels = np.where(scores >= self.threshold, positive, negative)
        return pd.DataFrame({"prediction": labels, "probability": scores}, index=index)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        """MLflow pyfunc entry point; see :meth:`predict_frame`."""
        return self.predict_frame(pd.DataFrame(model_input))


def encode_target(target: pd.Series, spec: FeatureSpec) -> np.ndarray:
    """Target labels -> what the model learns.

    0/1 with 1 for the positive class (binary), the index in ``spec.classes`` (multiclass), or
    floats (regression).

    Raises:
        DataError: if a multiclass label is not one of the spec's classes.

    """
    if spec.task == "regression":
        return pd.to_numeric(target, errors="coerce").astype(float).to_numpy()
    if spec.task == "binary":
        return (target == spec.positive_class).astype(int).to_numpy()
    index = {str(label): i for i, label in enumerate(spec.classes)}
    encoded = target.map(lambda label: index.get(str(plain(label)), -1)).astype(int).to_numpy()
    if (encoded < 0).any():
        unknown = sorted({str(v) for v in target[encoded < 0]})[:5]
        raise DataError(f"labels not seen in training: {', '.join(unknown)}")
    return encoded
