"""The endpoint's HTTP routes, as a plain FastAPI app around a release of loaded models.

:func:`build_api` gives ``POST /predict``, ``POST /feedback``, ``GET /healthz``, ``GET /model``,
``GET /model/card`` and OpenAPI at ``/docs`` for a
:class:`~mlplatform.serving.served.ServedRelease`: the champion answers, and during a rollout the
challenger either scores every request after its answer left (shadow) or answers the requests
whose key falls in its share (canary; a challenger that fails a request hands it to the
champion, and the failure counts against it). The Ray Serve deployment
(:mod:`mlplatform.serving.app`) serves this app in every replica, swaps the release in on every
``reconfigure`` and hands the app its micro-batcher; tests serve it as is, without Ray. Given API
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
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field, ValidationError
from pydantic_core import from_json, to_json

from mlplatform.model.spec import FeatureKind, FeatureSpec
from mlplatform.monitoring.feedback import FeedbackStore, FeedbackUnavailable
from mlplatform.serving.keys import GRANTED_SCOPES, ApiKeyMiddleware, KeyDigests
from mlplatform.serving.metrics import EndpointMetrics, RequestMetricsMiddleware
from mlplatform.serving.model import ServedModel
from mlplatform.serving.release import REQUEST_KEY_HEADER
from mlplatform.serving.served import (
    ReleaseMember,
    ServedRelease,
    ShadowJob,
    ShadowScorer,
    SingleRequest,
)
from mlplatform.serving.settings import ServingKnobs
from mlplatform.serving.validation import (
    MAX_DATETIME_LENGTH,
    InvalidRequest,
    check_labels,
    check_records,
)

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

SinglePredictor = Callable[[SingleRequest], Awaitable[SingleAnswer]]
"""Answers one single-record request: ``request -> answer body`` (a micro-batcher, in Ray)."""

ReleaseSource = Callable[[], ServedRelease]
"""Gives the release to answer with now (a replica swaps a new one in on every change)."""

MODEL_VERSION_HEADER = "X-Model-Version"
"""The response header naming the model version that answered a prediction."""

MODEL_ROLE_HEADER = "X-Model-Role"
"""The response header naming that version's part in the release (champion, canary)."""


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


def _json(body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    """A JSON answer, encoded directly (NaN as null).

    The routes' ``response_model`` documents the answer in OpenAPI; returning a Response skips
    FastAPI's validation and re-encoding of it through that model (about 50 us per answer, a few
    percent of a single-record request).
    """
    return Response(
        to_json(body, inf_nan_mode="null"), media_type="application/json", headers=headers
    )


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
    served: ServedRelease, requests: list[SingleRequest], shadow: ShadowScorer | None = None
) -> list[SingleAnswer]:
    """Answer many single-record requests with one model call per answering version.

    Each request is answered by the version its key assigns it to (the challenger only in
    canary). The records of one version are predicted and recorded for monitoring together
    (each its own request id), and the answer is split per request: the body of a micro-batch.
    If that call fails, each record is answered on its own, so a record that cannot be scored
    fails its own request and no other: its error takes its place in the answers (a 422
    :class:`InvalidRequest` when its values are the cause, else the exception, a server error of
    that request only). A request the challenger fails is answered by the champion instead.
    In shadow, the records the champion answered go to ``shadow`` for the challenger.

    Args:
        served: the release to answer with.
        requests: one checked record per request.
        shadow: scores the challenger in shadow off the answer's path; ``None``: not at all.

    Returns:
        The answer bodies or errors, in the order of ``requests``.

    """
    answers: list[SingleAnswer | None] = [None] * len(requests)
    by_member: dict[int, tuple[ReleaseMember, list[int]]] = {}
    for position, request in enumerate(requests):
        member = served.answering(request.key)
        by_member.setdefault(id(member), (member, []))[1].append(position)
    for member, positions in by_member.values():
        group = [requests[position] for position in positions]
        for position, answer in zip(positions, _answer_with(member, group), strict=True):
            answers[position] = answer
        if member is not served.champion:
            failed = [p for p in positions if isinstance(answers[p], Exception)]
            fallback = _answer_with(served.champion, [requests[p] for p in failed])
            for position, answer in zip(failed, fallback, strict=True):
                answers[position] = answer
    if shadow is not None and served.shadow is not None:
        answered = [r for r, a in zip(requests, answers, strict=True) if isinstance(a, dict)]
        if answered:
            shadow.submit(
                ShadowJob(
                    served.shadow,
                    [r.request_id for r in answered],
                    [r.record for r in answered],
                    len(answered),
                )
            )
    return answers  # type: ignore[return-value]  # every position was answered


