"""A replica's traffic recorder, run beside it in a process of its own that restarts when it dies.

Profiling a record with whylogs and logging its prediction to SQLite cost about half as much CPU
as serving it (roughly 25 us against 45 us per record of a 1,000-record request on a 2-core test
machine). In the replica's process that work holds the interpreter lock the request path needs:
a 1,000-record request then took a third longer. In a process of its own, at a lower priority,
it runs on whatever CPU serving leaves free. The replica only appends each request to a list,
which a thread hands over every 0.1 s in one fire-and-forget actor call.

The recorder process is a named Ray actor owned by the replica, pinned to its node (profiles and
the prediction log are local files), reserving no CPU. It dies with the replica; a graceful
shutdown (a redeploy) closes it first, so the last window is written. If it dies on its own, Ray
restarts it (``max_restarts``), and the replica recreates it if Ray gives up; meanwhile requests
are answered as ever, wait in the replica (up to ``traffic_max_queue``) and ``/healthz`` reports
the recorder down.

Nothing answered goes uncounted, and little is lost. Every hand-over is numbered and kept by the
replica until the process reports that its recorder has finished with it (:class:`ProcessStats`,
with how many of its records could not be logged). The hand-overs a process took with it when it
died are sent again to its successor, which skips the requests already in the prediction log (a
request is logged whole or not at all). So for every replica::

    answered rows = logged rows + dropped rows + unsettled rows (on their way, 0 once idle)

The replica keeps these counts in a small file beside its traffic windows
(:func:`~mlplatform.monitoring.profiles.write_replica_counters`), every few seconds, and in a
memory-mapped tally with every answer (:mod:`mlplatform.monitoring.tally`): a replica killed
outright leaves the counts of everything it answered, the records it held for the recorder
among its unsettled rows.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import ray
from pydantic_core import from_json
from ray.exceptions import ActorDiedError, PendingCallsLimitExceeded, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from mlplatform.model.spec import FeatureSpec
from mlplatform.monitoring.feedback import FeedbackStore
from mlplatform.monitoring.profiles import (
    ReplicaCounters,
    replica_tally_path,
    write_replica_counters,
)
from mlplatform.monitoring.tally import ReplicaTally, TallyCounts
from mlplatform.serving.recorder import RecorderStats, SettledItems, TrafficRecorder
from mlplatform.serving.settings import TrafficKnobs
from mlplatform.tasks.base import ModelOutput

logger = logging.getLogger(__name__)

_MAX_CALLS_IN_FLIGHT = 8
"""Hand-overs the recorder process has not taken yet before the next one waits in the replica."""

RECORDER_NAMESPACE = "mlplatform-traffic"
"""The Ray namespace of the recorder processes (see :func:`recorder_name`)."""

_RECREATE_AFTER_S = 10.0
"""Shortest time between two attempts to recreate a recorder process Ray gave up restarting."""


def recorder_name(replica_id: str) -> str:
    """The Ray actor name of a replica's recorder process (in :data:`RECORDER_NAMESPACE`)."""
    return f"traffic-recorder-{replica_id}"


@dataclasses.dataclass(frozen=True)
class ProcessStats(RecorderStats):
    """A recorder process's counters, and how far it has settled the hand-overs it received.

    Attributes:
        incarnation: this run of the process (a new one after every restart).
        first_handover: the first hand-over it received, or the replica's next hand-over when
            it was first asked (earlier ones went to a previous run, or nowhere).
        settled_through: every hand-over it received up to this number is settled: its
            records are logged, or counted in the two fields below (-1: none yet).
        settled_dropped_requests: requests of those hand-overs that were not logged (its
            queue was full, or an error).
        settled_dropped_rows: their records.

    """

    incarnation: str
    first_handover: int | None
    settled_through: int
    settled_dropped_requests: int
    settled_dropped_rows: int


