"""The Ray Serve application: a FastAPI ingress serving one registered MLflow model.

It takes a model URI and settings, nothing else, and imports nothing from Dagster: it can be
deployed by the platform's ``model_endpoint`` asset, by ``serve run`` or from a test.

Routes: ``POST /predict``, ``POST /feedback``, ``GET /healthz``, ``GET /model``,
``GET /model/card``, OpenAPI at ``/docs``. With ``traffic_dir`` set, every prediction is profiled
with whylogs off the request path, in a process beside the replica (see
:mod:`mlplatform.serving.recorder` and :mod:`mlplatform.serving.recording`).
"""

import asyncio
import dataclasses
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field, ValidationError
from pydantic_core import from_json, to_json
from ray import serve
from ray.serve import Application

from mlplatform.monitoring.feedback import FeedbackStore
from mlplatform.serving.loopback import bind_replica_grpc_to_loopback
from mlplatform.serving.model import ServedModel, load_served_model
from mlplatform.serving.recording import TrafficSink
from mlplatform.serving.settings import ServingSettings
from mlplatform.serving.validation import InvalidRequest, check_records


class PredictRequest(BaseModel):
    """Body of ``POST /predict`` (documented in OpenAPI; validated against the model's spec)."""

    records: list[dict[str, Any]] = Field(
        min_length=1, description="Feature records: one object per row, every feature present."
    )


class FeedbackItem(BaseModel):
    """One ground-truth label for a record of an earlier prediction."""

    request_id: str = Field(description="The request_id of the /predict response.")
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


api = FastAPI(
    title="mlplatform model endpoint",
    description="Predictions from the champion model registered in MLflow.",
)


@api.exception_handler(InvalidRequest)
async def _invalid_request(_: Request, error: InvalidRequest) -> JSONResponse:
    return JSONResponse(status_code=error.status_code, content={"detail": error.errors})


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
    """The request body as JSON, or an :class:`InvalidRequest` naming what is wrong with it."""
    if len(raw) > max_body_bytes:
        raise _too_large(len(raw), max_body_bytes)
    try:
        # pydantic's JSON parser (Rust): the same documents as json.loads, 2-3x faster.
        payload = from_json(raw)
    except ValueError as error:
        raise InvalidRequest(
            400,
            [{"loc": ["body"], "msg": f"body is not valid JSON: {error}", "type": "json_invalid"}],
        ) from error
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