def _answer_with(member: ReleaseMember, requests: list[SingleRequest]) -> list[SingleAnswer]:
    """One version's answers to single-record requests (see :func:`answer_singles`)."""
    if not requests:
        return []
    records = [request.record for request in requests]
    started = time.perf_counter()
    try:
        result = member.model.predict(records)
    except Exception as error:
        if len(requests) > 1:
            return [answer for request in requests for answer in _answer_with(member, [request])]
        member.count(1, 1, time.perf_counter() - started)
        if isinstance(error, _VALUE_ERRORS):
            return [_unscorable(error, ["records", 0])]
        logger.exception("v%s could not score a single record", member.version)
        return [error]
    member.count(len(requests), 0, time.perf_counter() - started)
    request_ids = [request.request_id for request in requests]
    if member.traffic is not None:
        member.traffic.record(request_ids, records, result)
    fields = member.model.response_fields(result)
    predictions, probabilities = fields["predictions"], fields["probabilities"]
    member.observe(predictions, probabilities)
    return [
        _answer(
            member.model,
            request_id,
            predictions[i : i + 1],
            None if probabilities is None else probabilities[i : i + 1],
        )
        for i, request_id in enumerate(request_ids)
    ]


def _release_source(serving: ServedModel | ServedRelease | ReleaseSource) -> ReleaseSource:
    """Whatever the app is given to answer with, as a function giving the release now."""
    if isinstance(serving, ServedModel):
        serving = ServedRelease.of(serving)
    if isinstance(serving, ServedRelease):
        fixed = serving
        return lambda: fixed
    return serving


