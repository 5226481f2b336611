"""The endpoint's HTTP routes, as a plain FastAPI app around one loaded model.

:func:`build_api` gives ``POST /predict``, ``POST /feedback``, ``GET /healthz``, ``GET /model``,
``GET /model/card`` and OpenAPI at ``/docs`` for a :class:`~mlplatform.serving.model.ServedModel`.
The Ray Serve deployment (:mod:`mlplatform.serving.app`) serves this app in every replica and
hands it its micro-batcher and traffic recorder; tests serve it as is, without Ray. Given API
keys (their digests, :mod:`mlplatform.serving.keys`), every route but ``GET /healthz`` needs one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field, ValidationError
from pydantic_core import from_json, to_json

from mlplatform.model.spec import FeatureKind, FeatureSpec
from mlplatform.monitoring.feedback import FeedbackStore, FeedbackUnavailable
from mlplatform.serving.keys import GRANTED_SCOPES, ApiKeyMiddleware, KeyDigests
from mlplatform.serving.model import ServedModel
from mlplatform.serving.settings import ServingKnobs
from mlplatform.serving.validation import (
    MAX_DATETIME_LENGTH,
    InvalidRequest,
    check_labels,
    check_records,
)

if TYPE_CHECKING:  # the sink runs a Ray actor; the routes need only its two methods
    from mlplatform.serving.recording import TrafficSink

logger = logging.getLogger(__name__)

# Errors that scoring a validated record can still raise because of its values (a number the
# model's scaling overflows, say): the request gets a 422 naming them, never a 500.
_VALUE_ERRORS = (ArithmeticError, ValueError, TypeError)
# Seconds a client is asked to wait after a failed write of the prediction log (a full disk or a
# busy database; either may pass).
_RETRY_AFTER_S = 10


class PredictRequest(BaseModel):
    """Body of ``POST /predict`` (documented in OpenAPI; validated against the model's spec)."""

    records: list[dict[str, Any]] = Field(
        min_length=1, description="Feature records: one object per row, every feature present."
    )


class FeedbackItem(BaseModel):
    """One ground-truth label for a record of an earlier prediction."""

    request_id: str = Field(min_length=1, description="The request_id of the /predict response.")
    index: int = Field(default=0, ge=0, description="The record's position in that request.")
    label: Any = Field(description="The true class label or value.")


class FeedbackRequest(BaseModel):
    """Body of ``POST /feedback``."""

    labels: list[FeedbackItem] = Field(min_length=1)


class FeedbackResponse(BaseModel):
    """How many labels matched a logged prediction, and which did not (yet)."""

    matched: int
    unknown: list[dict[str, Any]] = Field(
        description="Labels whose prediction is not in the log (wrong id, or not logged yet: "
        "predictions are logged within about a second)."
    )


class PredictResponse(BaseModel):
    """Body of a successful ``POST /predict``."""

    request_id: str
    model_name: str
    model_version: str
    predictions: list[Any] = Field(
        description="Per record: the predicted class label, or the predicted value (regression)."
    )
    probabilities: list[float] | list[dict[str, float]] | None = Field(
        description="Per record: the positive-class probability (binary), a class -> "
        "probability object (multiclass), or null for regression models."
    )


SingleAnswer = dict[str, Any] | Exception
"""The answer body of a single-record request, or the error that request alone answers with."""

SinglePredictor = Callable[[dict[str, Any]], Awaitable[SingleAnswer]]
"""Answers one single-record request: ``record -> answer body`` (a micro-batcher, in Ray)."""


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI of a JSON body a route reads itself (documented, not parsed by FastAPI)."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema}},
        }
    }


_FEATURE_SCHEMAS: dict[FeatureKind, dict[str, Any]] = {
    "numeric": {
        "type": ["number", "null"],
        "description": "A number a 64-bit float holds, or null (missing).",
    },
    "categorical": {"type": ["string", "null"]},
    "boolean": {"type": ["boolean", "null"]},
    "datetime": {
        "type": ["string", "null"],
        "format": "date-time",
        "maxLength": MAX_DATETIME_LENGTH,
        "description": "An ISO 8601 date or date-time from 1677-09-22 to 2262-04-11, or null "
        "(other forms pandas reads are accepted too).",
    },
}


