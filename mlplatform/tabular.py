"""Tabular modelling core: feature inference, the scikit-learn pipelines and the MLflow model.

Nothing here imports Dagster, so the serving app (and anyone loading a registered model) can use
it. The fitted pipeline starts with :class:`FrameCoercer`, which turns raw records into the
training dtypes, so the model served is exactly the model trained: no train/serve skew.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import mlflow.pyfunc
import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder, StandardScaler

FeatureKind = Literal["numeric", "categorical", "boolean", "datetime"]

# A string column is identifier-like when almost every row has its own value and there are many.
_IDENTIFIER_UNIQUE_SHARE = 0.5
_IDENTIFIER_MIN_UNIQUE = 50
_ID_NAME = re.compile(r"(^id$|_id$|^id_|uuid|guid|^key$|_key$)", re.IGNORECASE)
_BOOLEAN_STRINGS = {"true": True, "false": False}
_POSITIVE_TOKENS = ("1", "true", "yes", "y", "positive", "pos")


class DataError(ValueError):
    """Raised when a dataset cannot be used for training, with a message saying why."""


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """What the model expects as input: one entry per raw input column, in order.

    Attributes:
        features: input column name -> kind, in model input order.
        target: the label column.
        classes: the target's class labels; the last one is the positive class.
        time_column: the column that orders rows in time (used for splitting), if any.
        dropped: column name -> reason it is not used as a feature.
        categories: categorical column -> the values seen in training (for schemas and docs).

    """

    features: dict[str, FeatureKind]
    target: str
    classes: tuple[Any, ...]
    time_column: str | None = None
    dropped: dict[str, str] = dataclasses.field(default_factory=dict)
    categories: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    @property
    def positive_class(self) -> Any:
        """The class whose probability the model reports."""
        return self.classes[-1]

    def columns_of(self, kind: FeatureKind) -> list[str]:
        """Input columns of one kind, in input order."""
        return [name for name, k in self.features.items() if k == kind]


def _looks_boolean(values: pd.Series) -> bool:
    distinct = set(values.unique())
    if distinct <= {True, False}:
        return True
    lowered = {str(v).strip().lower() for v in distinct}
    return lowered <= set(_BOOLEAN_STRINGS)


def _looks_datetime(values: pd.Series) -> bool:
    sample = values.astype(str).head(200)
    if not sample.str.contains(r"\d{4}-\d{2}-\d{2}|\d{1,2}/\d{1,2}/\d{2,4}", regex=True).all():
        return False
    parsed = pd.to_datetime(sample, errors="coerce", format="mixed", utc=True)
    return bool(parsed.notna().mean() >= 0.95)


def infer_feature_kind(name: str, column: pd.Series) -> tuple[FeatureKind | None, str]:
    """Decide how a raw column is used.

    Args:
        name: the column name (identifier-like names are a hint).
        column: the column's values.

    Returns:
        ``(kind, reason)``: the feature kind, or ``None`` with the reason it is dropped.

    """
    values = column.dropna()
    if values.empty:
        return None, "all values are missing"
    n_unique = values.nunique()
    if n_unique <= 1:
        return None, f"constant (only value: {values.iloc[0]!r})"
    if pd.api.types.is_bool_dtype(column) or (column.dtype == object and _looks_boolean(values)):
        return "boolean", "two truth values"
    if pd.api.types.is_datetime64_any_dtype(column):
        return "datetime", "datetime dtype"
    if pd.api.types.is_numeric_dtype(column):
        unique_per_row = n_unique == len(values)
        if pd.api.types.is_integer_dtype(values) and unique_per_row:
            if _ID_NAME.search(name):
                return None, "identifier-like (unique integer per row, id-like name)"
            if (values.sort_values().diff().dropna() == 1).all():
                return None, "identifier-like (consecutive integers, one per row)"
        return "numeric", "numeric dtype"
    if _looks_datetime(values):
        return "datetime", "values parse as dates"
    if n_unique >= _IDENTIFIER_MIN_UNIQUE and n_unique / len(values) > _IDENTIFIER_UNIQUE_SHARE:
        return None, f"identifier-like ({n_unique} distinct values in {len(values)} rows)"
    return "categorical", f"{n_unique} categories"


def infer_classes(target: pd.Series) -> tuple[Any, ...]:
    """Return the target's two classes with the positive class last.

    The positive class is ``1``/``True``/``"yes"``-like when present, otherwise the minority class.

    Raises:
        DataError: if the target is missing values or does not have exactly two classes.

    """
    if target.isna().any():
        raise DataError(f"target '{target.name}' has {int(target.isna().sum())} missing values")
    counts = target.value_counts()
    if len(counts) != 2:
        raise DataError(
            f"target '{target.name}' has {len(counts)} distinct values "
            f"({', '.join(map(str, counts.index[:5]))}{'...' if len(counts) > 5 else ''}); "
            "only binary classification is supported"
        )
    labels = list(counts.index)
    positive = next(
        (label for label in labels if str(label).strip().lower() in _POSITIVE_TOKENS),
        counts.idxmin(),
    )
    negative = next(label for label in labels if label != positive)
    return (_plain(negative), _plain(positive))


def _plain(value: Any) -> Any:
    """Numpy scalars -> Python scalars, so specs serialise to JSON cleanly."""
    return value.item() if isinstance(value, np.generic) else value


def infer_feature_spec(
    frame: pd.DataFrame, target: str, time_column: str | None = None
) -> FeatureSpec:
    """Infer the feature spec of a raw dataset.

    Args:
        frame: the raw data, target included.
        target: the label column.
        time_column: the column that orders rows in time; by default the first datetime feature.

    Returns:
        The spec, with every dropped column and its reason in ``dropped``.

    Raises:
        DataError: if the target is missing or not binary, or no usable feature remains.

    """
    if target not in frame.columns:
        raise DataError(
            f"target column '{target}' not found; columns are: {', '.join(map(str, frame.columns))}"
        )
    classes = infer_classes(frame[target])
    features: dict[str, FeatureKind] = {}
    dropped: dict[str, str] = {}
    categories: dict[str, list[str]] = {}
    for name in frame.columns:
        if name == target:
            continue
        kind, reason = infer_feature_kind(str(name), frame[name])
        if kind is None:
            dropped[str(name)] = reason
            continue
        features[str(name)] = kind
        if kind == "categorical":
            categories[str(name)] = sorted(frame[name].dropna().astype(str).unique().tolist())
    if not features:
        raise DataError(
            "no usable feature columns: " + "; ".join(f"{k}: {v}" for k, v in dropped.items())
        )
    if time_column is not None and features.get(time_column) != "datetime":
        raise DataError(f"time column '{time_column}' is not a datetime feature of the data")
    if time_column is None:
        time_column = next((n for n, k in features.items() if k == "datetime"), None)
    return FeatureSpec(
        features=features,
        target=target,
        classes=classes,
        time_column=time_column,
        dropped=dropped,
        categories=categories,
    )


def _to_boolean(column: pd.Series) -> pd.Series:
    def convert(value: Any) -> float:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return np.nan
        if isinstance(value, bool | np.bool_):
            return float(value)
        return float(_BOOLEAN_STRINGS.get(str(value).strip().lower(), np.nan))

    return column.map(convert).astype(float)


def coerce_features(frame: pd.DataFrame, spec: FeatureSpec) -> pd.DataFrame:
    """Select the spec's input columns from ``frame`` and give them their training dtypes.

    Numeric -> float, categorical -> string (missing stays missing), boolean -> 0.0/1.0,
    datetime -> UTC timestamps. Values that cannot be converted become missing.

    Raises:
        DataError: if input columns are missing.

    """
    missing = [name for name in spec.features if name not in frame.columns]
    if missing:
        raise DataError(f"missing input columns: {', '.join(missing)}")
    out = {}
    for name, kind in spec.features.items():
        column = frame[name]
        if kind == "numeric":
            out[name] = pd.to_numeric(column, errors="coerce").astype(float)
        elif kind == "categorical":
            out[name] = column.map(lambda v: v if pd.isna(v) else str(v)).astype(object)
        elif kind == "boolean":
            out[name] = _to_boolean(column)
        else:
            out[name] = pd.to_datetime(column, errors="coerce", utc=True, format="mixed")
    return pd.DataFrame(out, index=frame.index)


class FrameCoercer(BaseEstimator, TransformerMixin):
    """First pipeline step: raw records -> training dtypes (see :func:`coerce_features`)."""

    def __init__(self, spec: FeatureSpec):
        self.spec = spec

    def fit(self, frame: pd.DataFrame, y: Any = None) -> FrameCoercer:
        """Nothing to learn; present for the scikit-learn API."""
        return self

    def transform(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Coerce ``frame`` to the spec's columns and dtypes."""
        return coerce_features(frame, self.spec)


