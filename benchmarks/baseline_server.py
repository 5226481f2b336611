"""The comparison point for the endpoint: a plain FastAPI + uvicorn server, one worker, no Ray.

It serves the same registered model (the MLflow model's TabularModel, loaded as the endpoint loads
it), with the same ``POST /predict`` request and response JSON, the same validation function
(:func:`mlplatform.serving.validation.check_records`), the same model call
(:meth:`mlplatform.serving.model.ServedModel.predict`) and the same micro-batching of
single-record requests (up to ``--max-batch-size`` records, waiting at most ``--batch-wait-s``):
one model call costs milliseconds whatever its size, so without batching neither server would
answer more than a few hundred single records a second. ``--no-batching`` predicts each request on
its own, for reference.

    python benchmarks/baseline_server.py --model-uri models:/mlplatform@champion \
        --tracking-uri sqlite:///.mlplatform/mlflow/mlflow.db --port 8100
"""

import argparse
import asyncio
import contextlib
import json
import uuid
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from mlplatform.serving.model import ServedModel, load_served_model
from mlplatform.serving.validation import InvalidRequest, check_records
from mlplatform.tasks.base import ModelOutput

LOOPBACK = "127.0.0.1"


class MicroBatcher:
    """Collects single records for up to ``wait_s`` (at most ``max_size``), predicts once."""

    def __init__(self, model: ServedModel, max_size: int, wait_s: float):
        self.model, self.max_size, self.wait_s = model, max_size, wait_s
        self.pending: list[tuple[dict[str, Any], asyncio.Future]] = []
        self.arrived = asyncio.Event()  # something is pending
        self.full = asyncio.Event()  # a whole batch is pending
        self.task: asyncio.Task | None = None

    async def predict(self, record: dict[str, Any]) -> ModelOutput:
        """The prediction for one record, computed with whatever else is waiting."""
        loop = asyncio.get_running_loop()
        if self.task is None:
            self.task = loop.create_task(self._run())
        future = loop.create_future()
        self.pending.append((record, future))
        self.arrived.set()
        if len(self.pending) >= self.max_size:
            self.full.set()
        return await future

    async def _run(self) -> None:
        while True:
            await self.arrived.wait()
            if len(self.pending) < self.max_size:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.full.wait(), self.wait_s)
            batch, self.pending = self.pending[: self.max_size], self.pending[self.max_size :]
            if not self.pending:
                self.arrived.clear()
            if len(self.pending) < self.max_size:
                self.full.clear()
            try:
                result = self.model.predict([record for record, _ in batch])
            except Exception as error:  # every waiter gets the model's error
                for _, future in batch:
                    future.set_exception(error)
                continue
            for index, (_, future) in enumerate(batch):
                future.set_result(result.rows(index, index + 1))


def build_server(model: ServedModel, max_batch_size: int, batch_wait_s: float | None) -> FastAPI:
    """The FastAPI app: ``POST /predict`` and ``GET /healthz``, as the endpoint answers them."""
    api = FastAPI(title="baseline model server")
    batcher = (
        MicroBatcher(model, max_batch_size, batch_wait_s) if batch_wait_s is not None else None
    )

    @api.exception_handler(InvalidRequest)
    async def invalid(_: Request, error: InvalidRequest) -> JSONResponse:
        return JSONResponse(status_code=error.status_code, content={"detail": error.errors})

    @api.post("/predict")
    async def predict(request: Request) -> Response:
        try:
            payload = json.loads(await request.body())
        except ValueError as error:
            raise InvalidRequest(400, [{"loc": ["body"], "msg": str(error)}]) from error
        if not isinstance(payload, dict) or set(payload) != {"records"}:
            raise InvalidRequest(422, [{"loc": ["body"], "msg": 'expected {"records": [...]}'}])
        records = check_records(payload["records"], model.spec, 10_000)
        if batcher is not None and len(records) == 1:
            result = await batcher.predict(records[0])
        else:
            result = model.predict(records)
        body: dict[str, Any] = {
            "request_id": uuid.uuid4().hex,
            "model_name": model.name,
            "model_version": model.version,
            **model.response_fields(result),
        }
        return Response(json.dumps(body), media_type="application/json")

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "model_name": model.name, "model_version": model.version}

    return api


def main() -> None:
    """Load the model and serve it until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", default="models:/mlplatform@champion")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--batch-wait-s", type=float, default=0.0)
    parser.add_argument("--no-batching", action="store_true", help="predict each request alone")
    args = parser.parse_args()
    model = load_served_model(args.model_uri, args.tracking_uri)
    api = build_server(model, args.max_batch_size, None if args.no_batching else args.batch_wait_s)
    uvicorn.run(
        api, host=LOOPBACK, port=args.port, workers=1, access_log=False, log_level="warning"
    )


if __name__ == "__main__":
    main()
