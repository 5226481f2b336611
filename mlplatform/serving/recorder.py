"""Live traffic off the request path: the replica's recorder of profiles and predictions.

One :class:`TrafficRecorder` per replica takes each request's records and predictions off the
request path (a bounded queue drained by a background thread), profiles them with whylogs in the
training dtypes into one profile per time window (see :mod:`mlplatform.monitoring.profiles`),
logs every prediction into a :class:`~mlplatform.monitoring.feedback.FeedbackStore`, and deletes
windows and predictions older than the retention.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from whylogs.core import DatasetProfileView

from mlplatform.model.spec import FeatureSpec, plain
from mlplatform.monitoring.durable import write_atomically, write_new
from mlplatform.monitoring.feedback import FeedbackStore, PredictionRecord
from mlplatform.monitoring.profiles import (
    WINDOW_STAMP,
    coerce_for_profile,
    path_part,
    profile_frame_fast,
    prune_traffic_windows,
    version_directory,
)
from mlplatform.serving.settings import TrafficKnobs
from mlplatform.tasks.base import ModelOutput

logger = logging.getLogger(__name__)

PRUNE_INTERVAL_S = 3600.0
"""Shortest time between two retention passes of a recorder (checked when a window is written).

Windows close every minute, but the retention is counted in days: pruning hourly overshoots it
by at most an hour, and keeps the cost of deleting from the prediction log (a scan of the table,
which has no index on the time of unlabelled rows) negligible.
"""

SettledItems = list[tuple[Hashable, int, int]]
"""``(tag, requests, rows)`` of each recorded item a :class:`TrafficRecorder` has finished with."""

# --- the recorder --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RecorderStats:
    """Counters of a :class:`TrafficRecorder` (``accepted = received + queued``).

    Attributes:
        received_requests: requests taken off the queue by the background thread.
        received_rows: their records.
        dropped_requests: requests not recorded because the queue was full or it was closed.
        dropped_rows: their records.
        queued: requests waiting in the queue now.
        profiled_rows: records merged into a window profile.
        logged_rows: predictions inserted into the prediction log.
        windows_written: profile files written.
        errors: failures of the background thread (logged with their traceback).
        pruned_windows: profiles deleted because they were older than the retention.
        pruned_predictions: logged predictions deleted for the same reason.

    """

    received_requests: int
    received_rows: int
    dropped_requests: int
    dropped_rows: int
    queued: int
    profiled_rows: int
    logged_rows: int
    windows_written: int
    errors: int
    pruned_windows: int
    pruned_predictions: int


@dataclasses.dataclass
class _Window:
    view: DatasetProfileView | None = None
    rows: int = 0


@dataclasses.dataclass
class _Batch:
    """Requests drained together, stacked into frames (one row per record)."""

    features: pd.DataFrame
    results: pd.DataFrame
    timestamps: np.ndarray
    request_ids: list[str]
    indices: list[int]
    items: SettledItems


@dataclasses.dataclass
class _Marker:
    """A flush (or, with ``stop``, close) request travelling through the queue behind records."""

    stop: bool
    done: threading.Event = dataclasses.field(default_factory=threading.Event)


def _stack(
    parts: Sequence[pd.DataFrame | Sequence[Mapping[str, Any]]], columns: list[str]
) -> pd.DataFrame:
    """One frame of many requests' rows: frames, or records as posted (mappings), or both.

    ``pd.concat`` reconciles dtypes and indexes frame by frame (about 150 us per single-row
    frame); one object array per part and a final ``infer_objects`` is 5-10x faster, and records
    never become small frames of their own.
    """
    if len(parts) == 1 and isinstance(parts[0], pd.DataFrame):  # nothing to reconcile
        return parts[0] if list(parts[0].columns) == columns else parts[0][columns]
    arrays = [
        (part if list(part.columns) == columns else part[columns]).to_numpy(dtype=object)
        if isinstance(part, pd.DataFrame)
        else np.array([[record.get(name) for name in columns] for record in part], dtype=object)
        for part in parts
    ]
    return pd.DataFrame(np.concatenate(arrays), columns=columns).infer_objects()


def _stack_outputs(outputs: Sequence[ModelOutput]) -> pd.DataFrame:
    """One frame of many requests' model outputs, column by column (their dtypes kept)."""
    return pd.DataFrame(
        {name: np.concatenate([output[name] for output in outputs]) for name in outputs[0].names}
    )