class DatetimeExpander(BaseEstimator, TransformerMixin):
    """Turns datetime columns into month, day of week and hour (seasonality, not the year)."""

    parts = ("month", "dayofweek", "hour")

    def fit(self, frame: pd.DataFrame, y: Any = None) -> DatetimeExpander:
        """Nothing to learn; present for the scikit-learn API."""
        return self

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        """Return one float column per (datetime column, part); missing dates stay NaN."""
        columns = []
        for name in frame.columns:
            stamps = pd.to_datetime(frame[name], errors="coerce", utc=True)
            columns.extend(getattr(stamps.dt, part).astype(float).to_numpy() for part in self.parts)
        return np.column_stack(columns)

    def get_feature_names_out(self, input_features: Sequence[str] | None = None) -> np.ndarray:
        """Names ``<column>_<part>`` for every input column."""
        names = list(input_features or [])
        return np.array([f"{name}_{part}" for name in names for part in self.parts], dtype=object)


def build_preprocessor(spec: FeatureSpec, for_trees: bool) -> ColumnTransformer:
    """The column transformer after :class:`FrameCoercer`.

    Args:
        spec: the feature spec.
        for_trees: ordinal-encode categories and keep NaN for gradient boosting (which handles
            both natively); otherwise impute, scale and one-hot encode for linear models.

    """
    numeric, categorical = spec.columns_of("numeric"), spec.columns_of("categorical")
    boolean, datetime = spec.columns_of("boolean"), spec.columns_of("datetime")
    if for_trees:
        groups = [
            ("numeric", "passthrough", numeric + boolean),
            (
                "categorical",
                OrdinalEncoder(
                    handle_unknown="use_encoded_value",
                    unknown_value=-1,
                    encoded_missing_value=-1,
                ),
                categorical,
            ),
            ("datetime", DatetimeExpander(), datetime),
        ]
    else:
        groups = [
            (
                "numeric",
                make_pipeline(
                    SimpleImputer(strategy="median", add_indicator=True), StandardScaler()
                ),
                numeric + boolean,
            ),
            (
                "categorical",
                make_pipeline(
                    SimpleImputer(strategy="constant", fill_value="__missing__"),
                    OneHotEncoder(handle_unknown="infrequent_if_exist", min_frequency=5),
                ),
                categorical,
            ),
            (
                "datetime",
                make_pipeline(
                    DatetimeExpander(), SimpleImputer(strategy="median"), StandardScaler()
                ),
                datetime,
            ),
        ]
    return ColumnTransformer([g for g in groups if g[2]], sparse_threshold=0.0)