class _Ledger:
    """Which hand-overs a recorder has finished with, in order, and what of them was not logged.

    Each open hand-over counts the items it still waits for, plus one while
    :meth:`RecorderProcess.record_many` is still recording it, so that it cannot be settled
    before all of its items are known.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[int, list[int]] = {}  # hand-over: [waiting, dropped requests, rows]
        self.first: int | None = None
        self.settled_through = -1
        self.dropped_requests = 0
        self.dropped_rows = 0

    def start(self, handover: int) -> None:
        with self._lock:
            if self.first is None:
                self.first = handover
            self._open[handover] = [1, 0, 0]

    def expect(self, handover: int) -> None:
        with self._lock:
            self._open[handover][0] += 1

    def refused(self, handover: int, requests: int, rows: int) -> None:
        self._settle([(handover, requests, rows)], logged=False)

    def finish(self, handover: int) -> None:
        self._settle([(handover, 0, 0)], logged=True)

    def settle(self, items: SettledItems, logged: bool) -> None:
        """The recorder's ``on_settled``: items it has finished with (tagged by hand-over)."""
        self._settle(items, logged)

    def note_boundary(self, handover: int) -> None:
        with self._lock:
            if self.first is None:
                self.first = handover

    def _settle(self, items: SettledItems, logged: bool) -> None:
        with self._lock:
            for tag, requests, rows in items:
                entry = self._open.get(tag)
                if entry is None:
                    continue
                entry[0] -= 1
                if not logged:
                    entry[1] += requests
                    entry[2] += rows
            while self._open:  # hand-overs are opened in order: settle the finished prefix
                handover, (waiting, requests, rows) = next(iter(self._open.items()))
                if waiting:
                    break
                del self._open[handover]
                self.settled_through = handover
                self.dropped_requests += requests
                self.dropped_rows += rows


@ray.remote(num_cpus=0)
class RecorderProcess:
    """A :class:`~mlplatform.serving.recorder.TrafficRecorder` in a Ray actor."""

    def __init__(self, niceness: int, feedback_db: str | None, recorder_args: dict[str, Any]):
        """Lower this process's priority and start the recorder (again, after a restart).

        Args:
            niceness: added to the process's niceness.
            feedback_db: the prediction log (opened here: a connection does not travel).
            recorder_args: :class:`TrafficRecorder`'s arguments, ``feedback`` aside.

        """
        os.nice(niceness)
        self.incarnation = uuid.uuid4().hex
        self.ledger = _Ledger()
        self.feedback = FeedbackStore(Path(feedback_db)) if feedback_db else None
        self.shadow = bool(recorder_args.get("shadow"))
        self.recorder = TrafficRecorder(
            **recorder_args, feedback=self.feedback, on_settled=self.ledger.settle
        )

    def record_many(
        self, handover: int, requests: list[tuple[Any, Any, ModelOutput]], resent: bool = False
    ) -> None:
        """:meth:`TrafficRecorder.record` each ``(request_id, records, result)`` of a hand-over.

        ``records`` as bytes are a validated ``/predict`` body (parsed here, off serving). A
        request that cannot be recorded is logged and counted as dropped.

        Args:
            handover: the replica's number for this hand-over.
            requests: what it holds.
            resent: sent before to a process that died: requests already in the prediction log
                are skipped (they were recorded).

        """
        self.ledger.start(handover)
        try:
            logged = self._already_logged(requests) if resent else set()
            for request_id, records, result in requests:
                if (request_id if isinstance(request_id, str) else request_id[0]) in logged:
                    continue
                self.ledger.expect(handover)
                try:
                    rows = from_json(records)["records"] if isinstance(records, bytes) else records
                    queued = self.recorder.record(request_id, rows, result, tag=handover)
                except Exception:
                    logger.exception("traffic recorder: a request could not be recorded")
                    queued = False
                if not queued:
                    requests_count = 1 if isinstance(request_id, str) else len(request_id)
                    self.ledger.refused(handover, requests_count, len(result))
        finally:
            self.ledger.finish(handover)

    def _already_logged(self, requests: list[tuple[Any, Any, ModelOutput]]) -> set[str]:
        """Requests of a resent hand-over that are in the prediction log (logged whole)."""
        if self.feedback is None:
            return set()
        ids = [rid if isinstance(rid, str) else rid[0] for rid, _, _ in requests]
        try:
            return self.feedback.logged_requests(ids, shadow=self.shadow)
        except Exception:  # then they are recorded again: the log ignores duplicates
            logger.exception("traffic recorder: the prediction log could not be read")
            return set()

    def stats(self, boundary: int | None = None) -> ProcessStats:
        """The recorder's counters and how far the hand-overs are settled.

        Args:
            boundary: the replica's next hand-over number: hand-overs before it that this
                process has not received never will (``None``: only asking).

        """
        if boundary is not None:
            self.ledger.note_boundary(boundary)
        return ProcessStats(
            **dataclasses.asdict(self.recorder.stats()),
            incarnation=self.incarnation,
            first_handover=self.ledger.first,
            settled_through=self.ledger.settled_through,
            settled_dropped_requests=self.ledger.dropped_requests,
            settled_dropped_rows=self.ledger.dropped_rows,
        )

    def close(self, timeout: float) -> None:
        """See :meth:`TrafficRecorder.close`."""
        self.recorder.close(timeout)


