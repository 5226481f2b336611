"""Request validation against a model's feature spec.

Every problem is reported with its location (``["body", "records", i, field]``, FastAPI's own
convention) and a message naming the field, so a client can fix its request. Invalid input is a
4xx, never a 500.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from mlplatform.model.pipeline import parse_datetime, parse_iso_datetime
from mlplatform.model.spec import FeatureKind, FeatureSpec

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
    if kind == "datetime" and parse_datetime(value) is None:
        return f"must be an ISO 8601 date or datetime, got {value!r}"
    return None


def _column_is_valid(kind: FeatureKind, values: list[Any]) -> bool:
    """Whether every value of one feature is acceptable (the common case, checked in bulk)."""
    if kind == "numeric":
        return all(
            value is None or type(value) is int or (type(value) is float and not math.isinf(value))
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