def make_model_pipeline(
    spec: FeatureSpec, preprocessor: ColumnTransformer, estimator: Any
) -> Pipeline:
    """Assemble coercion, preprocessing and estimator into one servable pipeline."""
    return Pipeline(
        [("coerce", FrameCoercer(spec)), ("preprocess", preprocessor), ("estimator", estimator)]
    )


class TabularModel(mlflow.pyfunc.PythonModel):
    """The registered MLflow model: a fitted pipeline plus its spec and decision threshold.

    ``predict`` returns one row per input record with ``prediction`` (a class label) and
    ``probability`` (of the positive class), so every consumer (the endpoint, evaluation, a user
    calling ``mlflow.pyfunc.load_model``) gets the same answer.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        spec: FeatureSpec,
        threshold: float = 0.5,
        example_record: Mapping[str, Any] | None = None,
    ):
        self.pipeline = pipeline
        self.spec = spec
        self.threshold = threshold
        self.example_record = dict(example_record or {})

    def positive_probability(self, frame: pd.DataFrame) -> np.ndarray:
        """Probability of the positive class for each row of ``frame``."""
        estimator = self.pipeline[-1]
        positive_index = list(estimator.classes_).index(1)
        return self.pipeline.predict_proba(frame)[:, positive_index]

    def predict_frame(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Predict labels and positive-class probabilities for raw records."""
        probability = self.positive_probability(frame)
        negative, positive = self.spec.classes
        labels = np.where(probability >= self.threshold, positive, negative)
        return pd.DataFrame({"prediction": labels, "probability": probability}, index=frame.index)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        """MLflow pyfunc entry point; see :meth:`predict_frame`."""
        return self.predict_frame(pd.DataFrame(model_input))


def encode_target(target: pd.Series, spec: FeatureSpec) -> np.ndarray:
    """Target labels -> 0/1 with 1 for the spec's positive class."""
    return (target == spec.positive_class).astype(int).to_numpy()