def _predict_schema(spec: FeatureSpec, settings: ServingKnobs) -> dict[str, Any]:
    """JSON schema of the ``POST /predict`` body for this model: its features, by kind."""
    record = {
        "type": "object",
        "description": "One row: every feature (null for a missing value); the training file's "
        "other columns (its label, dropped columns) are accepted and ignored.",
        "properties": {name: _FEATURE_SCHEMAS[kind] for name, kind in spec.features.items()}
        | {name: {} for name in sorted(spec.ignored_inputs)},
        "required": list(spec.features),
        "additionalProperties": False,
    }
    schema = PredictRequest.model_json_schema()
    schema["properties"]["records"] |= {"items": record, "maxItems": settings.max_records}
    schema["additionalProperties"] = False
    return schema


def _feedback_schema(spec: FeatureSpec, settings: ServingKnobs) -> dict[str, Any]:
    """JSON schema of the ``POST /feedback`` body for this model: its indices and labels."""
    item = FeedbackItem.model_json_schema()
    item["properties"]["index"]["maximum"] = settings.max_records - 1
    item["properties"]["label"] |= (
        {"enum": list(spec.classes)} if spec.strategy.has_classes else {"type": "number"}
    )
    schema = FeedbackRequest.model_json_schema()
    del schema["$defs"]  # the item goes inline: OpenAPI resolves references from its own root
    schema["properties"]["labels"] |= {"items": item, "maxItems": settings.max_feedback_labels}
    return schema


def _document_bearer_auth(api: FastAPI) -> None:
    """Declare the bearer key in the app's OpenAPI: on every route but ``/healthz``."""
    generate = api.openapi

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            schema = generate()
            schema.setdefault("components", {})["securitySchemes"] = {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key: `Authorization: Bearer <key>`.",
                }
            }
            for path, operations in schema["paths"].items():
                if path != "/healthz":
                    for operation in operations.values():
                        operation["security"] = [{"apiKey": []}]
        return api.openapi_schema  # FastAPI's own openapi() keeps the schema it made there

    api.openapi = openapi  # type: ignore[method-assign]


def _too_large(size: int, limit: int) -> InvalidRequest:
    return InvalidRequest(
        413,
        [
            {
                "loc": ["body"],
                "msg": f"body of {size} bytes exceeds the limit of {limit}",
                "type": "too_large",
            }
        ],
    )


def _parse_body(raw: bytes, max_body_bytes: int) -> Any:
    """The records of a predict body, or an :class:`InvalidRequest` naming what is wrong with it."""
    payload = _parse_json(raw, max_body_bytes)
    if not isinstance(payload, dict) or "records" not in payload:
        raise InvalidRequest(
            422,
            [
                {
                    "loc": ["body", "records"],
                    "msg": 'body must be an object {"records": [...]}',
                    "type": "missing",
                }
            ],
        )
    extra = sorted(set(payload) - {"records"})
    if extra:
        raise InvalidRequest(
            422,
            [
                {
                    "loc": ["body", extra[0]],
                    "msg": f"unexpected field '{extra[0]}'",
                    "type": "extra_forbidden",
                }
            ],
        )
    return payload["records"]


def _json(body: dict[str, Any]) -> Response:
    """A JSON answer, encoded directly (NaN as null).

    The routes' ``response_model`` documents the answer in OpenAPI; returning a Response skips
    FastAPI's validation and re-encoding of it through that model (about 50 us per answer, a few
    percent of a single-record request).
    """
    return Response(to_json(body, inf_nan_mode="null"), media_type="application/json")


def _parse_json(raw: bytes, max_body_bytes: int) -> Any:
    """The request body as JSON, or an :class:`InvalidRequest` (413, 400) saying why not."""
    if len(raw) > max_body_bytes:
        raise _too_large(len(raw), max_body_bytes)
    try:
        # pydantic's JSON parser (Rust): the same documents as json.loads, 2-3x faster.
        return from_json(raw)
    except ValueError as error:
        raise InvalidRequest(
            400,
            [{"loc": ["body"], "msg": f"body is not valid JSON: {error}", "type": "json_invalid"}],
        ) from error


