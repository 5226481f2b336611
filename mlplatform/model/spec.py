"""What a model takes and predicts: feature kinds, the task and the target's classes.

Inferred from the raw training data (identifier-like, constant and empty columns are dropped with
the reason), checked against a requested task, and carried with the model so serving and
monitoring read the same description. Nothing here imports Dagster or Ray.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd

from mlplatform.tasks.base import DataError, Task, TaskStrategy
from mlplatform.tasks.base import plain as plain  # serving and monitoring import it from here
from mlplatform.tasks.strategies import TASKS, strategy_for

FeatureKind = Literal["numeric", "categorical", "boolean", "datetime"]
SLICEABLE_KINDS = ("categorical", "boolean", "numeric")
"""Feature kinds evaluation can slice by (numeric ones in quantile bins)."""

# Targets with more distinct labels than this are not treated as classes.
MAX_CLASSES = 50
# A numeric target with whole-number values and at most this many of them is inferred as classes
# (ratings, grades); more distinct values (amounts, counts) make it a regression target.
_MAX_NUMERIC_CLASSES = 10

# A string column is identifier-like when almost every row has its own value and there are many.
_IDENTIFIER_UNIQUE_SHARE = 0.5
_IDENTIFIER_MIN_UNIQUE = 50
_ID_NAME = re.compile(r"(^id$|_id$|^id_|uuid|guid|^key$|_key$)", re.IGNORECASE)
BOOLEAN_STRINGS = {"true": True, "false": False}


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
    def strategy(self) -> TaskStrategy:
        """The task's strategy: what the task's models learn, answer and are judged on."""
        return strategy_for(self.task)

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
    return lowered <= set(BOOLEAN_STRINGS)


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
    return strategy_for(infer_task(target, task)).classes_of(target)


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