@dataclasses.dataclass(frozen=True)
class TrafficStatus(RecorderStats):
    """What ``/healthz`` shows of a replica's traffic recording.

    The recorder's counters are those of its running process (since it last started), except
    ``dropped_requests`` and ``dropped_rows``: every request this replica answered that will
    never be in the prediction log (dropped here or by the recorder, or lost with a recorder
    process that died), so that ``answered_rows = logged + dropped_rows + unsettled_rows``.

    Attributes:
        status: ``ok`` when the recorder process answered just now, else ``down``.
        reason: why it is down (``None`` when ok).
        restarts: times the recorder process was found restarted, or was recreated.
        answered_requests: requests this replica answered and handed to the sink.
        answered_rows: their records.
        unsettled_rows: records answered whose outcome is not known yet (waiting here to be
            handed over, or handed over and not yet logged).

    """

    status: Literal["ok", "down"]
    reason: str | None
    restarts: int
    answered_requests: int
    answered_rows: int
    unsettled_rows: int


@dataclasses.dataclass(frozen=True)
class _HandOver:
    """What the replica sent in one call, kept until the recorder reports it settled."""

    number: int
    payload: list[tuple[Any, Any, ModelOutput]]  # (request id(s), records, result)
    rows: int

    def requests(self) -> list[tuple[str, int]]:
        """``(request id, records)`` of every request in it."""
        return [
            each
            for request_id, _, result in self.payload
            for each in _requests_of(request_id, result)
        ]


def _requests_of(request_id: str | list[str], result: ModelOutput) -> list[tuple[str, int]]:
    """``(request id, records)`` of one recorded item (a list of ids: one record each)."""
    if isinstance(request_id, str):
        return [(request_id, len(result))]
    return [(each, 1) for each in request_id]


def _describe(error: BaseException) -> str:
    """One line naming an error: its type and the first line of its message."""
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0]}"[:300] if message else type(error).__name__


