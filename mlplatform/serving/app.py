"""The Ray Serve application: the endpoint's routes in replicas serving a release of MLflow models.

It takes settings (:class:`~mlplatform.serving.settings.ServingSettings`) and, as its
``user_config``, the :class:`~mlplatform.serving.release.Release` to serve (the champion and,
during a rollout, a challenger with its stage and share), nothing else, and imports nothing from
Dagster: it can be deployed by the platform's ``model_endpoint`` asset, by ``serve run`` (one
model, ``model_uri=...``) or from a test. A change of the release reaches the running replicas
through ``reconfigure``: models not loaded yet are loaded beside the ones serving, then the new
release is swapped in whole; no replica restarts and no request fails. The routes themselves
are a plain FastAPI app (:func:`mlplatform.serving.routes.build_api`) with Ray Serve's
micro-batching for single records. With ``traffic_dir`` set, every version's predictions are
profiled with whylogs off the request path, in a process beside the replica (see
:mod:`mlplatform.serving.recorder` and :mod:`mlplatform.serving.recording`), and during a
rollout the replica writes each version's live evidence (:mod:`mlplatform.monitoring.evidence`).
"""

import asyncio
import copy
import functools
import hashlib
import json
import logging
import threading
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from mlplatform.monitoring.drift_summary import drift_summary_path
from mlplatform.monitoring.evidence import VersionCounts, write_counts
from mlplatform.monitoring.feedback import FeedbackStore
from mlplatform.serving.keys import KeyDigests
from mlplatform.serving.loopback import bind_replica_grpc_to_loopback
from mlplatform.serving.metrics import EndpointMetrics
from mlplatform.serving.model import ServedModel, load_served_model
from mlplatform.serving.recording import TrafficSink
from mlplatform.serving.release import Release
from mlplatform.serving.routes import SingleAnswer, answer_singles, build_api
from mlplatform.serving.served import (
    ReleaseMember,
    Role,
    ServedRelease,
    ShadowScorer,
    SingleRequest,
)
from mlplatform.serving.settings import ServingSettings

logger = logging.getLogger(__name__)

EVIDENCE_INTERVAL_S = 2.0
"""Seconds between two writes of a replica's rollout evidence (what a killed replica may lose)."""


