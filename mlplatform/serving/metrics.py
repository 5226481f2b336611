"""The endpoint's Prometheus metrics, per model version and role, exported the Ray way.

Each replica creates its metrics with ``ray.serve.metrics`` (which adds the deployment, replica
and application labels); Ray aggregates them per node and serves them on the node's metrics
export port (:attr:`~mlplatform.settings.PlatformSettings.metrics_port` for the embedded head),
where Prometheus scrapes them. Ray prefixes every application metric with ``ray_``; the
platform's Prometheus configuration (``deploy/prometheus/prometheus.yml``) strips that prefix,
so the names below are what queries use.

Every series carries ``model`` (the registered model), ``model_version`` and ``role``: the
version's part in the release, ``champion``, ``shadow`` or ``canary``. A challenger in shadow
answers no request: it has predictions and scores, not requests, errors or latency (the
rollout's evidence files time its scoring).

==========================================  =====================================================
``mlplatform_requests_total``               ``POST /predict`` requests, by ``code`` class (2xx..)
``mlplatform_errors_total``                 answers of status >= 400, by ``status`` code
``mlplatform_request_latency_seconds``      histogram of request latency in the replica
``mlplatform_predictions_total``            predicted records by class (``prediction``)
``mlplatform_score_bucket_total``           classifiers: score histogram (``le``, cumulative):
                                            the positive-class probability (binary) or the
                                            predicted class's (multiclass)
``mlplatform_prediction_value_bucket_total``  regression: histogram of predicted values (``le``)
``mlplatform_release_stage``                1 for the release's stage (``none``, ``shadow``,
                                            ``canary``), 0 for the others
``mlplatform_canary_share``                 the share of request keys the challenger answers
``mlplatform_release_version``              1 for each version the release serves, by ``role``
``mlplatform_rollbacks_total``              challengers dropped without being promoted, by the
                                            ``stage`` they were in (counted by every replica)
``mlplatform_rollback_timestamp_seconds``   when the last rollback was seen (alerts use it: a
                                            counter's first increment is invisible to
                                            ``increase()``)
``mlplatform_profiler``                     the traffic profiler's counters (``counter``: the
                                            fields of ``TrafficStatus``; its losses are
                                            ``dropped_requests`` and ``dropped_rows``)
``mlplatform_profiler_up``                  1 while the profiler process answers
``mlplatform_feature_drift``                each ``feature``'s effect size in the latest
                                            drift report (KS D or Hellinger)
``mlplatform_feature_drifted``              1 for the features that report found drifted
``mlplatform_drift_report_timestamp_seconds``  when that report was made
==========================================  =====================================================

Scores and predicted values are histograms of counters with an ``le`` label (Prometheus'
histogram layout, one counter per bucket) rather than Ray histograms: a request of a thousand
records adds to them with one vectorised count, where a Ray histogram takes a call per value.

The request path only adds to plain counters under a lock (about a microsecond); a thread of
the replica hands the sums to Ray every second, reads the drift summary when it changed and
runs the collectors (the traffic profiler's counters).
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from ray.serve import metrics as serve_metrics

from mlplatform.monitoring.drift_summary import DriftSummary, read_drift_summary
from mlplatform.serving.release import Release

if TYPE_CHECKING:  # the recording module runs a Ray actor; only its counters' type is needed
    from mlplatform.serving.recording import TrafficStatus

logger = logging.getLogger(__name__)

STAGES = ("none", "shadow", "canary")
# The answer's X-Model-Version and X-Model-Role headers (routes.py), as ASGI carries them.
_VERSION_HEADER = b"x-model-version"
_ROLE_HEADER = b"x-model-role"

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SCORE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# Predicted values of any scale: a symmetric logarithmic ladder around zero.
_POWERS = (0.01, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6)
VALUE_BUCKETS = (*(-p for p in reversed(_POWERS)), 0.0, *_POWERS)
# At most this many values are bucketed one by one; larger batches go through numpy.
_SMALL_BATCH = 16

METRIC_NAMES = (
    "mlplatform_requests_total",
    "mlplatform_errors_total",
    "mlplatform_request_latency_seconds",
    "mlplatform_predictions_total",
    "mlplatform_score_bucket_total",
    "mlplatform_prediction_value_bucket_total",
    "mlplatform_release_stage",
    "mlplatform_canary_share",
    "mlplatform_release_version",
    "mlplatform_rollbacks_total",
    "mlplatform_rollback_timestamp_seconds",
    "mlplatform_profiler",
    "mlplatform_profiler_up",
    "mlplatform_feature_drift",
    "mlplatform_feature_drifted",
    "mlplatform_drift_report_timestamp_seconds",
)
"""The names Prometheus stores (after the ``ray_`` prefix is stripped); histograms add
``_bucket``, ``_sum`` and ``_count``."""


def _le(bound: float) -> str:
    return f"{bound:g}"


def bucket_counts(values: Sequence[float], bounds: Sequence[float]) -> list[int]:
    """How many of ``values`` fall in each bucket: ``(-inf, b0], (b0, b1], ..., (bn, +inf)``.

    Prometheus' ``le`` semantics (a value equal to a bound is in that bound's bucket); NaN is
    not counted. Returns ``len(bounds) + 1`` counts, not cumulative.
    """
    counts = [0] * (len(bounds) + 1)
    if len(values) <= _SMALL_BATCH:
        for value in values:
            if value == value:  # not NaN
                counts[bisect.bisect_left(bounds, value)] += 1
        return counts
    array = np.asarray(values, dtype=float)
    array = array[~np.isnan(array)]
    indices = np.searchsorted(np.asarray(bounds, dtype=float), array, side="left")
    return np.bincount(indices, minlength=len(bounds) + 1).tolist()


def scores_of(probabilities: Sequence[Any]) -> list[float]:
    """Each record's score: its probability (binary) or its largest class probability (multiclass).

    Multiclass probabilities come as ``{class: probability}``; the largest is the predicted
    class's.
    """
    if probabilities and isinstance(probabilities[0], dict):
        return [max(each.values()) for each in probabilities]
    return list(probabilities)


class _RayMetrics:
    """The Ray metric objects of one replica (created where the replica runs)."""

    def __init__(self, model_name: str, value_buckets: Sequence[float]):
        version_role = ("model", "model_version", "role")
        self.requests = serve_metrics.Counter(
            "mlplatform_requests",
            "POST /predict requests answered, by status code class.",
            (*version_role, "code"),
        )
        self.errors = serve_metrics.Counter(
            "mlplatform_errors",
            "POST /predict answers with a status of 400 or more, by status code.",
            (*version_role, "status"),
        )
        self.latency = serve_metrics.Histogram(
            "mlplatform_request_latency_seconds",
            "POST /predict latency in the replica, from the request to the answer's end.",
            list(LATENCY_BUCKETS_S),
            version_role,
        )
        self.predictions = serve_metrics.Counter(
            "mlplatform_predictions",
            "Predicted records by class (classifiers).",
            (*version_role, "prediction"),
        )
        self.scores = serve_metrics.Counter(
            "mlplatform_score_bucket",
            "Classifier scores (positive-class or predicted-class probability), cumulative "
            "buckets by upper bound le.",
            (*version_role, "le"),
        )
        self.values = serve_metrics.Counter(
            "mlplatform_prediction_value_bucket",
            "Predicted values (regression), cumulative buckets by upper bound le.",
            (*version_role, "le"),
        )
        self.stage = serve_metrics.Gauge(
            "mlplatform_release_stage",
            "1 for the release's stage, 0 for the others.",
            ("model", "stage"),
        )
        self.canary_share = serve_metrics.Gauge(
            "mlplatform_canary_share",
            "The share of request keys the challenger answers.",
            ("model",),
        )
        self.release_version = serve_metrics.Gauge(
            "mlplatform_release_version", "1 for each version the release serves.", version_role
        )
        self.rollbacks = serve_metrics.Counter(
            "mlplatform_rollbacks",
            "Challengers dropped from the release without being promoted.",
            ("model", "model_version", "stage"),
        )
        self.rollback_time = serve_metrics.Gauge(
            "mlplatform_rollback_timestamp_seconds",
            "When the last rollback was seen (unix seconds).",
            ("model", "model_version", "stage"),
        )
        self.profiler = serve_metrics.Gauge(
            "mlplatform_profiler",
            "The traffic profiler's counters (dropped_* are its losses).",
            (*version_role, "counter"),
        )
        self.profiler_up = serve_metrics.Gauge(
            "mlplatform_profiler_up", "1 while the traffic profiler answers.", version_role
        )
        self.drift = serve_metrics.Gauge(
            "mlplatform_feature_drift",
            "Each feature's effect size in the latest drift report (KS D or Hellinger).",
            ("model", "model_version", "feature", "test"),
        )
        self.drifted = serve_metrics.Gauge(
            "mlplatform_feature_drifted",
            "1 for the features the latest drift report found drifted.",
            ("model", "model_version", "feature"),
        )
        self.drift_time = serve_metrics.Gauge(
            "mlplatform_drift_report_timestamp_seconds",
            "When the latest drift report was made (unix seconds).",
            ("model", "model_version"),
        )
        for metric in vars(self).values():
            metric.set_default_tags({"model": model_name})
        self.value_buckets = tuple(value_buckets)


@dataclasses.dataclass
class PendingCounts:
    """What was counted since the last hand-over to Ray.

    Attributes:
        requests: ``(version, role, status) -> requests``.
        latencies: ``(version, role, seconds)`` of each request.
        classes: ``(version, role, predicted class) -> records`` (classifiers).
        scores: ``(version, role) -> records per score bucket`` (:data:`SCORE_BUCKETS`, the
            last bucket above them all), not cumulative.
        values: the same for predicted values (regression, the value buckets).

    """

    requests: dict[tuple[str, str, int], int] = dataclasses.field(default_factory=dict)
    latencies: list[tuple[str, str, float]] = dataclasses.field(default_factory=list)
    classes: collections.Counter[tuple[str, str, str]] = dataclasses.field(
        default_factory=collections.Counter
    )
    scores: dict[tuple[str, str], list[int]] = dataclasses.field(default_factory=dict)
    values: dict[tuple[str, str], list[int]] = dataclasses.field(default_factory=dict)


class EndpointMetrics:
    """One replica's metrics: cheap to update per request, handed to Ray by a thread.

    Args:
        model_name: the registered model (the ``model`` label).
        drift_file: the drift summary to export (re-read when it changes); ``None``: none.
        value_buckets: upper bounds of the predicted-value histogram (regression).
        flush_interval_s: how often the sums are handed to Ray.
        drift_poll_s: how often the drift summary's modification time is checked.

    """

    def __init__(
        self,
        model_name: str,
        *,
        drift_file: Path | None = None,
        value_buckets: Sequence[float] = VALUE_BUCKETS,
        flush_interval_s: float = 1.0,
        drift_poll_s: float = 5.0,
    ):
        self.model_name = model_name
        self._metrics = _RayMetrics(model_name, value_buckets)
        self._lock = threading.Lock()
        self._pending = PendingCounts()
        self._collectors: list[Callable[[], None]] = []
        self._release: Release | None = None
        self._drift_file = drift_file
        self._drift_seen: tuple[int, int] | None = None
        self._drift_versions: set[tuple[str, str, str]] = set()
        self._flush_interval_s = flush_interval_s
        self._drift_poll_s = drift_poll_s
        self._next_drift_check = 0.0
        # Every gauge's last value by its labels, set again on every flush: Ray's metrics
        # agent forgets a gauge not set within two report intervals (about 20 s).
        self._gauges: dict[
            tuple[str, tuple[tuple[str, str], ...]], tuple[Any, float, dict[str, str]]
        ] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the request path --

    def observe_request(self, version: str, role: str, status: int, seconds: float) -> None:
        """Count one answered request of ``version`` in ``role`` with its status and latency."""
        key = (version, role, status)
        with self._lock:
            pending = self._pending
            pending.requests[key] = pending.requests.get(key, 0) + 1
            pending.latencies.append((version, role, seconds))

    def observe_predictions(
        self,
        version: str,
        role: str,
        predictions: Sequence[Any],
        scores: Sequence[Any] | None,
    ) -> None:
        """Count the predictions of one model call.

        Args:
            version: the version that predicted.
            role: its role in the release.
            predictions: the predicted classes, or values (regression).
            scores: the probabilities as the endpoint answers them (a float per record for
                binary models, ``{class: probability}`` for multiclass); ``None`` for regression,
                whose predicted values are then the histogram.

        """
        classes = None
        if scores is None:
            counts = bucket_counts(predictions, self._metrics.value_buckets)
        else:
            counts = bucket_counts(scores_of(scores), SCORE_BUCKETS)
            # Counted by value, then named: str() per class, not per record.
            classes = {predictions[0]: 1} if len(predictions) == 1 else Counter(predictions)
        key = (version, role)
        with self._lock:
            pending = self._pending
            table = pending.values if classes is None else pending.scores
            if classes is not None:
                for label, n in classes.items():
                    pending.classes[(version, role, str(label))] += n
            kept = table.get(key)
            if kept is None:
                table[key] = counts
            else:
                for i, n in enumerate(counts):
                    kept[i] += n

    # -- what changes seldom --

    def set_release(self, release: Release) -> None:
        """Export the release's stage, share and versions; count a challenger dropped unpromoted.

        A rollback is seen as the release losing its challenger while the champion stays (a
        promotion makes the challenger the champion): every replica that sees it counts it.
        """
        metrics, previous = self._metrics, self._release
        if previous is not None and previous.challenger is not None:
            dropped = release.challenger != previous.challenger
            if dropped and release.champion == previous.champion:
                tags = {"model_version": previous.challenger, "stage": str(previous.stage)}
                metrics.rollbacks.inc(1, tags)
                self._set(metrics.rollback_time, time.time(), tags)
        stage = release.stage or "none"
        for each in STAGES:
            self._set(metrics.stage, 1.0 if each == stage else 0.0, {"stage": each})
        self._set(metrics.canary_share, release.canary_share if release.stage == "canary" else 0.0)
        served = _served(release)
        before = set() if previous is None else _served(previous)
        for version, role in before | served:
            self._set(
                metrics.release_version,
                1.0 if (version, role) in served else 0.0,
                {"model_version": version, "role": role},
            )
        self._release = release

    def set_traffic(self, version: str, role: str, status: TrafficStatus) -> None:
        """Export the traffic profiler's counters and whether it is up."""
        tags = {"model_version": version, "role": role}
        self._set(self._metrics.profiler_up, 1.0 if status.status == "ok" else 0.0, tags)
        for field in dataclasses.fields(status):
            value = getattr(status, field.name)
            if isinstance(value, int):  # the counts, not status and reason
                self._set(self._metrics.profiler, float(value), tags | {"counter": field.name})

    def set_drift(self, summary: DriftSummary) -> None:
        """Export each feature's drift from a drift report; features it no longer has go to 0."""
        metrics = self._metrics
        current = set()
        for feature in summary.features:
            tags = {"model_version": summary.model_version, "feature": feature.feature}
            self._set(metrics.drift, feature.effect or 0.0, tags | {"test": feature.test})
            self._set(metrics.drifted, 1.0 if feature.drifted else 0.0, tags)
            current.add((summary.model_version, feature.feature, feature.test))
        for version, name, test in self._drift_versions - current:
            tags = {"model_version": version, "feature": name}
            self._set(metrics.drift, 0.0, tags | {"test": test})
            self._set(metrics.drifted, 0.0, tags)
        self._drift_versions = current
        self._set(metrics.drift_time, summary.reported_at, {"model_version": summary.model_version})

    def _set(
        self, gauge: serve_metrics.Gauge, value: float, tags: dict[str, str] | None = None
    ) -> None:
        """Set a gauge and keep its value, to set it again on every flush."""
        tags = tags or {}
        with self._lock:
            self._gauges[(gauge.info["name"], tuple(sorted(tags.items())))] = (gauge, value, tags)
        gauge.set(value, tags)

    def add_collector(self, collect: Callable[[], None]) -> None:
        """Run ``collect`` on every flush (to set gauges from state read then, off the requests)."""
        self._collectors.append(collect)

    # -- handing over to Ray --

    def take(self) -> PendingCounts:
        """What was counted since the last call, leaving nothing pending."""
        with self._lock:
            pending, self._pending = self._pending, PendingCounts()
        return pending

    def flush(self) -> None:
        """Hand what was counted since the last flush to Ray, run the collectors, re-read drift."""
        pending = self.take()
        metrics = self._metrics
        for (version, role, status), n in pending.requests.items():
            tags = {"model_version": version, "role": role}
            metrics.requests.inc(n, tags | {"code": f"{status // 100}xx"})
            if status >= 400:
                metrics.errors.inc(n, tags | {"status": str(status)})
        for version, role, seconds in pending.latencies:
            metrics.latency.observe(seconds, {"model_version": version, "role": role})
        for (version, role, label), n in pending.classes.items():
            metrics.predictions.inc(
                n, {"model_version": version, "role": role, "prediction": label}
            )
        _add_buckets(metrics.scores, pending.scores, SCORE_BUCKETS)
        _add_buckets(metrics.values, pending.values, metrics.value_buckets)
        for collect in self._collectors:
            collect()
        self._check_drift()
        with self._lock:
            gauges = list(self._gauges.values())
        for gauge, value, tags in gauges:
            gauge.set(value, tags)

    def _check_drift(self) -> None:
        now = time.monotonic()
        if self._drift_file is None or now < self._next_drift_check:
            return
        self._next_drift_check = now + self._drift_poll_s
        try:
            stat = self._drift_file.stat()
        except FileNotFoundError:
            return
        seen = (stat.st_mtime_ns, stat.st_size)
        if seen == self._drift_seen:
            return
        self._drift_seen = seen
        try:
            summary = read_drift_summary(self._drift_file)
        except (OSError, ValueError) as error:
            logger.warning("drift summary %s not exported: %s", self._drift_file, error)
            return
        if summary is not None:
            self.set_drift(summary)

    def start(self) -> EndpointMetrics:
        """Start the thread that flushes every ``flush_interval_s``; returns ``self``."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._flush_every, name="endpoint-metrics", daemon=True
            )
            self._thread.start()
        return self

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the thread and hand over what is left."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
        self.flush()

    def _flush_every(self) -> None:
        while not self._stop.wait(self._flush_interval_s):
            try:
                self.flush()
            except Exception:  # the next flush may succeed; requests never wait on this
                logger.exception("endpoint metrics: flush failed")


def _served(release: Release) -> set[tuple[str, str]]:
    """``(version, role)`` of every version the release serves."""
    served = {(release.champion, "champion")}
    if release.challenger is not None and release.stage is not None:
        served.add((release.challenger, release.stage))
    return served


def _add_buckets(
    counter: serve_metrics.Counter,
    table: dict[tuple[str, str], list[int]],
    bounds: Sequence[float],
) -> None:
    """Add bucket counts to a counter with an ``le`` label, cumulative as Prometheus reads them."""
    labels = [*(_le(bound) for bound in bounds), "+Inf"]
    for (version, role), counts in table.items():
        cumulative = 0
        for le, n in zip(labels, counts, strict=True):
            cumulative += n
            if cumulative:
                counter.inc(cumulative, {"model_version": version, "role": role, "le": le})


class RequestMetricsMiddleware:
    """ASGI middleware: counts and times ``POST /predict`` by the version and role that answered.

    The route names them in the answer's ``X-Model-Version`` and ``X-Model-Role`` headers;
    answers without them (a request refused before any model was chosen) count for the
    champion.

    Args:
        app: the ASGI app.
        metrics: where requests are counted.
        champion: gives the champion's version now (it changes with the release).

    """

    def __init__(self, app: Any, metrics: EndpointMetrics, champion: Callable[[], str]):
        self.app = app
        self.metrics = metrics
        self.champion = champion

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Pass the request on; count it when the answer started (or the app raised)."""
        if scope["type"] != "http" or not scope["path"].endswith("/predict"):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        answer: list[Any] = [500, None, "champion"]  # an app that raises answers 500

        async def send_and_note(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answer[0] = message["status"]
                for name, value in message.get("headers", ()):
                    if name == _VERSION_HEADER:
                        answer[1] = value.decode()
                    elif name == _ROLE_HEADER:
                        answer[2] = value.decode()
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            status, version, role = answer
            seconds = time.perf_counter() - started
            self.metrics.observe_request(version or self.champion(), role, status, seconds)