def _parse_feedback(raw: bytes, max_body_bytes: int, max_labels: int) -> list[dict[str, Any]]:
    """The labels of a feedback body, or an :class:`InvalidRequest` naming what is wrong."""
    payload = _parse_json(raw, max_body_bytes)
    labels = payload.get("labels") if isinstance(payload, dict) else None
    if isinstance(labels, list) and len(labels) > max_labels:
        raise InvalidRequest(
            413,
            [
                {
                    "loc": ["body", "labels"],
                    "msg": f"{len(labels)} labels exceed the limit of {max_labels} per request",
                    "type": "too_long",
                }
            ],
        )
    try:
        body = FeedbackRequest.model_validate(payload)
    except ValidationError as error:
        raise InvalidRequest(
            422,
            [
                {"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]}
                for e in error.errors(include_url=False, include_context=False, include_input=False)
            ],
        ) from error
    return [item.model_dump() for item in body.labels]


def _answer(
    model: ServedModel, request_id: str, predictions: list[Any], probabilities: list[Any] | None
) -> dict[str, Any]:
    """The body of a ``POST /predict`` answer (see :class:`PredictResponse`)."""
    return {
        "request_id": request_id,
        "model_name": model.name,
        "model_version": model.version,
        "predictions": predictions,
        "probabilities": probabilities,
    }


def _unscorable(error: Exception, loc: list[Any]) -> InvalidRequest:
    """The 422 of records that passed validation but that the model could not score."""
    message = f"{type(error).__name__}: {error}"
    # One line, no traceback: a client could send such records by the thousand.
    logger.warning("records passed validation but could not be scored: %s", message[:200])
    return InvalidRequest(
        422,
        [
            {
                "loc": ["body", *loc],
                "msg": f"the model cannot score these values ({message[:200]})",
                "type": "value_error",
            }
        ],
    )


def answer_singles(
    model: ServedModel, traffic: TrafficSink | None, records: list[dict[str, Any]]
) -> list[SingleAnswer]:
    """Answer many single-record requests with one model call, one answer per record.

    The records are predicted and recorded for monitoring together (each its own request id),
    and the answer is split per request: the body of a micro-batch. If that call fails, each
    record is answered on its own, so a record that cannot be scored fails its own request and
    no other: its error takes its place in the answers (a 422 :class:`InvalidRequest` when its
    values are the cause, else the exception, a server error of that request only).

    Args:
        model: the served model.
        traffic: where the predictions are recorded; ``None`` = nowhere.
        records: one checked record per request.

    Returns:
        The answer bodies or errors, in the order of ``records``.

    """
    try:
        result = model.predict(records)
    except Exception as error:
        if len(records) > 1:
            return [
                answer for record in records for answer in answer_singles(model, traffic, [record])
            ]
        if isinstance(error, _VALUE_ERRORS):
            return [_unscorable(error, ["records", 0])]
        logger.exception("a single record could not be scored")
        return [error]
    request_ids = [uuid.uuid4().hex for _ in records]
    if traffic is not None:
        traffic.record(request_ids, records, result)
    fields = model.response_fields(result)
    predictions, probabilities = fields["predictions"], fields["probabilities"]
    return [
        _answer(
            model,
            request_id,
            predictions[i : i + 1],
            None if probabilities is None else probabilities[i : i + 1],
        )
        for i, request_id in enumerate(request_ids)
    ]


def build_api(
    model: ServedModel,
    settings: ServingKnobs,
    *,
    feedback: FeedbackStore | None = None,
    traffic: TrafficSink | None = None,
    predict_single: SinglePredictor | None = None,
    api_keys: KeyDigests | None = None,
) -> FastAPI:
    """The endpoint's FastAPI app around a loaded model.

    Args:
        model: the model the routes answer with.
        settings: the request limits (``max_records``, ``max_body_bytes``).
        feedback: the prediction log ``POST /feedback`` joins labels to; ``None``: the route
            answers 404.
        traffic: where predictions are recorded for monitoring; ``None`` = nowhere.
        predict_single: answers single-record requests (Ray Serve's micro-batcher in a replica);
            ``None`` answers each on its own, the same way (:func:`answer_singles`).
        api_keys: the digests and scopes of the keys requests must present
            (:mod:`mlplatform.serving.keys`); ``None``: no keys, every route is open. With keys,
            ``GET /healthz`` answers only its status and served version to a request without a
            ``predict`` key.

    Returns:
        The app, ready for any ASGI server (Ray Serve, uvicorn, FastAPI's ``TestClient``).

    """

    async def on_its_own(record: dict[str, Any]) -> SingleAnswer:
        return answer_singles(model, traffic, [record])[0]

    answer_single = predict_single or on_its_own
    api = FastAPI(
        title="mlplatform model endpoint",
        description="Predictions from the champion model registered in MLflow.",
    )

    if api_keys:
        api.add_middleware(ApiKeyMiddleware, digests=api_keys)
        _document_bearer_auth(api)

    @api.exception_handler(InvalidRequest)
    async def _invalid_request(_: Request, error: InvalidRequest) -> JSONResponse:
        return JSONResponse(
            status_code=error.status_code, content={"detail": error.errors}, headers=error.headers
        )

    @api.post(
        "/predict",
        response_model=PredictResponse,
        openapi_extra=_json_body(_predict_schema(model.spec, settings)),
        responses={
            400: {"description": "Not JSON"},
            413: {"description": "Too large"},
            422: {"description": "Invalid records"},
        },
    )
    async def predict(request: Request) -> Response:
        """Predict the posted records: class labels with probabilities, or values."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > settings.max_body_bytes:
            raise _too_large(int(declared), settings.max_body_bytes)
        body = await request.body()
        records = check_records(
            _parse_body(body, settings.max_body_bytes), model.spec, settings.max_records
        )
        if len(records) == 1:
            answer = await answer_single(records[0])
            if isinstance(answer, Exception):
                raise answer
            return _json(answer)
        try:
            result = model.predict(records)
        except _VALUE_ERRORS as error:
            raise _unscorable(error, ["records"]) from error
        request_id = uuid.uuid4().hex
        if traffic is not None:  # the body as posted: bytes cross processes for free
            traffic.record(request_id, body, result)
        fields = model.response_fields(result)
        return _json(_answer(model, request_id, fields["predictions"], fields["probabilities"]))

    @api.post(
        "/feedback",
        response_model=FeedbackResponse,
        openapi_extra=_json_body(_feedback_schema(model.spec, settings)),
        responses={
            400: {"description": "Not JSON"},
            404: {"description": "Feedback not enabled"},
            413: {"description": "Too large"},
            422: {"description": "Invalid labels"},
            503: {"description": "The prediction log cannot be written now (Retry-After)"},
        },
    )
    async def feedback_labels(request: Request) -> dict[str, Any]:
        """Ground-truth labels for earlier predictions, joined by request id and record index."""
        if feedback is None:
            raise InvalidRequest(
                404,
                [{"loc": ["body"], "msg": "feedback is not enabled", "type": "not_enabled"}],
            )
        items = _parse_feedback(
            await request.body(), settings.max_body_bytes, settings.max_feedback_labels
        )
        check_labels(items, model.spec, settings.max_records)
        try:
            result = await asyncio.to_thread(feedback.add_labels, items)
        except ValueError as error:
            raise InvalidRequest(
                422, [{"loc": ["body", "labels"], "msg": str(error), "type": "value_error"}]
            ) from error
        except FeedbackUnavailable as error:
            logger.warning("POST /feedback: %s", error)
            raise InvalidRequest(
                503,
                [
                    {
                        "loc": ["body", "labels"],
                        "msg": "the labels cannot be stored now (the prediction log cannot be "
                        f"written: {error.__cause__}); nothing was stored, retry later",
                        "type": "unavailable",
                    }
                ],
                headers={"Retry-After": str(_RETRY_AFTER_S)},
            ) from error
        return {
            "matched": result.matched,
            "unknown": [{"request_id": rid, "index": index} for rid, index in result.unknown],
        }

    @api.get("/healthz")
    async def healthz(request: Request) -> dict[str, Any]:
        """Liveness, the served model's identity, the traffic profiler's and feedback's counters.

        ``pid`` is the answering replica's process, for an operator tracing one (its logs, its
        memory) or a test stopping one. With API keys, a request without a ``predict`` key gets
        the status and served version only: what a health check and the platform's endpoint
        sensor need, nothing else.
        """
        if api_keys and "predict" not in request.scope.get(GRANTED_SCOPES, ()):
            return {"status": "ok", "model_version": model.version}
        counters = dataclasses.asdict(await traffic.stats()) if traffic is not None else None
        return {
            "status": "ok",
            "model_name": model.name,
            "model_version": model.version,
            "pid": os.getpid(),
            "traffic": counters,
            "feedback": (
                {"failed_writes": feedback.failed_writes} if feedback is not None else None
            ),
        }

    @api.get(
        "/model/card",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/markdown": {}}}, 404: {"description": "No card"}},
    )
    async def model_card() -> PlainTextResponse:
        """The served model's card (Markdown): data, features, metrics, slices, lineage."""
        if model.card_markdown is None:
            message = f"model version {model.version} has no model card (it was not evaluated)"
            return PlainTextResponse(message, status_code=404)
        return PlainTextResponse(model.card_markdown, media_type="text/markdown")

    @api.get("/model")
    async def model_info() -> dict[str, Any]:
        """The served model's card: version, lineage, metrics, input schema, an example record."""
        return dataclasses.asdict(model.card) | {
            "uptime_s": round(time.time() - model.card.loaded_at, 1)
        }

    return api