@serve.deployment
@serve.ingress()  # the app is built per replica, around its release: __serve_build_asgi_app__
class ModelEndpoint:
    """One replica: loads the release's models, serves the routes, micro-batches single records."""

    def __init__(self, settings: dict[str, Any], api_keys: KeyDigests | None = None):
        bind_replica_grpc_to_loopback()
        self.settings = ServingSettings.model_validate(settings)
        # Digests only: the keys themselves never leave the driver.
        self.api_keys = api_keys
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.models: dict[str, ServedModel] = {}
        self.sinks: dict[tuple[str, bool], TrafficSink] = {}
        self.counts: dict[tuple[str, str, str], VersionCounts] = {}
        self._written: dict[tuple[str, str, str], tuple[int, int]] = {}
        self.served: ServedRelease | None = None
        self.shadow = ShadowScorer()
        self.feedback = (
            FeedbackStore(Path(self.settings.feedback_db)) if self.settings.feedback_db else None
        )
        # The batcher's queue is made on its first call, with the values set here.
        self._predict_batched.set_max_batch_size(self.settings.max_batch_size)
        self._predict_batched.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)
        self._closed = threading.Event()
        model = None
        if self.settings.model_uri:  # one model, as `serve run ... model_uri=...` asks
            model = load_served_model(self.settings.model_uri, self.settings.tracking_uri)
            self.models[model.version] = model
        self.model_name = model.name if model else str(self.settings.model_name)
        self.metrics = self._start_metrics()
        if model is not None:
            self.served = self._assemble(Release(champion=model.version))
            self.metrics.set_release(self.served.release)
        threading.Thread(target=self._write_evidence_every, name="evidence", daemon=True).start()

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve a new release: load what it adds beside what serves, then swap it in whole.

        Ray Serve calls this after ``__init__`` and whenever only the ``user_config`` changed:
        the replica keeps running and answering with the release before until the swap.
        """
        release = Release.model_validate(user_config)
        served = await asyncio.to_thread(self._prepare, release)
        before, self.served = self.served, served
        self.metrics.set_release(release)
        if before is not None:
            retired = set(self.sinks) - {self._sink_key(m) for m in served.members}
            sinks = [self.sinks.pop(key) for key in retired]
            for version in set(self.models) - set(release.versions):
                del self.models[version]
            threading.Thread(target=self._retire, args=(sinks,), daemon=True).start()
        logger.info("serving %s", release)

    def _prepare(self, release: Release) -> ServedRelease:
        """Load the release's models that are not loaded yet and start their recorders."""
        for version in release.versions:
            if version not in self.models:
                self.models[version] = load_served_model(
                    f"models:/{self.model_name}/{version}", self.settings.tracking_uri
                )
        return self._assemble(release)

    def _assemble(self, release: Release) -> ServedRelease:
        """The release's members from the loaded models, their recorders and their counts."""
        champion = self._member(release, release.champion, "champion")
        challenger = None
        if release.challenger is not None and release.stage is not None:
            challenger = self._member(release, release.challenger, release.stage)
        return ServedRelease(release, champion, challenger)

    def _member(self, release: Release, version: str, role: Role) -> ReleaseMember:
        model = self.models[version]
        counts = None
        if release.rollout_id is not None and release.stage is not None:
            key = (release.rollout_id, release.stage, version)
            counts = self.counts.setdefault(key, VersionCounts())
        member = ReleaseMember(model, role, counts=counts, metrics=self.metrics)
        member.traffic = self._sink(member)
        return member

    def _start_metrics(self) -> EndpointMetrics:
        """The replica's Prometheus metrics, with the latest drift and the profilers' counters."""
        traffic_dir = self.settings.traffic_dir
        metrics = EndpointMetrics(
            self.model_name,
            drift_file=drift_summary_path(traffic_dir, self.model_name) if traffic_dir else None,
        )

        def profilers() -> None:
            for member in self.served.members if self.served is not None else ():
                if member.traffic is not None:
                    metrics.set_traffic(
                        member.version, member.role, member.traffic.current_status()
                    )

        metrics.add_collector(profilers)
        return metrics.start()

    @staticmethod
    def _sink_key(member: ReleaseMember) -> tuple[str, bool]:
        """A version's recorder: one for its answers, another for its scores in shadow."""
        return member.version, member.role == "shadow"

    def _sink(self, member: ReleaseMember) -> TrafficSink | None:
        """The member's recorder, started if it has none yet (``None``: no traffic profiling)."""
        if not self.settings.traffic_dir:
            return None
        key = self._sink_key(member)
        if key not in self.sinks:
            version, shadow = key
            sink = TrafficSink(
                self.settings.traffic_dir,
                member.model.name,
                version,
                member.model.spec,
                f"{self.replica_id}-v{version}{'-shadow' if shadow else ''}",
                self.settings,
                feedback_db=self.settings.feedback_db,
                shadow=shadow,
            )
            sink.ready()
            self.sinks[key] = sink
        return self.sinks[key]

    def _retire(self, sinks: list[TrafficSink]) -> None:
        """Write the evidence of stages that ended; close recorders the release no longer uses."""
        self._write_evidence()
        served = self.served
        current = {
            key for key in self.counts if served is not None and key[0] == served.release.rollout_id
        }
        for key in set(self.counts) - current:
            self.counts.pop(key, None)
            self._written.pop(key, None)
        for sink in sinks:
            sink.close(timeout_s=10)

    def _write_evidence_every(self) -> None:
        while not self._closed.wait(EVIDENCE_INTERVAL_S):
            self._write_evidence()

    def _write_evidence(self) -> None:
        """Write this replica's rollout counts (every version, every stage it counted)."""
        if not self.settings.traffic_dir:
            return
        for key, counts in list(self.counts.items()):
            rollout_id, stage, version = key
            if self._written.get(key) == (counts.requests, counts.errors):
                continue
            try:
                write_counts(
                    Path(self.settings.traffic_dir),
                    self.model_name,
                    rollout_id,
                    stage,
                    version,
                    self.replica_id,
                    copy.deepcopy(counts),
                )
                self._written[key] = (counts.requests, counts.errors)
            except OSError as error:
                logger.warning("rollout evidence of v%s not written: %s", version, error)

    def current(self) -> ServedRelease:
        """The release this replica answers with now."""
        if self.served is None:
            raise RuntimeError("this replica has no release to serve yet")
        return self.served

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The routes around this replica's release (Ray Serve calls it after ``__init__``)."""
        return build_api(
            self.current,
            self.settings,
            feedback=self.feedback,
            predict_single=self._predict_batched,
            api_keys=self.api_keys,
            shadow=self.shadow,
            metrics=self.metrics,
        )

    def __del__(self) -> None:
        # Ray Serve calls this on graceful shutdown (redeploys included): write the last window
        # of every recorder and the last evidence.
        if getattr(self, "_closed", None) is None:
            return
        self._closed.set()
        self.shadow.wait_idle(timeout_s=5)
        self._retire(list(self.sinks.values()))
        if getattr(self, "metrics", None) is not None:  # None: __init__ failed before it
            self.metrics.close()

    # Batch size and wait are set per replica from the settings, in __init__.
    @serve.batch
    async def _predict_batched(self, requests: list[SingleRequest]) -> list[SingleAnswer]:
        """Answer the single-record requests waiting together, one model call per version.

        A request's own error is its answer, not raised: Ray Serve would fail every request of
        the batch with it, while the route raises it for that request alone.
        """
        return answer_singles(self.current(), requests, self.shadow)


