"""From raw records to the model's input: coercion to the training dtypes and the preprocessing.

The fitted pipeline starts with :class:`FrameCoercer`, which turns raw records into the training
dtypes, so the model served is exactly the model trained: no train/serve skew.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import (
    OneHotEncoder,
    OrdinalEncoder,
    StandardScaler,
)

from mlplatform.model.spec import BOOLEAN_STRINGS, DataError, FeatureSpec


def boolean_value(value: Any) -> float:
    """1.0 / 0.0 for a boolean (or "true"/"false" in any case), NaN for anything else."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return np.nan
    if isinstance(value, bool | np.bool_):
        return float(value)
    return float(BOOLEAN_STRINGS.get(str(value).strip().lower(), np.nan))


def _to_boolean(column: pd.Series) -> pd.Series:
    return column.map(boolean_value).astype(float)


# ISO 8601 dates and date-times as clients send them. Strings of this shape that
# `datetime.fromisoformat` accepts within pandas' timestamp range are parsed to the same instant
# as `pd.to_datetime(..., utc=True, format="mixed")` does, about 100x faster one by one.
_ISO_DATETIME = re.compile(
    r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?)?(?:Z|[+-]\d{2}:?\d{2})?"
)
_PANDAS_YEARS = range(1678, 2262)  # pd.Timestamp's nanosecond range, whole years


# The longest string the ISO pattern matches is 35 characters; the cache holds only strings this
# short, so its memory is bounded (16,384 entries of at most 64 characters) whatever is posted.
_LONGEST_CACHED = 64


def parse_iso_datetime(value: str) -> dt.datetime | None:
    """``value`` as a UTC datetime if it is a plain ISO 8601 date (time) pandas would parse.

    ``None`` means "not on the fast path", not "invalid": :func:`parse_datetime` then asks pandas.
    Naive values are taken as UTC, as the model's coercion does. Cached: validating a request
    and scoring it parse the same values. A string longer than any ISO form is answered at once,
    and never cached.
    """
    if len(value) > _LONGEST_CACHED:
        return None
    return _parse_iso_datetime(value)


@functools.lru_cache(maxsize=16_384)
def _parse_iso_datetime(value: str) -> dt.datetime | None:
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


def _pandas_datetimes(values: Any) -> Any:
    """Dates as pandas reads them: any format it knows, in UTC; anything else becomes ``NaT``."""
    return pd.to_datetime(values, errors="coerce", utc=True, format="mixed")


def parse_datetime(value: Any) -> dt.datetime | None:
    """The datetime rule: ``value`` as the UTC moment the model reads, or ``None`` if it is none.

    Plain ISO 8601 strings take the fast path (:func:`parse_iso_datetime`); anything else is
    read by pandas as :func:`coerce_features` reads a column, so request validation, the fast
    scoring path and the model's pipeline accept and reject the same values.

    Args:
        value: a JSON value of a datetime feature (usually a string).

    Returns:
        The moment in UTC (a ``pd.Timestamp`` when pandas read it), or ``None`` for a missing or
        unreadable value.

    """
    if isinstance(value, str):
        parsed = parse_iso_datetime(value)
        if parsed is not None:
            return parsed
    stamp = _pandas_datetimes(value)
    return None if pd.isna(stamp) else stamp


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
            out[name] = _pandas_datetimes(column)
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
