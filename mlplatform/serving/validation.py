"""Request validation against a model's feature spec.

Every problem is reported with its location (``["body", "records", i, field]``, FastAPI's own
convention) and a message naming the field, so a client can fix its request. Invalid input is a
4xx, never a 500.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from mlplatform.model.pipeline import parse_datetime, parse_iso_datetime
from mlplatform.model.spec import FeatureKind, FeatureSpec

# Report at most this many problems: enough to fix a request, bounded for huge bad payloads.
_MAX_ERRORS = 20
# The largest integer a 64-bit float holds: a JSON integer beyond it cannot be scored (the model
# reads numbers as floats), so it is refused here rather than overflowing in the model.
_LARGEST_FLOAT_INTEGER = int(sys.float_info.max)
MAX_DATETIME_LENGTH = 64
"""Longest date string accepted: the longest ISO 8601 form is 35 characters, and the readable
non-ISO forms (``Sunday, June 1, 2025 10:00:00 PM``) fit too. Longer strings are not dates, and
parsing them (pandas' fallback) costs time in proportion to their length."""


class InvalidRequest(Exception):
    """A request the endpoint refuses, with the HTTP status and FastAPI-style error details."""

    def __init__(
        self,
        status_code: int,
        errors: list[dict[str, Any]],
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(f"{status_code}: {errors}")
        self.status_code = status_code
        self.errors = errors
        self.headers = dict(headers or {})


def _error(loc: list[Any], message: str, kind: str) -> dict[str, Any]:
    return {"loc": ["body", *loc], "msg": message, "type": kind}


def _fits_a_float(value: int) -> bool:
    return -_LARGEST_FLOAT_INTEGER <= value <= _LARGEST_FLOAT_INTEGER


def _number_problem(value: Any) -> str | None:
    """Why ``value`` is not a finite number the model can read, or ``None`` if it is one."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"must be a number or null, got {type(value).__name__}"
    if isinstance(value, float) and math.isinf(value):
        return "must be a finite number"
    if isinstance(value, int) and not _fits_a_float(value):
        return (
            f"must be a finite number of at most {sys.float_info.max:.4g} in magnitude (a 64-bit "
            f"float), got an integer of {len(str(abs(value)))} digits"
        )
    return None


def _type_problem(kind: FeatureKind, value: Any) -> str | None:
    """Why ``value`` is not acceptable for a feature of ``kind``, or ``None`` if it is."""
    if value is None:
        return None  # missing values are imputed by the model, as in training
    if kind == "numeric":
        return _number_problem(value)
    if kind == "boolean":
        return (
            None
            if isinstance(value, bool)
            else f"must be true, false or null, got {type(value).__name__}"
        )
    if not isinstance(value, str):
        return f"must be a string or null, got {type(value).__name__}"
    if kind == "datetime" and len(value) > MAX_DATETIME_LENGTH:
        return (
            f"must be an ISO 8601 date or datetime, got a string of {len(value)} characters "
            f"(a date has at most {MAX_DATETIME_LENGTH})"
        )
    if kind == "datetime" and parse_datetime(value) is None:
        return f"must be an ISO 8601 date or datetime, got {value!r}"
    return None


def _column_is_valid(kind: FeatureKind, values: list[Any]) -> bool:
    """Whether every value of one feature is acceptable (the common case, checked in bulk)."""
    if kind == "numeric":
        return all(
            value is None
            or (type(value) is int and _fits_a_float(value))
            or (type(value) is float and not math.isinf(value))
            for value in values
        )
    if kind == "boolean":
        return all(value is None or type(value) is bool for value in values)
    if kind == "datetime":  # the rule's fast path only: a value it leaves is checked one by one
        return all(
            value is None or (type(value) is str and parse_iso_datetime(value) is not None)
            for value in values
        )
    return all(value is None or type(value) is str for value in values)


def _well_formed(records: list[Any], spec: FeatureSpec) -> bool:
    """Fast check of the common case: objects with the spec's fields, all values valid.

    Besides the features, a record may carry the columns training ignored (the target, dropped
    identifiers and constants), as in the user's own file.
    """
    names = spec.features.keys()
    accepted = names | spec.ignored_inputs
    if not all(
        type(record) is dict and (record.keys() == names or names <= record.keys() <= accepted)
        for record in records
    ):
        return False
    return all(
        _column_is_valid(kind, [record[name] for record in records])
        for name, kind in spec.features.items()
    )


def _record_errors(records: list[Any], spec: FeatureSpec) -> list[dict[str, Any]]:
    """Every problem of the records, in order (record by record, field by field), bounded."""
    expected = spec.features
    errors: list[dict[str, Any]] = []
    for index, record in enumerate(records):
        if not isinstance(record, Mapping):
            errors.append(
                _error(["records", index], "must be an object of feature values", "dict_type")
            )
            continue
        for name, kind in expected.items():
            if name not in record:
                errors.append(
                    _error(["records", index, name], f"field '{name}' is required", "missing")
                )
                continue
            problem = _type_problem(kind, record[name])
            if problem:
                errors.append(
                    _error(["records", index, name], f"field '{name}' {problem}", "type_error")
                )
        errors.extend(
            _error(
                ["records", index, name],
                f"unexpected field '{name}': the model was trained on no such column",
                "extra_forbidden",
            )
            for name in record
            if name not in expected and name not in spec.ignored_inputs
        )
        if len(errors) >= _MAX_ERRORS:
            break
    return errors[:_MAX_ERRORS]


def check_records(records: Any, spec: FeatureSpec, max_records: int) -> list[dict[str, Any]]:
    """Check a request's records against ``spec`` without building a frame.

    Args:
        records: the ``records`` member of the request body.
        spec: the served model's feature spec.
        max_records: the largest accepted batch.

    Returns:
        The records, unchanged (the single-record path batches them before making a frame).

    Raises:
        InvalidRequest: 422 for a malformed request (naming each bad field), 413 for too many
            records.

    """
    if not isinstance(records, list):
        raise InvalidRequest(422, [_error(["records"], "must be a list of records", "list_type")])
    if not records:
        raise InvalidRequest(
            422, [_error(["records"], "must contain at least one record", "too_short")]
        )
    if len(records) > max_records:
        raise InvalidRequest(
            413,
            [
                _error(
                    ["records"],
                    f"{len(records)} records exceed the limit of {max_records} per request",
                    "too_long",
                )
            ],
        )
    if not _well_formed(records, spec):
        errors = _record_errors(records, spec)
        if errors:
            raise InvalidRequest(422, errors)
    return records


def _label_problem(label: Any, spec: FeatureSpec) -> str | None:
    """Why ``label`` can never be a true label of the model's task, or ``None`` if it can be."""
    if spec.strategy.has_classes:
        # Compared as the live metrics compare labels with predictions (1 == 1.0, "1" != 1).
        if any(label == known for known in spec.classes):
            return None
        shown = ", ".join(map(repr, spec.classes[:10])) + (
            ", ..." if len(spec.classes) > 10 else ""
        )
        return f"must be one of the model's classes ({shown}), got {type(label).__name__}"
    if isinstance(label, bool) or not isinstance(label, int | float):
        return f"must be a number (the true value), got {type(label).__name__}"
    if isinstance(label, float) and math.isnan(label):
        return "must be a finite number (the true value), got NaN"
    return _number_problem(label)


def check_labels(items: Sequence[Mapping[str, Any]], spec: FeatureSpec, max_records: int) -> None:
    """Check ``POST /feedback`` labels against the model: each could match a logged prediction.

    A record index no request can have, or a label the model can never predict (not one of its
    classes; not a finite number for regression), is refused rather than reported as unknown:
    no retry would ever match it.

    Args:
        items: the parsed labels (``request_id``, ``index``, ``label``).
        spec: the served model's feature spec (its task and classes).
        max_records: the most records a request may have (indices are below it).

    Raises:
        InvalidRequest: 422 naming each bad index or label (at most 20 of them).

    """
    errors: list[dict[str, Any]] = []
    for position, item in enumerate(items):
        if not 0 <= item["index"] < max_records:
            errors.append(
                _error(
                    ["labels", position, "index"],
                    f"index must be at least 0 and below {max_records}, the most records a "
                    "request may have",
                    "less_than",
                )
            )
        problem = _label_problem(item["label"], spec)
        if problem:
            errors.append(_error(["labels", position, "label"], f"label {problem}", "value_error"))
        if len(errors) >= _MAX_ERRORS:
            break
    if errors:
        raise InvalidRequest(422, errors[:_MAX_ERRORS])