def build_api(
    serving: ServedModel | ServedRelease | ReleaseSource,
    settings: ServingKnobs,
    *,
    feedback: FeedbackStore | None = None,
    predict_single: SinglePredictor | None = None,
    api_keys: KeyDigests | None = None,
    shadow: ShadowScorer | None = None,
    metrics: EndpointMetrics | None = None,
) -> FastAPI:
    """The endpoint's FastAPI app around a release of loaded models.

    Args:
        serving: what the routes answer with: one model, a release, or a function giving the
            release now (read once per request: a replica swaps in a new one on every change).
        settings: the request limits (``max_records``, ``max_body_bytes``).
        feedback: the prediction log ``POST /feedback`` joins labels to; ``None``: the route
            answers 404.
        predict_single: answers single-record requests (Ray Serve's micro-batcher in a replica);
            ``None`` answers each on its own, the same way (:func:`answer_singles`).
        api_keys: the digests and scopes of the keys requests must present
            (:mod:`mlplatform.serving.keys`); ``None``: no keys, every route is open. With keys,
            ``GET /healthz`` answers only its status and release to a request without a
            ``predict`` key.
        shadow: scores a challenger in shadow off the answer's path; ``None``: a scorer of the
            app's own.
        metrics: where ``POST /predict`` requests are counted for Prometheus, by the version
            and role their answer names (:mod:`mlplatform.serving.metrics`; the members of the
            release count their predictions); ``None``: nowhere.

    Returns:
        The app, ready for any ASGI server (Ray Serve, uvicorn, FastAPI's ``TestClient``).

    """
    current = _release_source(serving)
    shadow = shadow or ShadowScorer()

    async def on_its_own(request: SingleRequest) -> SingleAnswer:
        return answer_singles(current(), [request], shadow)[0]

    answer_single = predict_single or on_its_own
    api = FastAPI(
        title="mlplatform model endpoint",
        description="Predictions from the champion model registered in MLflow (and, during a "
        "rollout, its challenger).",
    )

    if api_keys:
        api.add_middleware(ApiKeyMiddleware, digests=api_keys)
    if metrics is not None:  # added last: outermost, so refused keys count too

        def champion() -> str:
            return current().champion.version

        api.add_middleware(RequestMetricsMiddleware, metrics=metrics, champion=champion)
    _document_request_bodies(api, current, settings, bearer_auth=bool(api_keys))

    @api.exception_handler(InvalidRequest)
    async def _invalid_request(_: Request, error: InvalidRequest) -> JSONResponse:
        return JSONResponse(
            status_code=error.status_code, content={"detail": error.errors}, headers=error.headers
        )

    @api.post(
        "/predict",
        response_model=PredictResponse,
        openapi_extra=_json_body({}),
        responses={
            400: {"description": "Not JSON"},
            413: {"description": "Too large"},
            422: {"description": "Invalid records"},
        },
    )
    async def predict(request: Request) -> Response:
        """Predict the posted records: class labels with probabilities, or values.

        During a canary, the ``X-Request-Key`` header (a user or session id) decides which
        version answers, the same one for the same key; without it, the request id does.
        """
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > settings.max_body_bytes:
            raise _too_large(int(declared), settings.max_body_bytes)
        body = await request.body()
        served = current()
        records = check_records(
            _parse_body(body, settings.max_body_bytes),
            served.champion.model.spec,
            settings.max_records,
        )
        request_id = uuid.uuid4().hex
        key = request.headers.get(REQUEST_KEY_HEADER) or request_id
        if len(records) == 1:
            answer = await answer_single(SingleRequest(records[0], request_id, key))
            if isinstance(answer, Exception):
                raise answer
        else:
            answer = _answer_many(served, served.answering(key), request_id, records, body, shadow)
        version = answer["model_version"]
        return _json(
            answer,
            {MODEL_VERSION_HEADER: version, MODEL_ROLE_HEADER: served.role_of(version)},
        )

    @api.post(
        "/feedback",
        response_model=FeedbackResponse,
        openapi_extra=_json_body({}),
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
        check_labels(items, current().champion.model.spec, settings.max_records)
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
        """Liveness, the release (versions, stage, share), recorders' and feedback's counters.

        ``model_version`` is the champion's. ``pid`` is the answering replica's process, for an
        operator tracing one (its logs, its memory) or a test stopping one. With API keys, a
        request without a ``predict`` key gets the status and the release only: what a health
        check and the platform's endpoint sensor need, nothing else.
        """
        served = current()
        summary = {
            "status": "ok",
            "model_version": served.champion.version,
            "release": served.release.model_dump(),
        }
        if api_keys and "predict" not in request.scope.get(GRANTED_SCOPES, ()):
            return summary
        return summary | {
            "model_name": served.champion.model.name,
            "pid": os.getpid(),
            "traffic": await _traffic_counters(served.champion),
            "versions": [
                {
                    "version": member.version,
                    "role": member.role,
                    "traffic": await _traffic_counters(member),
                }
                for member in served.members
            ],
            "shadow": dataclasses.asdict(shadow.stats),
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
        """The champion's model card (Markdown): data, features, metrics, slices, lineage."""
        model = current().champion.model
        if model.card_markdown is None:
            message = f"model version {model.version} has no model card (it was not evaluated)"
            return PlainTextResponse(message, status_code=404)
        return PlainTextResponse(model.card_markdown, media_type="text/markdown")

    @api.get("/model")
    async def model_info() -> dict[str, Any]:
        """The champion's card: version, lineage, metrics, input schema, an example record."""
        card = current().champion.model.card
        return dataclasses.asdict(card) | {"uptime_s": round(time.time() - card.loaded_at, 1)}

    return api


def _answer_many(
    served: ServedRelease,
    member: ReleaseMember,
    request_id: str,
    records: list[dict[str, Any]],
    body: bytes,
    shadow: ShadowScorer,
) -> dict[str, Any]:
    """The answer of ``member`` to a request of several records, in one model call.

    A challenger that cannot score them hands them to the champion (counted as its failure).

    Raises:
        InvalidRequest: 422 when the champion cannot score these values.

    """
    started = time.perf_counter()
    try:
        result = member.model.predict(records)
    except Exception as error:
        member.count(1, 1, time.perf_counter() - started)
        if member is not served.champion:
            return _answer_many(served, served.champion, request_id, records, body, shadow)
        if isinstance(error, _VALUE_ERRORS):
            raise _unscorable(error, ["records"]) from error
        raise
    member.count(1, 0, time.perf_counter() - started)
    if member.traffic is not None:  # the body as posted: bytes cross processes for free
        member.traffic.record(request_id, body, result)
    if served.shadow is not None:
        shadow.submit(ShadowJob(served.shadow, request_id, records, 1))
    fields = member.model.response_fields(result)
    member.observe(fields["predictions"], fields["probabilities"])
    return _answer(member.model, request_id, fields["predictions"], fields["probabilities"])


async def _traffic_counters(member: ReleaseMember) -> dict[str, Any] | None:
    """A member's traffic recording counters (``None`` when it records nothing)."""
    if member.traffic is None:
        return None
    return dataclasses.asdict(await member.traffic.stats())


def _document_request_bodies(
    api: FastAPI, current: ReleaseSource, settings: ServingKnobs, *, bearer_auth: bool
) -> None:
    """OpenAPI with the bodies of the champion served now (and the bearer key, if required).

    The routes read their bodies themselves; the schema of their records and labels is the
    champion's feature spec, which changes with the release, so it is filled in when the
    schema is asked for, and made anew when the champion changed.
    """
    generate = api.openapi
    made_for: list[str] = []

    def openapi() -> dict[str, Any]:
        champion = current().champion.model
        if api.openapi_schema is None or made_for != [champion.version]:
            api.openapi_schema = None
            schema = generate()
            paths = schema["paths"]
            paths["/predict"]["post"] |= _json_body(_predict_schema(champion.spec, settings))
            paths["/feedback"]["post"] |= _json_body(_feedback_schema(champion.spec, settings))
            if bearer_auth:
                _require_bearer(schema)
            made_for[:] = [champion.version]
        return api.openapi_schema  # FastAPI's own openapi() keeps the schema it made there

    api.openapi = openapi  # type: ignore[method-assign]


def _require_bearer(schema: dict[str, Any]) -> None:
    """Declare the bearer key in an OpenAPI schema: on every route but ``/healthz``."""
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
