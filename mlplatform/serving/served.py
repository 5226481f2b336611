"""A release as a replica serves it: the loaded models, their roles, recorders and counts.

:class:`ServedRelease` is what the routes answer with: the champion and, during a rollout, the
challenger, each a :class:`ReleaseMember` (the loaded model, its role, where its predictions are
recorded and the rollout evidence it counts). A replica builds a new one for every change of
the release (Ray Serve's ``reconfigure``) and swaps it in whole, so a request sees one release
from start to end. :class:`ShadowScorer` scores requests with a challenger in shadow on a
thread of its own, after their answers left.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from mlplatform.monitoring.evidence import VersionCounts
from mlplatform.serving.model import ServedModel
from mlplatform.serving.release import Release

if TYPE_CHECKING:  # the sink runs a Ray actor; the routes need only its record method
    from mlplatform.serving.metrics import EndpointMetrics
    from mlplatform.serving.recording import TrafficSink

logger = logging.getLogger(__name__)

Role = Literal["champion", "shadow", "canary"]
"""A version's part in the release: the champion, or the challenger's stage."""


class SingleRequest(NamedTuple):
    """A one-record ``POST /predict`` on its way to the micro-batcher.

    Attributes:
        record: the validated record.
        request_id: the id its answer carries.
        key: what assigns it to a version in canary (``X-Request-Key``, else the request id).

    """

    record: dict[str, Any]
    request_id: str
    key: str


@dataclasses.dataclass(eq=False)
class ReleaseMember:
    """One version of the release in this replica.

    Attributes:
        model: the loaded model.
        role: ``champion``, ``shadow`` or ``canary``.
        traffic: where its predictions are recorded (profiles, prediction log); ``None``: nowhere.
        counts: the rollout evidence it counts in the current stage; ``None`` outside a rollout.
        metrics: where its predictions are counted for Prometheus; ``None``: nowhere.

    """

    model: ServedModel
    role: Role
    traffic: TrafficSink | None = None
    counts: VersionCounts | None = None
    metrics: EndpointMetrics | None = None
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    @property
    def version(self) -> str:
        """The member's model version."""
        return self.model.version

    def count(self, requests: int, errors: int, seconds: float) -> None:
        """Count requests scored together in ``seconds`` (``errors`` of them failed)."""
        if self.counts is not None:
            with self._lock:
                self.counts.add(requests, errors, seconds * 1000)

    def observe(self, predictions: list[Any], probabilities: list[Any] | None) -> None:
        """Count predictions for Prometheus, as the endpoint answers them (see ``metrics``)."""
        if self.metrics is not None:
            self.metrics.observe_predictions(self.version, self.role, predictions, probabilities)


@dataclasses.dataclass(frozen=True)
class ServedRelease:
    """The release a replica answers with: the champion and, in a rollout, the challenger."""

    release: Release
    champion: ReleaseMember
    challenger: ReleaseMember | None = None

    @classmethod
    def of(cls, model: ServedModel, traffic: TrafficSink | None = None) -> ServedRelease:
        """A release of one model and no rollout (a standalone app, a test)."""
        return cls(Release(champion=model.version), ReleaseMember(model, "champion", traffic))

    def answering(self, key: str) -> ReleaseMember:
        """The member that answers a request with this key (the challenger only in canary)."""
        if (
            self.challenger is not None
            and self.release.answering_version(key) != self.champion.version
        ):
            return self.challenger
        return self.champion

    @property
    def shadow(self) -> ReleaseMember | None:
        """The challenger when it scores every request beside the champion."""
        return self.challenger if self.release.shadowed else None

    @property
    def members(self) -> tuple[ReleaseMember, ...]:
        """The champion, then the challenger if there is one."""
        return (self.champion,) if self.challenger is None else (self.champion, self.challenger)

    def role_of(self, version: str) -> Role:
        """The part ``version`` plays in this release (``champion`` for any other version)."""
        if self.challenger is not None and version == self.challenger.version:
            return self.challenger.role
        return "champion"


@dataclasses.dataclass(frozen=True)
class ShadowJob:
    """Records the champion answered, to be scored by the challenger in shadow.

    Attributes:
        member: the challenger.
        request_ids: the request's id (its records 0..n-1), or one id per one-record request.
        records: the validated records.
        requests: how many requests they are.

    """

    member: ReleaseMember
    request_ids: str | list[str]
    records: list[dict[str, Any]]
    requests: int


@dataclasses.dataclass
class ShadowStats:
    """What the shadow scorer did: requests scored, records failed, requests dropped."""

    scored_requests: int = 0
    failed_records: int = 0
    dropped_requests: int = 0


class ShadowScorer:
    """Scores shadow jobs on a thread of its own: the answer never waits for the challenger.

    Each job is one model call of the champion's (a micro-batch, or one request's records), so
    the two versions' scoring latencies compare like for like. At most ``max_queued`` jobs
    wait; more are dropped and counted (the rollout then has less evidence, never a slower
    endpoint).
    """

    def __init__(self, max_queued: int = 1000):
        self._jobs: collections.deque[ShadowJob] = collections.deque()
        self._max_queued = max_queued
        self._ready = threading.Condition()
        self.stats = ShadowStats()
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="shadow-scorer", daemon=True)
        self._thread.start()

    def submit(self, job: ShadowJob) -> None:
        """Queue a job (never blocks: a full queue drops it and counts the drop)."""
        with self._ready:
            if len(self._jobs) >= self._max_queued:
                self.stats.dropped_requests += job.requests
                return
            self._jobs.append(job)
            self._ready.notify()

    def wait_idle(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued job is scored (tests, shutdown); whether it got there."""
        deadline = time.monotonic() + timeout_s
        with self._ready:
            while self._jobs or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._ready.wait(min(remaining, 0.05))
        return True

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._jobs:
                    self._ready.wait()
                job = self._jobs.popleft()
                self._busy = True
            try:
                self._score(job)
            except Exception:  # the thread must go on
                logger.exception("shadow scoring failed")
            with self._ready:
                self._busy = False
                self._ready.notify_all()

    def _score(self, job: ShadowJob) -> None:
        member, records = job.member, job.records
        started = time.perf_counter()
        try:
            result = member.model.predict(records)
        except Exception:
            if len(records) > 1 and not isinstance(job.request_ids, str):
                # one-record requests: each on its own, so one bad record fails only itself
                for request_id, record in zip(job.request_ids, records, strict=True):
                    self._score(ShadowJob(member, [request_id], [record], 1))
                return
            member.count(job.requests, job.requests, time.perf_counter() - started)
            self.stats.failed_records += len(records)
            return
        member.count(job.requests, 0, time.perf_counter() - started)
        self.stats.scored_requests += job.requests
        if member.traffic is not None:
            member.traffic.record(job.request_ids, records, result)
        if member.metrics is not None:
            fields = member.model.response_fields(result)
            member.observe(fields["predictions"], fields["probabilities"])