def _scores(results: pd.DataFrame) -> list[float | None]:
    """The prediction log's score: positive-class probability, or the value of a regression."""
    if "probability" in results.columns:
        values = results["probability"]
    elif list(results.columns) == ["prediction"] and pd.api.types.is_float_dtype(
        results["prediction"]
    ):
        values = results["prediction"]
    else:  # per-class probabilities (multiclass): no single score
        return [None] * len(results)
    return [None if math.isnan(v) else v for v in values.astype(float).tolist()]


class TrafficRecorder:
    """Profiles a replica's traffic in rolling windows and logs its predictions, off the hot path.

    :meth:`record` only puts the request on a bounded queue (a full queue drops it and counts the
    drop). A daemon thread drains the queue, logs the predictions to the :class:`FeedbackStore`
    at once (so labels can be joined soon after the response), and profiles the records in
    batches (whylogs costs about 25 ms per call whatever the size, so single records are held for
    up to ``traffic_linger_s`` and profiled together) into the profile of their window. A window is
    written when the clock passes its end, on :meth:`flush` and on :meth:`close`, durably and
    whole (:mod:`mlplatform.monitoring.durable`); a window written twice (a flush, a restart
    within the minute, late records) gets a new file name, never overwriting. When a window is
    written, at most every :data:`PRUNE_INTERVAL_S`, windows and logged predictions of the model
    older than ``traffic_retention_days``, or beyond ``traffic_retention_mb`` and
    ``prediction_log_max_rows`` (oldest first), are deleted.
    """

    def __init__(
        self,
        directory: Path,
        model_name: str,
        model_version: str,
        spec: FeatureSpec,
        replica_id: str,
        settings: TrafficKnobs | None = None,
        clock: Callable[[], float] = time.time,
        *,
        feedback: FeedbackStore | None = None,
        on_settled: Callable[[SettledItems, bool], None] | None = None,
        shadow: bool = False,
    ):
        """Start recording (the background thread starts now).

        Args:
            directory: the traffic profiles root (e.g. ``<home>/profiles/traffic``).
            model_name: the served model's registered name.
            model_version: the served model version.
            spec: the model's feature spec (the records' columns and training dtypes).
            replica_id: this replica's id, part of every file name (any string).
            settings: window length (windows start at multiples of it, UTC epoch), queue bound
                (requests waiting before :meth:`record` drops new ones), linger and batch size
                of profiling, and the drain interval (the thread then logs several requests'
                predictions in one SQLite transaction, each costing a connection and a commit,
                instead of one per request under load), and the retention; ``None`` = the
                serving defaults.
            clock: seconds since the epoch (tests pass a controllable one).
            feedback: where to log predictions; ``None`` = profiles only.
            on_settled: called from the background thread once it has finished with recorded
                items: their ``(tag, requests, rows)`` (tags as given to :meth:`record`), and
                whether their predictions are in the log (``False``: an error lost them).
                Lets a caller account for every record it handed over.
            shadow: the version scores in shadow beside the champion: its predictions are
                logged as shadow predictions (:meth:`FeedbackStore.log_shadow_predictions`), and
                the records are not profiled (they are the champion's, profiled by its recorder).

        Raises:
            ValueError: for an unusable name.

        """
        settings = TrafficKnobs() if settings is None else settings
        self.model_name = str(model_name)
        self.model_version = str(model_version)
        self.replica_id = str(replica_id)
        self.spec = spec
        self.window_s = settings.traffic_window_s
        self._root = Path(directory)
        self.directory = version_directory(self._root, self.model_name, self.model_version)
        self._file_prefix = path_part(self.replica_id, "replica id")
        self._clock = clock
        self._feedback = feedback
        self._on_settled = on_settled
        self._shadow = shadow
        self._retention_s = settings.traffic_retention_days * 86_400
        self._retention_bytes = int(settings.traffic_retention_mb * 2**20)
        self._max_logged_predictions = settings.prediction_log_max_rows
        self._next_prune = 0.0
        self._linger_s = settings.traffic_linger_s
        self._max_batch_rows = settings.traffic_batch_rows
        self._drain_interval_s = settings.traffic_drain_interval_s
        self._last_drain = 0.0
        self._feature_columns = list(spec.features)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=settings.traffic_max_queue)
        self._windows: dict[int, _Window] = {}
        self._closing = False
        self._drop_lock = threading.Lock()
        self._dropped_requests = 0
        self._dropped_rows = 0
        self._received_requests = 0
        self._received_rows = 0
        self._profiled_rows = 0
        self._logged_rows = 0
        self._windows_written = 0
        self._errors = 0
        self._pruned_windows = 0
        self._pruned_predictions = 0
        self._thread = threading.Thread(
            target=self._run, name=f"traffic-recorder-{self._file_prefix}", daemon=True
        )
        self._thread.start()

    # -- caller side (request handlers) --

    def record(
        self,
        request_id: str | Sequence[str],
        frame: pd.DataFrame | Sequence[Mapping[str, Any]],
        result: ModelOutput | pd.DataFrame,
        *,
        tag: Hashable = None,
    ) -> bool:
        """Queue one request's records and predictions (or many one-record requests'); never blocks.

        The records are kept by reference until processed: do not modify them afterwards.

        Args:
            request_id: the id returned to the client (labels are joined on it and the record's
                position); or one id per row, for rows that are one-record requests each (a
                micro-batch), every row being record 0 of its request.
            frame: the validated raw records: a frame, or the records as posted (they become
                a frame in the background, together with the other requests' records).
            result: the model's output for them, row for row (``prediction``, and ``probability``
                or per-class probability columns for classifiers); a frame, as a pyfunc model
                returns it, is taken too.
            tag: handed back to ``on_settled`` with this item once it is processed.

        Returns:
            Whether the request(s) were queued (``False``: dropped and counted).

        Raises:
            ValueError: if ``frame``, ``result`` (and the list of ids) have different lengths.

        """
        if isinstance(result, pd.DataFrame):
            result = ModelOutput.of_frame(result)
        if len(frame) != len(result):
            raise ValueError(f"{len(frame)} records but {len(result)} predictions")
        if not isinstance(request_id, str) and len(request_id) != len(frame):
            raise ValueError(f"{len(frame)} records but {len(request_id)} request ids")
        if not self._closing:
            try:
                self._queue.put_nowait((self._clock(), request_id, frame, result, tag))
                return True
            except queue.Full:
                pass
        with self._drop_lock:
            self._dropped_requests += 1 if isinstance(request_id, str) else len(request_id)
            self._dropped_rows += len(frame)
        return False

    def stats(self) -> RecorderStats:
        """The recorder's counters now."""
        return RecorderStats(
            received_requests=self._received_requests,
            received_rows=self._received_rows,
            dropped_requests=self._dropped_requests,
            dropped_rows=self._dropped_rows,
            queued=self._queue.qsize(),
            profiled_rows=self._profiled_rows,
            logged_rows=self._logged_rows,
            windows_written=self._windows_written,
            errors=self._errors,
            pruned_windows=self._pruned_windows,
            pruned_predictions=self._pruned_predictions,
        )

    def flush(self, timeout: float | None = 60.0) -> None:
        """Process everything recorded so far and write every open window, even partial ones.

        Records arriving later in the same window go to a new file for that window.

        Raises:
            TimeoutError: if the background thread did not finish within ``timeout`` seconds.

        """
        if self._closing:
            return
        self._send(_Marker(stop=False), timeout)

    def close(self, timeout: float | None = 60.0) -> None:
        """Process everything recorded so far, write every open window and stop the thread.

        Later :meth:`record` calls are dropped (and counted). Calling it again does nothing.

        Raises:
            TimeoutError: if the background thread did not finish within ``timeout`` seconds.

        """
        if self._closing:
            self._thread.join(timeout)
            return
        self._closing = True
        self._send(_Marker(stop=True), timeout)
        self._thread.join(timeout)

    def __enter__(self) -> TrafficRecorder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _send(self, marker: _Marker, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            # Blocks while the queue is full: the thread is draining it, and the marker must
            # travel behind the records it is meant to flush.
            self._queue.put(marker, timeout=timeout)
        except queue.Full:
            raise TimeoutError(f"traffic recorder queue still full after {timeout} s") from None
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not marker.done.wait(remaining):
            raise TimeoutError(f"traffic recorder did not flush within {timeout} s")

    # -- background thread --

    def _run(self) -> None:
        pending: list[_Batch] = []
        pending_rows = 0
        pending_since = 0.0
        idle_poll_s = min(1.0, self.window_s / 4)
        while True:
            if pending:  # wake up when the records have lingered enough, or their window ends
                window_end = self._window_start(pending[0].timestamps[0]) + self.window_s
                timeout = max(
                    0.0,
                    min(
                        pending_since + self._linger_s - time.monotonic(),
                        window_end - self._clock(),
                    ),
                )
            else:
                timeout = idle_poll_s
            marker, batch = self._drain(timeout)
            if batch is not None:
                self._settle(batch.items, self._guarded(self._log_predictions, batch))
            if batch is not None and not self._shadow:  # in shadow the champion profiles them
                if not pending:
                    pending_since = time.monotonic()
                pending.append(batch)
                pending_rows += len(batch.features)
            now = self._clock()
            if pending and (
                marker is not None
                or pending_rows >= self._max_batch_rows
                or time.monotonic() - pending_since >= self._linger_s
                or self._window_start(pending[0].timestamps[0]) + self.window_s <= now
            ):
                self._guarded(self._profile, pending)
                pending, pending_rows = [], 0
            written = 0
            for start in sorted(self._windows):
                if marker is not None or start + self.window_s <= now:
                    written += self._guarded(self._write_window, start)
            if written and self._clock() >= self._next_prune:
                self._guarded(self._prune)
            if marker is not None:
                marker.done.set()
                if marker.stop:
                    return

    def _drain(self, timeout: float) -> tuple[_Marker | None, _Batch | None]:
        """Wait up to ``timeout`` for a request, then take what is queued, up to a marker."""
        items: list[tuple[float, Any, Any, ModelOutput, Hashable]] = []
        marker, rows = None, 0
        try:
            item = self._queue.get(timeout=timeout)
            if not isinstance(item, _Marker):  # let a busy replica's requests gather
                time.sleep(max(0.0, self._last_drain + self._drain_interval_s - time.monotonic()))
            self._last_drain = time.monotonic()
            while True:
                if isinstance(item, _Marker):
                    marker = item
                    break
                items.append(item)
                rows += len(item[2])
                if rows >= self._max_batch_rows:
                    break
                item = self._queue.get_nowait()
        except queue.Empty:
            pass
        if not items:
            return marker, None
        self._received_requests += sum(
            1 if isinstance(item[1], str) else len(item[1]) for item in items
        )
        self._received_rows += rows
        try:
            return marker, self._to_batch(items)
        except Exception:
            self._errors += 1
            logger.exception("traffic recorder: %d requests could not be read", len(items))
            self._settle(_settled_items(items), logged=False)
            return marker, None

    def _to_batch(self, items: list[tuple[float, Any, Any, ModelOutput, Hashable]]) -> _Batch:
        lengths = np.fromiter((len(item[2]) for item in items), dtype=np.int64, count=len(items))
        request_ids: list[str] = []
        indices: list[int] = []
        for _, ids, frame, _, _ in items:
            if isinstance(ids, str):  # one request, its records 0..n-1
                request_ids.extend(itertools.repeat(ids, len(frame)))
                indices.extend(range(len(frame)))
            else:  # one-record requests, micro-batched
                request_ids.extend(ids)
                indices.extend(itertools.repeat(0, len(ids)))
        return _Batch(
            features=_stack([item[2] for item in items], self._feature_columns),
            results=_stack_outputs([item[3] for item in items]),
            timestamps=np.repeat([item[0] for item in items], lengths),
            request_ids=request_ids,
            indices=indices,
            items=_settled_items(items),
        )

    def _guarded(self, step: Callable[..., Any], *args: Any) -> bool:
        """Run a step of the thread; an error is logged and counted, and the thread goes on.

        Returns:
            Whether the step succeeded.

        """
        try:
            step(*args)
        except Exception:
            self._errors += 1
            logger.exception("traffic recorder: %s failed", step.__name__)
            return False
        return True

    def _settle(self, items: SettledItems, logged: bool) -> None:
        if self._on_settled is not None:
            self._guarded(self._on_settled, items, logged)

    def _log_predictions(self, batch: _Batch) -> None:
        if self._feedback is None:
            return
        records = map(
            PredictionRecord._make,
            zip(
                batch.request_ids,
                batch.indices,
                itertools.repeat(self.model_name),
                itertools.repeat(self.model_version),
                map(plain, batch.results["prediction"].tolist()),
                _scores(batch.results),
                batch.timestamps.tolist(),
                strict=False,
            ),
        )
        log = (
            self._feedback.log_shadow_predictions
            if self._shadow
            else self._feedback.log_predictions
        )
        self._logged_rows += log(records)

    def _window_start(self, timestamp: float) -> int:
        return int(timestamp // self.window_s) * self.window_s

    def _profile(self, batches: list[_Batch]) -> None:
        features = pd.concat([b.features for b in batches], ignore_index=True)
        results = pd.concat([b.results for b in batches], ignore_index=True)
        data = coerce_for_profile(features, self.spec)
        for name in results.columns:
            data[name] = results[name].to_numpy()
        timestamps = np.concatenate([b.timestamps for b in batches])
        starts = (timestamps // self.window_s).astype(np.int64) * self.window_s
        distinct = np.unique(starts).tolist()
        for start in distinct:
            part = data if len(distinct) == 1 else data[starts == start].reset_index(drop=True)
            window = self._windows.setdefault(start, _Window())
            view = profile_frame_fast(part)
            window.view = view if window.view is None else window.view.merge(view)
            window.rows += len(part)
            self._profiled_rows += len(part)

    def _write_window(self, start: int) -> None:
        window = self._windows.pop(start)
        if window.rows == 0:
            return
        moment = datetime.fromtimestamp(start, UTC)
        stem = f"{moment.strftime(WINDOW_STAMP)}-{self._file_prefix}"
        profile_path = write_new(self.directory, stem, ".bin", window.view.serialize())
        sidecar = {
            "model_name": self.model_name,
            "model_version": self.model_version,
            "replica_id": self.replica_id,
            "window_start": moment.isoformat(),
            "window_s": self.window_s,
            "rows": window.rows,
            "profile": profile_path.name,
            "written_at": datetime.fromtimestamp(self._clock(), UTC).isoformat(),
        }
        write_atomically(profile_path.with_suffix(".json"), json.dumps(sidecar, indent=1).encode())
        self._windows_written += 1

    def _prune(self) -> None:
        """Delete this model's windows and logged predictions older or more than the retention."""
        now = self._clock()
        self._next_prune = now + PRUNE_INTERVAL_S  # also after a failure: retried in an hour
        cutoff = datetime.fromtimestamp(now - self._retention_s, UTC)
        self._pruned_windows += prune_traffic_windows(
            self._root, self.model_name, cutoff, max_bytes=self._retention_bytes
        )
        if self._feedback is not None:
            self._pruned_predictions += self._feedback.prune(
                cutoff, self.model_name, max_rows=self._max_logged_predictions
            )


def _settled_items(
    items: list[tuple[float, Any, Any, ModelOutput, Hashable]],
) -> SettledItems:
    """``(tag, requests, rows)`` of queued items (a list of ids is that many requests)."""
    return [
        (tag, 1 if isinstance(ids, str) else len(ids), len(frame))
        for _, ids, frame, _, tag in items
    ]
