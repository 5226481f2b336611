"""Tabular modelling core: feature inference, the scikit-learn pipelines and the MLflow model.

Nothing here imports Dagster, so the serving app (and anyone loading a registered model) can use
it. The fitted pipeline starts with :class:`FrameCoercer`, which turns raw records into the
training dtypes, so the model served is exactly the model trained: no train/serve skew.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
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
from sklearn.preprocessing import (
    FunctionTransformer,
    OneHotEncoder,
    OrdinalEncoder,
    StandardScaler,
)

FeatureKind = Literal["numeric", "categorical", "boolean", "datetime"]
Task = Literal["binary", "multiclass", "regression"]
SLICEABLE_KINDS = ("categorical", "boolean", "numeric")
"""Feature kinds evaluation can slice by (numeric ones in quantile bins)."""
TASKS: tuple[Task, ...] = ("binary", "multiclass", "regression")

# Targets with more distinct labels than this are not treated as classes.
MAX_CLASSES = 50
# A numeric target with whole-number values and at most this many of them is inferred as classes
# (ratings, grades); more distinct values (amounts, counts) make it a regression target.
_MAX_NUMERIC_CLASSES = 10

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
        classes: the target's class labels (binary: the positive class last; multiclass: sorted;
            regression: empty).
        time_column: the column that orders rows in time (used for splitting), if any.
        dropped: column name -> reason it is not used as a feature.
        categories: categorical column -> the values seen in training (for schemas and docs).
        task: the learning task.
        sensitive: features declared sensitive: the promotion gate bounds their fairness gaps.

    """

    features: dict[str, FeatureKind]
    target: str
    classes: tuple[Any, ...]
    time_column: str | None = None
    dropped: dict[str, str] = dataclasses.field(default_factory=dict)
    categories: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    task: Task = "binary"
    sensitive: tuple[str, ...] = ()

    @property
    def positive_class(self) -> Any:
        """The class whose probability a binary model reports."""
        return self.classes[-1]

    @property
    def is_classification(self) -> bool:
        """Whether the target is a class label (binary or multiclass) rather than a value."""
        return self.task != "regression"

    @property
    def ignored_inputs(self) -> frozenset[str]:
        """Columns the training data had that are not model inputs: the target and the dropped.

        Records posted as the user's file has them carry these; they are accepted and ignored.
        """
        return frozenset(self.dropped) | {self.target}

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


def _sorted_labels(labels: Sequence[Any]) -> list[Any]:
    """Labels in a stable order: numerically when all are numbers, otherwise as text."""
    if all(isinstance(label, int | float | np.integer | np.floating) for label in labels):
        return sorted(labels)
    return sorted(labels, key=str)


def _whole_numbers(values: pd.Series) -> bool:
    numbers = values.to_numpy(dtype=float)
    return bool(np.all(np.isfinite(numbers)) and np.all(numbers == np.round(numbers)))


def infer_task(target: pd.Series, requested: str | None = None) -> Task:
    """Decide the learning task from the target's values, or check a requested one.

    Inferred: two distinct labels -> ``binary``; text or boolean labels, or whole numbers with
    at most 10 distinct values (grades, ratings) -> ``multiclass``; other numbers (amounts,
    measurements) -> ``regression``. ``requested`` (for example from ``MLPLATFORM_TASK``)
    overrides the inference when the target can support it.

    Raises:
        DataError: on missing labels, an unknown task, or a target that cannot support it.

    """
    name = target.name
    if target.isna().any():
        raise DataError(f"target '{name}' has {int(target.isna().sum())} missing values")
    n_unique = target.nunique()
    numeric = pd.api.types.is_numeric_dtype(target) and not pd.api.types.is_bool_dtype(target)
    examples = ", ".join(map(str, target.value_counts().index[:5]))
    if n_unique < 2:
        raise DataError(f"target '{name}' is constant (only value: {examples})")
    if requested is not None and requested not in TASKS:
        raise DataError(f"unknown task '{requested}'; choose one of {', '.join(TASKS)}")
    if requested is None:
        if n_unique == 2:
            return "binary"
        if numeric and not (_whole_numbers(target) and n_unique <= _MAX_NUMERIC_CLASSES):
            requested = "regression"
        else:
            requested = "multiclass"
    if requested == "regression":
        if not numeric:
            raise DataError(f"target '{name}' is not numeric ({examples}...); cannot regress it")
        return "regression"
    if requested == "binary" and n_unique != 2:
        raise DataError(
            f"target '{name}' has {n_unique} distinct values ({examples}"
            f"{'...' if n_unique > 5 else ''}); binary classification needs exactly two"
        )
    if requested == "multiclass" and not 3 <= n_unique <= MAX_CLASSES:
        raise DataError(
            f"target '{name}' has {n_unique} distinct values ({examples}"
            f"{'...' if n_unique > 5 else ''}); multiclass classification needs 3 to "
            f"{MAX_CLASSES} classes" + (" (set the task to regression)" if numeric else "")
        )
    return requested


