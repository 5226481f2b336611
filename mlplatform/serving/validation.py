"""Request validation against a model's feature spec.

Every problem is reported with its location (``["body", "records", i, field]``, FastAPI's own
convention) and a message naming the field, so a client can fix its request. Invalid input is a
4xx, never a 500.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

from mlplatform.tabular import FeatureKind, FeatureSpec

# Report at most this many problems: enough to fix a request, bounded for huge bad payloads.
_MAX_ERRORS = 20


class InvalidRequest(Exception):
    """A request the endpoint refuses, with the HTTP status and FastAPI-style error details."""

    def __init__(self, status_code: int, errors: list[dict[str, Any]]):
        super().__init__(f"{status_code}: {errors}")
        self.status_code = status_code
        self.errors = errors


def _error(loc: list[Any], message: str, kind: str) -> dict[str, Any]:
    return {"loc": ["body", *loc], "msg": message, "type": kind}


def _type_problem(kind: FeatureKind, value: Any) -> str | None:
    """Why ``value`` is not acceptable for a feature of ``kind``, or ``None`` if it is."""
    if value is None:
        return None  # missing values are imputed by the model, as in training
    if kind == "numeric":
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"must be a number or null, got {type(value).__name__}"
        if isinstance(value, float) and math.isinf(value):
            return "must be a finite number"
        return None
    if kind == "boolean":
        return (
            None
            if isinstance(value, bool)
            else f"must be true, false or null, got {type(value).__name__}"
        )
    if not isinstance(value, str):
        return f"must be a string or null, got {type(value).__name__}"
    if kind == "datetime" and pd.isna(
        pd.to_datetime(value, errors="coerce", utc=True, format="mixed")
    ):
        return f"must be an ISO 8601 date or datetime, got {value!r}"
    return None


def validate_records(records: Any, spec: FeatureSpec, max_records: int) -> pd.DataFrame:
    """Check a request's records against ``spec`` and return them as a DataFrame.

    Args:
        records: the ``records`` member of the request body.
        spec: the served model's feature spec.
        max_records: the largest accepted batch.

    Returns:
        One row per record, columns in the model's input order.

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
            _error(["records", index, name], f"unexpected field '{name}'", "extra_forbidden")
            for name in record
            if name not in expected
        )
        if len(errors) >= _MAX_ERRORS:
            break
    if errors:
        raise InvalidRequest(422, errors[:_MAX_ERRORS])
    return pd.DataFrame.from_records(records, columns=list(expected))
