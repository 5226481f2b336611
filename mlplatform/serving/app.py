"""The Ray Serve application: the endpoint's routes in replicas serving one registered MLflow model.

It takes a model URI and settings (:class:`~mlplatform.serving.settings.ServingSettings`),
nothing else, and imports nothing from Dagster: it can be deployed by the platform's
``model_endpoint`` asset, by ``serve run`` or from a test. The routes themselves are a plain
FastAPI app (:func:`mlplatform.serving.routes.build_api`) that each replica builds around the
model it loaded, with Ray Serve's micro-batching for single records. With ``traffic_dir`` set,
every prediction is profiled with whylogs off the request path, in a process beside the replica
(see :mod:`mlplatform.serving.recorder` and :mod:`mlplatform.serving.recording`).
"""

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from mlplatform.monitoring.feedback import FeedbackStore
from mlplatform.serving.keys import KeyDigests
from mlplatform.serving.loopback import bind_replica_grpc_to_loopback
from mlplatform.serving.model import ServedModel, load_served_model
from mlplatform.serving.recording import TrafficSink
from mlplatform.serving.routes import SingleAnswer, answer_singles, build_api
from mlplatform.serving.settings import ServingSettings


@serve.deployment
@serve.ingress()  # the app is built per replica, around its model: __serve_build_asgi_app__
class ModelEndpoint:
    """One replica: loads the model once, serves the routes, micro-batches single records."""

    def __init__(self, settings: dict[str, Any], api_keys: KeyDigests | None = None):
        bind_replica_grpc_to_loopback()
        self.settings = ServingSettings.model_validate(settings)
        # Digests only: the keys themselves never leave the driver.
        self.api_keys = api_keys
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

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The routes around this replica's model (Ray Serve calls it after ``__init__``)."""
        return build_api(
            self.model,
            self.settings,
            feedback=self.feedback,
            traffic=self.traffic,
            predict_single=self._predict_batched,
            api_keys=self.api_keys,
        )

    def __del__(self) -> None:
        # Ray Serve calls this on graceful shutdown (redeploys included): write the last window.
        if getattr(self, "traffic", None) is not None:
            self.traffic.close(timeout_s=10)

    # Batch size and wait are set per replica from the settings, in __init__.
    @serve.batch
    async def _predict_batched(self, records: list[dict[str, Any]]) -> list[SingleAnswer]:
        """Answer the single-record requests waiting together with one model call.

        A request's own error is its answer, not raised: Ray Serve would fail every request of
        the batch with it, while the route raises it for that request alone.
        """
        return answer_singles(self.model, self.traffic, records)


def build_app(args: dict[str, Any], api_keys: KeyDigests | None = None) -> Application:
    """Typed Ray Serve app builder (``serve run mlplatform.serving.app:build_app model_uri=...``).

    Args:
        args: :class:`~mlplatform.serving.settings.ServingSettings` fields.
        api_keys: digests and scopes of the keys requests must present
            (:func:`mlplatform.serving.keys.key_digests`); ``None``: an open endpoint.

    Returns:
        The bound application, ready for ``serve.run``.

    """
    settings = ServingSettings.model_validate(args)
    return ModelEndpoint.options(
        num_replicas=settings.num_replicas,
        max_ongoing_requests=settings.max_ongoing_requests,
        ray_actor_options={"num_cpus": settings.replica_cpus},
        logging_config={"enable_access_log": settings.access_log},
    ).bind(settings.model_dump(), api_keys)