def infer_classes(target: pd.Series, task: Task = "binary") -> tuple[Any, ...]:
    """Return the target's class labels for a task (see :attr:`FeatureSpec.classes`).

    Binary: the positive class is ``1``/``True``/``"yes"``-like when present, otherwise the
    minority class, and it comes last. Multiclass: every label, sorted. Regression: none.

    Raises:
        DataError: if the target does not suit the task (see :func:`infer_task`).

    """
    task = infer_task(target, task)
    if task == "regression":
        return ()
    counts = target.value_counts()
    labels = list(counts.index)
    if task == "multiclass":
        return tuple(_plain(label) for label in _sorted_labels(labels))
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
    frame: pd.DataFrame,
    target: str,
    time_column: str | None = None,
    task: str | None = None,
    sensitive: Sequence[str] = (),
) -> FeatureSpec:
    """Infer the feature spec of a raw dataset.

    Args:
        frame: the raw data, target included.
        target: the label column.
        time_column: the column that orders rows in time; by default the first datetime feature.
        task: ``binary``, ``multiclass`` or ``regression``; by default inferred from the target
            (see :func:`infer_task`).
        sensitive: features declared sensitive (their fairness gaps are bounded by the gate).

    Returns:
        The spec, with every dropped column and its reason in ``dropped``.

    Raises:
        DataError: if the target is missing or does not suit the task, or no usable feature
            remains.

    """
    if target not in frame.columns:
        raise DataError(
            f"target column '{target}' not found; columns are: {', '.join(map(str, frame.columns))}"
        )
    resolved_task = infer_task(frame[target], task)
    classes = infer_classes(frame[target], resolved_task)
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
    unusable = [name for name in sensitive if features.get(name) not in SLICEABLE_KINDS]
    if unusable:
        reasons = [
            f"'{name}' is " + (f"dropped ({dropped[name]})" if name in dropped else "not a column")
            if name not in features
            else f"'{name}' is a {features[name]} feature"
            for name in unusable
        ]
        raise DataError(
            "sensitive features must be categorical, boolean or numeric features of the data: "
            + "; ".join(reasons)
        )
    return FeatureSpec(
        features=features,
        target=target,
        classes=classes,
        time_column=time_column,
        dropped=dropped,
        categories=categories,
        task=resolved_task,
        sensitive=tuple(sensitive),
    )