@functools.cache
def _source_digest() -> str:
    """A digest of the platform's source: replicas run new code after it changed."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def deployment_version(settings: ServingSettings, api_keys: KeyDigests | None) -> str:
    """The deployment's code version: the same for the same code, settings and keys.

    Ray Serve restarts a deployment's replicas when its code version changes, and only
    reconfigures them (``user_config``) when nothing else did. Without a version of ours each
    deploy gets a random one and every change of the release would restart every replica; a
    version that ignored the settings or keys would leave replicas running with old ones (Ray
    does not compare constructor arguments).
    """
    identity = json.dumps(
        [settings.model_dump(mode="json"), api_keys, _source_digest()], sort_keys=True, default=str
    )
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def build_app(
    args: dict[str, Any], api_keys: KeyDigests | None = None, release: Release | None = None
) -> Application:
    """Typed Ray Serve app builder (``serve run mlplatform.serving.app:build_app model_uri=...``).

    Args:
        args: :class:`~mlplatform.serving.settings.ServingSettings` fields.
        api_keys: digests and scopes of the keys requests must present
            (:func:`mlplatform.serving.keys.key_digests`); ``None``: an open endpoint.
        release: the release to serve, as the deployment's ``user_config`` (with
            ``model_name``); ``None``: the one model of ``model_uri``.

    Returns:
        The bound application, ready for ``serve.run``.

    """
    settings = ServingSettings.model_validate(args)
    options: dict[str, Any] = {}
    if release is not None:
        options["user_config"] = release.model_dump()
    return ModelEndpoint.options(
        num_replicas=settings.num_replicas,
        max_ongoing_requests=settings.max_ongoing_requests,
        ray_actor_options={"num_cpus": settings.replica_cpus},
        logging_config={"enable_access_log": settings.access_log},
        # Ray 2.60 keeps `version` for its own use (`_internal`); see mlplatform.serving.
        version=deployment_version(settings, api_keys),
        _internal=True,
        **options,
    ).bind(settings.model_dump(), api_keys)