class TrafficSink:
    """The replica's side: hands requests to its :class:`RecorderProcess`, never waiting for it.

    A request is only appended to a local list (a microsecond); a thread sends the list to the
    process every ``flush_interval_s`` in one actor call. An actor call per request would cost
    the request path about a millisecond of CPU, as much as the rest of a one-record request.
    The same thread asks the process how far it got every ``poll_interval_s``: it settles the
    hand-overs the process finished with, notices a restarted or dead process (recreating it
    when Ray gave up), and keeps the replica's counters (see the module's docstring).
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
        shadow: bool = False,
        niceness: int = 10,
        flush_interval_s: float = 0.1,
        poll_interval_s: float = 1.0,
        answer_timeout_s: float = 5.0,
    ):
        """Start the recorder process on this node (:meth:`ready` waits for it).

        Args:
            directory: the traffic profiles root (the replica's counters are written there too).
            model_name: the served model's registered name.
            model_version: the served model version.
            spec: the model's feature spec.
            replica_id: the replica's id, part of every profile's file name.
            settings: the recorder's settings; ``traffic_max_queue`` also bounds the requests
                waiting here to be handed over (more are dropped and counted).
            feedback_db: the prediction log; ``None`` = profiles only.
            shadow: the version scores in shadow: its predictions go to the log's shadow table,
                beside the champion's answers.
            niceness: added to the process's niceness: on a busy machine monitoring yields the
                CPU to serving, and catches up when there is some to spare (its queue is
                bounded; what does not fit is dropped and counted).
            flush_interval_s: how often waiting requests are handed over.
            poll_interval_s: how often the process is asked how far it got (4 times as often
                while it is down).
            answer_timeout_s: how long the process may take to answer before it counts as down.

        """
        self._directory = Path(directory)
        self._model_name = str(model_name)
        self._model_version = str(model_version)
        self._replica_id = str(replica_id)
        self._feedback_db = feedback_db
        self._feedback: FeedbackStore | None = None
        self._shadow = shadow
        self._process_args = (
            niceness,
            feedback_db,
            {
                "directory": self._directory,
                "model_name": model_name,
                "model_version": model_version,
                "spec": spec,
                "replica_id": replica_id,
                "settings": settings,
                "shadow": shadow,
            },
        )
        self._node_id = ray.get_runtime_context().get_node_id()
        self._process = self._start_process()
        self._max_pending = settings.traffic_max_queue
        self._poll_interval_s = poll_interval_s
        self._answer_timeout_s = answer_timeout_s
        self._lock = threading.Lock()
        self._pending: list[tuple[Any, Any, ModelOutput]] = []
        self._pending_rows = 0
        self._unsettled: collections.deque[_HandOver] = collections.deque()
        self._to_resend: collections.deque[_HandOver] = collections.deque()
        self._unsettled_rows = 0
        self._next_handover = 0
        self._answered_requests = 0
        self._answered_rows = 0
        self._dropped_requests = 0  # final: never to be logged
        self._dropped_rows = 0
        self._restarts = 0
        self._current: ProcessStats | None = None  # the running process's last answer
        self._down_reason: str | None = None
        self._poll: ray.ObjectRef | None = None
        self._poll_sent_at = 0.0
        self._next_poll_at = 0.0
        self._recreate_at = 0.0
        self._persisted: tuple[int, ...] = ()
        self._next_persist_at = 0.0
        self._tally = self._open_tally()
        self._closed = threading.Event()
        self._flusher = threading.Thread(
            target=self._flush_every, args=(flush_interval_s,), name="traffic-sink", daemon=True
        )
        self._flusher.start()

    def _start_process(self) -> Any:
        """Start the recorder process, or find it if it is running (it is named per replica)."""
        return RecorderProcess.options(
            name=recorder_name(self._replica_id),
            namespace=RECORDER_NAMESPACE,
            get_if_exists=True,
            max_restarts=-1,
            max_pending_calls=_MAX_CALLS_IN_FLIGHT,
            scheduling_strategy=NodeAffinitySchedulingStrategy(self._node_id, soft=False),
        ).remote(*self._process_args)

    def _open_tally(self) -> ReplicaTally | None:
        """The replica's tally, or ``None`` if it cannot be created (the JSON counters remain)."""
        path = replica_tally_path(
            self._directory, self._model_name, self._model_version, self._replica_id
        )
        try:
            return ReplicaTally(path)
        except OSError as error:
            logger.warning("traffic sink: no tally at %s: %s", path, error)
            return None

    def _update_tally(self) -> None:
        """Copy the counts to the tally (the caller holds the lock)."""
        if self._tally is None:
            return
        dropped_requests, dropped_rows = self._dropped_requests, self._dropped_rows
        if self._current is not None:
            dropped_requests += self._current.settled_dropped_requests
            dropped_rows += self._current.settled_dropped_rows
        self._tally.update(
            TallyCounts(
                self._answered_requests,
                self._answered_rows,
                dropped_requests,
                dropped_rows,
                self._unsettled_rows + self._pending_rows,
            )
        )

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
        result: ModelOutput,
    ) -> None:
        """Queue one request (or a micro-batch of one-record requests) for the process.

        Never blocks: when ``traffic_max_queue`` requests are waiting (the process lags or is
        down), the request is dropped and counted.

        Args:
            request_id: the request's id, or one per record for a micro-batch.
            records: the validated records, as posted; or the validated ``/predict`` body
                itself (many records: bytes are handed over without serializing each record).
            result: the model's output for them, row for row.

        """
        requests = 1 if isinstance(request_id, str) else len(request_id)
        with self._lock:
            self._answered_requests += requests
            self._answered_rows += len(result)
            if len(self._pending) < self._max_pending and not self._closed.is_set():
                self._pending.append((request_id, records, result))
                self._pending_rows += len(result)
            else:
                self._dropped_requests += requests
                self._dropped_rows += len(result)
            self._update_tally()  # before the answer leaves: it outlives this process

    async def stats(self) -> TrafficStatus:
        """The recording's state: the process asked now (``down`` if it cannot answer)."""
        try:
            answer = await asyncio.wait_for(
                self._process.stats.remote(), timeout=self._answer_timeout_s
            )
        except (RayError, TimeoutError) as error:  # TimeoutError: no answer in time
            return self._status(None, _describe(error))
        return self._status(answer, None)

    def close(self, timeout_s: float = 10.0) -> None:
        """Hand over what is waiting, write what was recorded, stop the process, settle all.

        Whatever the process could not take or log before it stopped is counted as dropped,
        and the replica's counters are written a last time.
        """
        self._closed.set()
        self._flusher.join(timeout=timeout_s)
        self._down_reason = None  # a last attempt, whatever the last poll said
        self._flush()
        try:
            ray.get(self._process.close.remote(timeout_s), timeout=timeout_s + 5)
            self._apply(ray.get(self._process.stats.remote(self._next_handover), timeout=timeout_s))
        except RayError as error:
            logger.warning("traffic recorder did not close cleanly: %s", _describe(error))
        finally:
            ray.kill(self._process)
            self._settle_abandoned()
            self._persist(force=True)
            if self._tally is not None:
                self._tally.close()

    # -- the flusher thread --

    def _flush_every(self, interval_s: float) -> None:
        while not self._closed.wait(interval_s):
            try:
                self._flush()
                self._check_process()
                self._persist()
            except Exception:  # the thread must go on: a failure here is logged, never fatal
                logger.exception("traffic sink: bookkeeping failed")

    def _flush(self) -> None:
        """Hand everything waiting over in one actor call.

        Hand-overs a dead process took with it go first, again. While the process is down, or
        lags (too many calls it has not taken yet), requests keep waiting here: new ones are
        dropped and counted once ``traffic_max_queue`` are waiting.
        """
        if self._down_reason is not None:
            return
        while self._to_resend:
            if not self._hand_over(self._to_resend[0].payload, resent=True):
                return  # the process lags: again on the next round
            with self._lock:
                self._unsettled_rows -= self._to_resend.popleft().rows
        with self._lock:
            requests, self._pending = self._pending, []
            rows, self._pending_rows = self._pending_rows, 0
        if requests and not self._hand_over(requests, resent=False):
            with self._lock:  # back in front of what came meanwhile, for the next round
                self._pending[:0] = requests
                self._pending_rows += rows

    def _hand_over(self, payload: list[tuple[Any, Any, ModelOutput]], resent: bool) -> bool:
        """One actor call; whether it was made (not if the process has too many waiting)."""
        handover = _HandOver(self._next_handover, payload, sum(len(r) for _, _, r in payload))
        try:
            self._process.record_many.remote(handover.number, payload, resent)
        except PendingCallsLimitExceeded:
            return False
        self._next_handover += 1
        with self._lock:
            self._unsettled.append(handover)
            self._unsettled_rows += handover.rows
        return True

    def _check_process(self) -> None:
        """Ask the process how far it got (one question at a time); act on its answer."""
        now = time.monotonic()
        if self._poll is None:
            if now >= self._next_poll_at:
                try:
                    self._poll = self._process.stats.remote(self._next_handover)
                    self._poll_sent_at = now
                except PendingCallsLimitExceeded:
                    pass
            return
        ready, _ = ray.wait([self._poll], timeout=0)
        if not ready:
            if now - self._poll_sent_at > self._answer_timeout_s:
                self._down_reason = f"no answer in {self._answer_timeout_s:g} s"
            return
        poll, self._poll = self._poll, None
        try:
            answer = ray.get(poll)
        except ActorDiedError as error:  # Ray will not restart it: start a new one
            self._down_reason = _describe(error)
            self._next_poll_at = now + self._poll_interval_s / 4
            if now >= self._recreate_at:
                self._recreate_at = now + _RECREATE_AFTER_S
                logger.warning("traffic recorder process died for good; starting a new one")
                self._process = self._start_process()
            return
        except RayError as error:  # restarting, or unreachable for now
            self._down_reason = _describe(error)
            self._next_poll_at = now + self._poll_interval_s / 4
            return
        self._apply(answer)
        self._next_poll_at = now + self._poll_interval_s

    def _apply(self, answer: ProcessStats) -> None:
        """Settle the hand-overs ``answer`` accounts for; on a new process, those of the old."""
        with self._lock:
            if self._current is not None and answer.incarnation != self._current.incarnation:
                # The previous process is gone: what it settled is final, and what it had not
                # settled, it never will.
                self._restarts += 1
                self._dropped_requests += self._current.settled_dropped_requests
                self._dropped_rows += self._current.settled_dropped_rows
                logger.warning("traffic recorder process restarted (%d so far)", self._restarts)
            self._current = answer
            self._down_reason = None
            first = answer.first_handover
            while self._unsettled and first is not None:
                handover = self._unsettled[0]
                if handover.number >= first and handover.number > answer.settled_through:
                    break
                self._unsettled.popleft()
                if handover.number < first:  # went to a previous process: send it again
                    self._to_resend.append(handover)
                else:
                    self._unsettled_rows -= handover.rows

    def _settle_lost(self, handovers: list[_HandOver]) -> None:
        """Count the requests of hand-overs no process will record that are not logged."""
        requests = [each for handover in handovers for each in handover.requests()]
        try:
            logged = self._logged({request_id for request_id, _ in requests})
        except Exception:  # the log cannot tell: none of them is known to be logged
            logger.exception("traffic sink: the prediction log could not be read")
            logged = set()
        lost = [(request_id, rows) for request_id, rows in requests if request_id not in logged]
        with self._lock:
            self._unsettled_rows -= sum(handover.rows for handover in handovers)
            self._dropped_requests += len(lost)
            self._dropped_rows += sum(rows for _, rows in lost)
        if lost:
            logger.warning(
                "traffic recorder process lost %d records of %d requests before logging them",
                sum(rows for _, rows in lost),
                len(lost),
            )

    def _logged(self, request_ids: set[str]) -> set[str]:
        if self._feedback_db is None:
            return set()  # profiles only: nothing a dead process held was kept
        if self._feedback is None:
            self._feedback = FeedbackStore(Path(self._feedback_db))
        return self._feedback.logged_requests(request_ids, shadow=self._shadow)

    def _settle_abandoned(self) -> None:
        """After the process stopped: whatever is still unsettled or waiting is settled now."""
        with self._lock:
            handovers = [*self._to_resend, *self._unsettled]
            self._unsettled.clear()
            self._to_resend.clear()
            if self._current is not None:  # final, as the process is gone
                self._dropped_requests += self._current.settled_dropped_requests
                self._dropped_rows += self._current.settled_dropped_rows
                self._current = dataclasses.replace(
                    self._current, settled_dropped_requests=0, settled_dropped_rows=0
                )
            waiting, self._pending = self._pending, []
            self._pending_rows = 0
            for request_id, _, result in waiting:
                self._dropped_requests += 1 if isinstance(request_id, str) else len(request_id)
                self._dropped_rows += len(result)
        if handovers:
            self._settle_lost(handovers)

    # -- what the replica reports --

    def _status(self, answer: ProcessStats | None, reason: str | None) -> TrafficStatus:
        with self._lock:
            shown = answer or self._current
            dropped_requests, dropped_rows = self._dropped_requests, self._dropped_rows
            if self._current is not None:
                dropped_requests += self._current.settled_dropped_requests
                dropped_rows += self._current.settled_dropped_rows
            recorder = {
                field.name: getattr(shown, field.name) if shown is not None else 0
                for field in dataclasses.fields(RecorderStats)
            }
            return TrafficStatus(
                **recorder | {"dropped_requests": dropped_requests, "dropped_rows": dropped_rows},
                status="down" if reason else "ok",
                reason=reason,
                restarts=self._restarts,
                answered_requests=self._answered_requests,
                answered_rows=self._answered_rows,
                unsettled_rows=self._unsettled_rows + self._pending_rows,
            )

    def current_status(self) -> TrafficStatus:
        """The counters as this replica knows them now, without asking the recorder process."""
        return self._status(self._current, self._down_reason)

    def counters(self) -> ReplicaCounters:
        """The replica's counters as they are kept on disk (see the module's docstring)."""
        status = self.current_status()
        return ReplicaCounters(
            model_name=self._model_name,
            model_version=self._model_version,
            replica_id=self._replica_id,
            answered_requests=status.answered_requests,
            answered_rows=status.answered_rows,
            dropped_requests=status.dropped_requests,
            dropped_rows=status.dropped_rows,
            unsettled_rows=status.unsettled_rows,
            recorder_restarts=status.restarts,
            updated_at=datetime.now(UTC).isoformat(),
        )

    def _persist(self, force: bool = False) -> None:
        """Write the counters when they changed, at most every few seconds unless ``force``.

        The tally is brought up to date every time (settled hand-overs change its counts).
        """
        with self._lock:
            self._update_tally()
        now = time.monotonic()
        if not force and now < self._next_persist_at:
            return
        self._next_persist_at = now + 5 * self._poll_interval_s
        counters = self._counters_if_changed()
        if counters is None:
            return
        try:
            write_replica_counters(self._directory, counters)
        except OSError as error:
            logger.warning("traffic sink: counters not written: %s", error)

    def _counters_if_changed(self) -> ReplicaCounters | None:
        counters = self.counters()
        key = dataclasses.astuple(dataclasses.replace(counters, updated_at=""))
        if key == self._persisted:
            return None
        self._persisted = key
        return counters
