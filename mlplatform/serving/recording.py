"""A replica's traffic recorder, run beside it in a process of its own.

Profiling a record with whylogs and logging its prediction to SQLite cost about half as much CPU
as serving it (roughly 25 us against 45 us per record of a 1,000-record request on a 2-core test
machine). In the replica's process that work holds the interpreter lock the request path needs:
a 1,000-record request then took a third longer. In a process of its own, at a lower priority,
it runs on whatever CPU serving leaves free. The replica only appends each request to a list,
which a thread hands over every 0.1 s in one fire-and-forget actor call.

The recorder process is a Ray actor owned by the replica, pinned to its node (profiles and the
prediction log are local files), reserving no CPU. It dies with the replica; a graceful shutdown
(a redeploy) closes it first, so the last window is written.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path
from typing import Any

import pandas as pd
import ray
from pydantic_core import from_json
from ray.exceptions import PendingCallsLimitExceeded
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from mlplatform.model.spec import FeatureSpec
from mlplatform.monitoring.feedback import FeedbackStore
from mlplatform.serving.recorder import RecorderStats, TrafficRecorder
from mlplatform.serving.settings import TrafficKnobs

_MAX_CALLS_IN_FLIGHT = 8
"""Hand-overs the recorder process has not taken yet before the next one is dropped."""


@ray.remote(num_cpus=0)
class RecorderProcess:
    """A :class:`~mlplatform.serving.recorder.TrafficRecorder` in a Ray actor."""

    def __init__(self, niceness: int, feedback_db: str | None, recorder_args: dict[str, Any]):
        """Lower this process's priority and start the recorder.

        Args:
            niceness: added to the process's niceness.
            feedback_db: the prediction log (opened here: a connection does not travel).
            recorder_args: :class:`TrafficRecorder`'s arguments, ``feedback`` aside.

        """
        os.nice(niceness)
        feedback = FeedbackStore(Path(feedback_db)) if feedback_db else None
        self.recorder = TrafficRecorder(**recorder_args, feedback=feedback)

    def record_many(self, requests: list[tuple[Any, Any, pd.DataFrame]]) -> None:
        """:meth:`TrafficRecorder.record` each ``(request_id, records, result)`` handed over.

        ``records`` as bytes are a validated ``/predict`` body (parsed here, off serving).
        """
        for request_id, records, result in requests:
            rows = from_json(records)["records"] if isinstance(records, bytes) else records
            self.recorder.record(request_id, rows, result)

    def stats(self) -> RecorderStats:
        """See :meth:`TrafficRecorder.stats`."""
        return self.recorder.stats()

    def close(self, timeout: float) -> None:
        """See :meth:`TrafficRecorder.close`."""
        self.recorder.close(timeout)


class TrafficSink:
    """The replica's side: hands requests to its :class:`RecorderProcess`, never waiting for it.

    A request is only appended to a local list (a microsecond); a thread sends the list to the
    process every ``flush_interval_s`` in one actor call. An actor call per request would cost
    the request path about a millisecond of CPU, as much as the rest of a one-record request.
    """

    def __init__(
        self,
        directory: str,
        model_name: str,
        model_version: str,
        spec: FeatureSpec,
        replica_id: str,
        settings: TrafficKnobs,
        *,
        feedback_db: str | None,
        niceness: int = 10,
        flush_interval_s: float = 0.1,
    ):
        """Start the recorder process on this node (:meth:`ready` waits for it).

        Args:
            directory: the traffic profiles root.
            model_name: the served model's registered name.
            model_version: the served model version.
            spec: the model's feature spec.
            replica_id: the replica's id, part of every profile's file name.
            settings: the recorder's settings; ``traffic_max_queue`` also bounds the requests
                waiting here to be handed over (more are dropped and counted).
            feedback_db: the prediction log; ``None`` = profiles only.
            niceness: added to the process's niceness: on a busy machine monitoring yields the
                CPU to serving, and catches up when there is some to spare (its queue is
                bounded; what does not fit is dropped and counted).
            flush_interval_s: how often waiting requests are handed over.

        """
        self._process = RecorderProcess.options(
            max_pending_calls=_MAX_CALLS_IN_FLIGHT,
            scheduling_strategy=NodeAffinitySchedulingStrategy(
                ray.get_runtime_context().get_node_id(), soft=False
            ),
        ).remote(
            niceness,
            feedback_db,
            {
                "directory": Path(directory),
                "model_name": model_name,
                "model_version": model_version,
                "spec": spec,
                "replica_id": replica_id,
                "settings": settings,
            },
        )
        self._max_pending = settings.traffic_max_queue
        self._pending: list[tuple[Any, Any, pd.DataFrame]] = []
        self._lock = threading.Lock()
        self._refused_requests = 0
        self._refused_rows = 0
        self._closed = threading.Event()
        self._flusher = threading.Thread(
            target=self._flush_every, args=(flush_interval_s,), name="traffic-sink", daemon=True
        )
        self._flusher.start()

    def ready(self, timeout_s: float = 120.0) -> None:
        """Wait until the recorder process runs.

        Raises:
            ray.exceptions.RayError: if it failed to start (its constructor's error).

        """
        ray.get(self._process.stats.remote(), timeout=timeout_s)

    def record(
        self,
        request_id: str | list[str],
        records: list[dict[str, Any]] | bytes,
        result: pd.DataFrame,
    ) -> None:
        """Queue one request (or a micro-batch of one-record requests) for the process.

        Never blocks: when ``traffic_max_queue`` requests are waiting, the request is dropped and
        counted.

        Args:
            request_id: the request's id, or one per record for a micro-batch.
            records: the validated records, as posted; or the validated ``/predict`` body
                itself (many records: bytes are handed over without serializing each record).
            result: the model's output for them, row for row.

        """
        with self._lock:
            if len(self._pending) < self._max_pending and not self._closed.is_set():
                self._pending.append((request_id, records, result))
                return
            self._count_refused([(request_id, records, result)])

    def _count_refused(self, requests: list[tuple[Any, Any, pd.DataFrame]]) -> None:
        """Count requests that were dropped here (call with the lock held)."""
        for request_id, _, result in requests:
            self._refused_requests += 1 if isinstance(request_id, str) else len(request_id)
            self._refused_rows += len(result)

    def _flush(self) -> None:
        """Hand everything waiting over in one actor call (dropped if the process lags)."""
        with self._lock:
            requests, self._pending = self._pending, []
        if not requests:
            return
        try:
            self._process.record_many.remote(requests)
        except PendingCallsLimitExceeded:
            with self._lock:
                self._count_refused(requests)

    def _flush_every(self, interval_s: float) -> None:
        while not self._closed.wait(interval_s):
            self._flush()

    async def stats(self) -> RecorderStats:
        """The recorder's counters, with the requests it was too busy to take as dropped."""
        stats = await self._process.stats.remote()
        return dataclasses.replace(
            stats,
            dropped_requests=stats.dropped_requests + self._refused_requests,
            dropped_rows=stats.dropped_rows + self._refused_rows,
        )

    def close(self, timeout_s: float = 10.0) -> None:
        """Hand over what is waiting, write what was recorded and stop the process."""
        self._closed.set()
        self._flusher.join(timeout=timeout_s)
        self._flush()
        try:
            ray.get(self._process.close.remote(timeout_s), timeout=timeout_s + 5)
        finally:
            ray.kill(self._process)