def _boolean_value(value: Any) -> float:
    """1.0 / 0.0 for a boolean (or "true"/"false" in any case), NaN for anything else."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return np.nan
    if isinstance(value, bool | np.bool_):
        return float(value)
    return float(_BOOLEAN_STRINGS.get(str(value).strip().lower(), np.nan))


def _to_boolean(column: pd.Series) -> pd.Series:
    return column.map(_boolean_value).astype(float)


# ISO 8601 dates and date-times as clients send them. Strings of this shape that
# `datetime.fromisoformat` accepts within pandas' timestamp range are parsed to the same instant
# as `pd.to_datetime(..., utc=True, format="mixed")` does, about 100x faster one by one.
_ISO_DATETIME = re.compile(
    r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?)?(?:Z|[+-]\d{2}:?\d{2})?"
)
_PANDAS_YEARS = range(1678, 2262)  # pd.Timestamp's nanosecond range, whole years


@functools.lru_cache(maxsize=16_384)
def parse_iso_datetime(value: str) -> dt.datetime | None:
    """``value`` as a UTC datetime if it is a plain ISO 8601 date (time) pandas would parse.

    ``None`` means "not on the fast path", not "invalid": ask pandas (``coerce_features``).
    Naive values are taken as UTC, as the model's coercion does. Cached: validating a request
    and scoring it parse the same values.
    """
    if _ISO_DATETIME.fullmatch(value) is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace(" ", "T", 1))
    except ValueError:
        return None
    if parsed.year not in _PANDAS_YEARS:
        return None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=dt.UTC)
    return parsed.astimezone(dt.UTC)


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


class TreeRecordsPredictor:
    """Serving's fast path for gradient-boosted pipelines: JSON records -> scores, no pandas.

    A fitted tree pipeline (:func:`build_preprocessor` with ``for_trees=True``, then LightGBM)
    spends about 10 ms per call in pandas and scikit-learn bookkeeping whatever the number of
    rows, against 0.06 ms in the trees for one record. This computes the same input matrix as
    ``FrameCoercer`` + the column transformer straight from the records (numbers and booleans
    as floats, categories by the fitted ordinal encoder's lookup, dates as month / day of week /
    hour in UTC) and asks the booster, giving exactly :meth:`TabularModel.scores`.
    """

    def __init__(self, spec: FeatureSpec, layout: list[tuple[str, Any, list[str]]], estimator: Any):
        self.spec = spec
        self.estimator = estimator
        self._booster = estimator.booster_
        self._columns: list[tuple[str, str, dict[Any, float] | None]] = []
        self._unknown: dict[str, float] = {}
        for group, transformer, names in layout:
            if group == "categorical":
                # Missing values as the fitted encoder itself codes them: None can be a category
                # of its own (object columns keep None), NaN is "missing".
                missing = {
                    key: transformer.transform(
                        pd.DataFrame({n: [key] for n in names}, dtype=object)
                    )[0]
                    for key in (None, np.nan)
                }
            for position, name in enumerate(names):
                if group != "categorical":
                    self._columns.append((name, spec.features[name], None))
                    continue
                known = enumerate(transformer.categories_[position])
                codes: dict[Any, float] = {v: float(i) for i, v in known if isinstance(v, str)}
                codes[None] = float(missing[None][position])
                codes[_NOT_A_NUMBER] = float(missing[np.nan][position])
                self._unknown[name] = float(transformer.unknown_value)
                self._columns.append((name, "categorical", codes))
        self._width = sum(3 if kind == "datetime" else 1 for _, kind, _ in self._columns)

    @classmethod
    def from_pipeline(cls, pipeline: Pipeline, spec: FeatureSpec) -> TreeRecordsPredictor | None:
        """The fast path for ``pipeline``, or ``None`` if it is not a fitted LightGBM pipeline."""
        steps = dict(pipeline.steps)
        preprocessor, estimator = steps.get("preprocess"), steps.get("estimator")
        if not isinstance(preprocessor, ColumnTransformer) or not hasattr(estimator, "booster_"):
            return None
        layout = []
        for group, transformer, names in preprocessor.transformers_:
            tree_layout = {
                # a fitted "passthrough" is an identity FunctionTransformer
                "numeric": isinstance(transformer, FunctionTransformer)
                and transformer.func is None,
                "categorical": isinstance(transformer, OrdinalEncoder),
                "datetime": isinstance(transformer, DatetimeExpander),
                "remainder": isinstance(transformer, str) and transformer == "drop",
            }
            if not tree_layout.get(group, False):
                return None
            if group != "remainder":
                layout.append((group, transformer, list(names)))
        return cls(spec, layout, estimator)

    def matrix(self, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """The model's input matrix for ``records`` (mappings of feature name -> JSON value)."""
        out = np.empty((len(records), self._width), dtype=float)
        position = 0
        for name, kind, codes in self._columns:
            values = [record.get(name) for record in records]
            if kind == "categorical":
                unknown = self._unknown[name]
                out[:, position] = [
                    codes.get(value if type(value) is str else _category_key(value), unknown)
                    for value in values
                ]
            elif kind == "numeric":
                out[:, position] = _numbers(values)
            elif kind == "boolean":
                out[:, position] = [_boolean_value(value) for value in values]
            else:
                out[:, position : position + 3] = _date_parts(values)
                position += 2
            position += 1
        return out

    def scores(self, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """What :meth:`TabularModel.scores` returns for the same records."""
        # One thread: a replica serves on one core, and OpenMP threads waiting for each other on
        # a busy machine turn a 0.06 ms prediction into a 10 ms one at the 99th percentile.
        raw = self._booster.predict(self.matrix(records), num_threads=1)
        if self.spec.task == "regression":
            return np.asarray(raw, dtype=float)
        if self.spec.task == "binary":  # the probability of encoded class 1, the positive one
            return np.asarray(raw, dtype=float)
        encoded = list(self.estimator.classes_)
        return raw[:, [encoded.index(i) for i in range(len(self.spec.classes))]]


_NOT_A_NUMBER = object()
"""The key of NaN in the fast path's category codes (NaN is not equal to itself)."""


def _category_key(value: Any) -> Any:
    """A non-string category value as the model's coercion leaves it, as a code key."""
    if value is None:
        return None
    return _NOT_A_NUMBER if pd.isna(value) else str(value)


def _numbers(values: list[Any]) -> np.ndarray:
    """Floats, missing as NaN; anything else through pandas' coercion, as in training."""
    try:
        return np.array(values, dtype=float)
    except (TypeError, ValueError):
        return pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").to_numpy(float)


def _date_parts(values: list[Any]) -> np.ndarray:
    """Month, day of week and hour (UTC) per value, as :class:`DatetimeExpander` computes them."""
    parts = np.full((len(values), 3), np.nan)
    for row, value in enumerate(values):
        if value is None:
            continue
        stamp = parse_iso_datetime(value) if isinstance(value, str) else None
        if stamp is None:
            parsed = pd.to_datetime(value, errors="coerce", utc=True, format="mixed")
            if pd.isna(parsed):
                continue
            stamp = parsed
        parts[row] = (stamp.month, stamp.weekday(), stamp.hour)
    return parts


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
    encoded = target.map(lambda label: index.get(str(_plain(label)), -1)).astype(int).to_numpy()
    if (encoded < 0).any():
        unknown = sorted({str(v) for v in target[encoded < 0]})[:5]
        raise DataError(f"labels not seen in training: {', '.join(unknown)}")
    return encoded