def _parse_feedback(raw: bytes, max_body_bytes: int) -> list[dict[str, Any]]:
    """The labels of a feedback body, or an :class:`InvalidRequest` naming what is wrong."""
    if len(raw) > max_body_bytes:
        raise _too_large(len(raw), max_body_bytes)
    try:
        body = FeedbackRequest.model_validate_json(raw)
    except ValidationError as error:
        json_error = any(e["type"] == "json_invalid" for e in error.errors())
        raise InvalidRequest(
            400 if json_error else 422,
            [
                {"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]}
                for e in error.errors(include_url=False, include_context=False, include_input=False)
            ],
        ) from error
    return [item.model_dump() for item in body.labels]


@serve.deployment
@serve.ingress(api)
class ModelEndpoint:
    """One replica: loads the model once, answers predictions, micro-batches single records."""

    def __init__(self, settings: dict[str, Any]):
        bind_replica_grpc_to_loopback()
        self.settings = ServingSettings.model_validate(settings)
        self.model: ServedModel = load_served_model(
            self.settings.model_uri, self.settings.tracking_uri
        )
        # The batcher's queue is made on its first call, with the values set here.
        self._predict_batched.set_max_batch_size(self.settings.max_batch_size)
        self._predict_batched.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)
        self.feedback = (
            FeedbackStore(Path(self.settings.feedback_db)) if self.settings.feedback_db else None
        )
        self.traffic: TrafficSink | None = None
        if self.settings.traffic_dir:
            self.traffic = TrafficSink(
                self.settings.traffic_dir,
                self.model.name,
                self.model.version,
                self.model.spec,
                serve.get_replica_context().replica_id.unique_id,
                self.settings,
                feedback_db=self.settings.feedback_db,
            )
            self.traffic.ready()

    def __del__(self) -> None:
        # Ray Serve calls this on graceful shutdown (redeploys included): write the last window.
        if getattr(self, "traffic", None) is not None:
            self.traffic.close(timeout_s=10)

    # Batch size and wait are set per replica from the settings, in __init__.
    @serve.batch
    async def _predict_batched(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Answer many single-record requests with one model call.

        The records of the batch are predicted and recorded for monitoring together, and the
        answer is split per request.
        """
        result = self.model.predict(records)
        request_ids = [uuid.uuid4().hex for _ in records]
        if self.traffic is not None:
            self.traffic.record(request_ids, records, result)
        fields = self.model.response_fields(result)
        predictions, probabilities = fields["predictions"], fields["probabilities"]
        return [
            self._answer(
                request_id,
                predictions[i : i + 1],
                None if probabilities is None else probabilities[i : i + 1],
            )
            for i, request_id in enumerate(request_ids)
        ]

    def _answer(
        self, request_id: str, predictions: list[Any], probabilities: list[Any] | None
    ) -> dict[str, Any]:
        """The body of a ``POST /predict`` answer (see :class:`PredictResponse`)."""
        return {
            "request_id": request_id,
            "model_name": self.model.name,
            "model_version": self.model.version,
            "predictions": predictions,
            "probabilities": probabilities,
        }

    @api.post(
        "/predict",
        response_model=PredictResponse,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
            }
        },
        responses={
            400: {"description": "Not JSON"},
            413: {"description": "Too large"},
            422: {"description": "Invalid records"},
        },
    )
    async def predict(self, request: Request) -> Response:
        """Predict the posted records: class labels with probabilities, or values."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.settings.max_body_bytes:
            raise _too_large(int(declared), self.settings.max_body_bytes)
        body = await request.body()
        records = check_records(
            _parse_body(body, self.settings.max_body_bytes),
            self.model.spec,
            self.settings.max_records,
        )
        if len(records) == 1:
            return _json(await self._predict_batched(records[0]))
        result = self.model.predict(records)
        request_id = uuid.uuid4().hex
        if self.traffic is not None:  # the body as posted: bytes cross processes for free
            self.traffic.record(request_id, body, result)
        fields = self.model.response_fields(result)
        return _json(self._answer(request_id, fields["predictions"], fields["probabilities"]))

    @api.post(
        "/feedback",
        response_model=FeedbackResponse,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": FeedbackRequest.model_json_schema()}},
            }
        },
        responses={400: {"description": "Not JSON"}, 422: {"description": "Invalid labels"}},
    )
    async def feedback_labels(self, request: Request) -> dict[str, Any]:
        """Ground-truth labels for earlier predictions, joined by request id and record index."""
        if self.feedback is None:
            raise InvalidRequest(
                404,
                [{"loc": ["body"], "msg": "feedback is not enabled", "type": "not_enabled"}],
            )
        items = _parse_feedback(await request.body(), self.settings.max_body_bytes)
        try:
            result = await asyncio.to_thread(self.feedback.add_labels, items)
        except ValueError as error:
            raise InvalidRequest(
                422, [{"loc": ["body", "labels"], "msg": str(error), "type": "value_error"}]
            ) from error
        return {
            "matched": result.matched,
            "unknown": [{"request_id": rid, "index": index} for rid, index in result.unknown],
        }

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """Liveness, the served model's identity and the traffic profiler's counters."""
        traffic = (
            dataclasses.asdict(await self.traffic.stats()) if self.traffic is not None else None
        )
        return {
            "status": "ok",
            "model_name": self.model.name,
            "model_version": self.model.version,
            "traffic": traffic,
        }

    @api.get(
        "/model/card",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/markdown": {}}}, 404: {"description": "No card"}},
    )
    async def model_card(self) -> PlainTextResponse:
        """The served model's card (Markdown): data, features, metrics, slices, lineage."""
        if self.model.card_markdown is None:
            message = f"model version {self.model.version} has no model card (it was not evaluated)"
            return PlainTextResponse(message, status_code=404)
        return PlainTextResponse(self.model.card_markdown, media_type="text/markdown")

    @api.get("/model")
    async def model_info(self) -> dict[str, Any]:
        """The served model's card: version, lineage, metrics, input schema, an example record."""
        return dataclasses.asdict(self.model.card) | {
            "uptime_s": round(time.time() - self.model.card.loaded_at, 1)
        }


def build_app(args: dict[str, Any]) -> Application:
    """Typed Ray Serve app builder (``serve run mlplatform.serving.app:build_app model_uri=...``).

    Args:
        args: :class:`~mlplatform.serving.settings.ServingSettings` fields.

    Returns:
        The bound application, ready for ``serve.run``.

    """
    settings = ServingSettings.model_validate(args)
    return ModelEndpoint.options(
        num_replicas=settings.num_replicas,
        max_ongoing_requests=settings.max_ongoing_requests,
        ray_actor_options={"num_cpus": settings.replica_cpus},
        logging_config={"enable_access_log": settings.access_log},
    ).bind(settings.model_dump())
