"""Live traffic monitoring for the model endpoint: rolling whylogs profiles and a prediction log.

One :class:`TrafficRecorder` per replica takes each request's records and predictions off the
request path (a bounded queue drained by a background thread), profiles them with whylogs in the
training dtypes (:func:`coerce_for_profile`, shared with the reference profile, so both sides are
comparable) into one profile per time window, and writes every window as::

    <directory>/<model_name>/v<version>/<window start %Y%m%dT%H%M%SZ>-<replica_id>[-<n>].bin
    <directory>/<model_name>/v<version>/<same name>.json    # rows, window, model, replica

The JSON sidecar is written after the profile and marks it complete; readers
(:func:`list_traffic_windows`, :func:`load_traffic_profiles`) go by the sidecars and never see a
half-written window. The same thread logs every prediction into a :class:`FeedbackStore`
(SQLite), to which ground-truth labels are joined later by request id and row index.

Nothing here imports Dagster or Ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import queue
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score
from whylogs.core import DatasetProfileView

from mlplatform.drift import profile_frame_fast
from mlplatform.tabular import FeatureSpec, coerce_features

logger = logging.getLogger(__name__)

WINDOW_STAMP = "%Y%m%dT%H%M%SZ"
"""How a window's start (UTC) appears in profile file names."""

_UNSAFE_PATH_CHARACTERS = re.compile(r"[^A-Za-z0-9_.-]+")


def coerce_for_profile(frame: pd.DataFrame, spec: FeatureSpec) -> pd.DataFrame:
    """A frame's features as they are profiled: the same for the training reference and traffic.

    Training dtypes (:func:`~mlplatform.tabular.coerce_features`: numeric -> float, categorical
    -> string, boolean -> 0.0/1.0), with datetimes as ``%Y-%m-%dT%H:%M:%S`` strings in UTC:
    whylogs has no timestamp type, so both sides must format them the same way to be compared.

    Args:
        frame: raw records with every input column of ``spec``.
        spec: the model's feature spec.

    Returns:
        One column per feature, in spec order, same index as ``frame``.

    Raises:
        DataError: if input columns are missing.

    """
    coerced = coerce_features(frame, spec)
    for name in spec.columns_of("datetime"):
        # numpy's formatting in C: the same strings as `.dt.strftime(...)`, 20-50x faster
        stamps = coerced[name].dt.tz_localize(None).to_numpy(dtype="datetime64[s]")
        text = np.datetime_as_string(stamps, unit="s").astype(object)
        text[np.isnat(stamps)] = np.nan
        coerced[name] = text
    return coerced


def _path_part(value: Any, what: str) -> str:
    """``value`` as one safe path component (model names and replica ids come from outside)."""
    cleaned = _UNSAFE_PATH_CHARACTERS.sub("_", str(value)).strip(".")
    if not cleaned:
        raise ValueError(f"{what} {value!r} cannot be used in a file name")
    return cleaned


def _model_directory(directory: Path, model_name: str) -> Path:
    return Path(directory) / _path_part(model_name, "model name")


def _version_directory(directory: Path, model_name: str, version: str) -> Path:
    return _model_directory(directory, model_name) / f"v{_path_part(version, 'model version')}"


def _as_utc(moment: datetime) -> datetime:
    """Naive datetimes are taken as UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


# --- reading profiles back -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrafficWindow:
    """One written window of one replica (from its JSON sidecar; the profile is not opened).

    Attributes:
        model_name: the served model's registered name.
        model_version: the served model version.
        replica_id: the replica that served the traffic.
        start: the window's start (UTC, inclusive).
        end: the window's end (UTC, exclusive).
        rows: records profiled in the window.
        path: the whylogs profile (``.bin``).

    """

    model_name: str
    model_version: str
    replica_id: str
    start: datetime
    end: datetime
    rows: int
    path: Path


class TrafficProfiles(NamedTuple):
    """What :func:`load_traffic_profiles` returns (unpacks as ``view, rows, windows``)."""

    view: DatasetProfileView | None
    rows: int
    windows: list[TrafficWindow]


def _read_sidecar(path: Path) -> TrafficWindow:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        start = datetime.fromisoformat(meta["window_start"])
        return TrafficWindow(
            model_name=str(meta["model_name"]),
            model_version=str(meta["model_version"]),
            replica_id=str(meta["replica_id"]),
            start=start,
            end=datetime.fromtimestamp(start.timestamp() + int(meta["window_s"]), UTC),
            rows=int(meta["rows"]),
            path=path.with_name(meta["profile"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"unreadable traffic window sidecar {path}: {error}") from error


def list_traffic_windows(
    directory: Path,
    model_name: str,
    version: str | None = None,
    since: datetime | None = None,
) -> list[TrafficWindow]:
    """The written traffic windows of a model, oldest first, without opening any profile.

    Args:
        directory: the traffic profiles root the recorders wrote to.
        model_name: the registered model's name.
        version: one model version; ``None`` = every version.
        since: keep windows ending after this moment (naive = UTC); the window containing
            ``since`` is kept whole.

    Returns:
        The windows, sorted by start then replica. Empty when nothing was recorded yet.

    Raises:
        ValueError: if a sidecar is corrupt (delete it and its profile to skip it).

    """
    model_directory = _model_directory(directory, model_name)
    if version is None:
        version_directories = sorted(p for p in model_directory.glob("v*") if p.is_dir())
    else:
        version_directories = [_version_directory(directory, model_name, str(version))]
    cutoff = _as_utc(since) if since is not None else None
    windows = [
        window
        for version_directory in version_directories
        for window in map(_read_sidecar, sorted(version_directory.glob("*.json")))
        if cutoff is None or window.end > cutoff
    ]
    return sorted(windows, key=lambda w: (w.start, w.replica_id, w.path.name))


def load_traffic_profiles(
    directory: Path,
    model_name: str,
    version: str | None = None,
    since: datetime | None = None,
) -> TrafficProfiles:
    """Merge a model's traffic profiles (e.g. every window since the champion was deployed).

    Args:
        directory: the traffic profiles root the recorders wrote to.
        model_name: the registered model's name.
        version: one model version; ``None`` = every version.
        since: keep windows ending after this moment (naive = UTC).

    Returns:
        ``(view, rows, windows)``: the merged profile (``None`` when there is no traffic), the
        records it covers and the windows merged.

    Raises:
        ValueError: if a sidecar is corrupt.
        OSError: if a profile listed by a sidecar cannot be read.

    """
    windows = list_traffic_windows(directory, model_name, version, since)
    view: DatasetProfileView | None = None
    for window in windows:
        part = DatasetProfileView.deserialize(window.path.read_bytes())
        view = part if view is None else view.merge(part)
    return TrafficProfiles(view, sum(w.rows for w in windows), windows)


# --- the prediction log and feedback -------------------------------------------------------------


class PredictionRecord(NamedTuple):
    """One row of the prediction log."""

    request_id: str
    index: int
    model_name: str
    model_version: str
    prediction: Any
    score: float | None
    predicted_at: float


@dataclasses.dataclass(frozen=True)
class FeedbackResult:
    """Outcome of :meth:`FeedbackStore.add_labels`.

    Attributes:
        matched: labels stored against a logged prediction (a repeated label overwrites).
        unknown: ``(request_id, index)`` of labels with no logged prediction; not stored.

    """

    matched: int
    unknown: list[tuple[str, int]]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    request_id TEXT NOT NULL,
    row_index INTEGER NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    prediction,                 -- no affinity: kept as predicted (number or string)
    score REAL,                 -- positive-class probability or predicted value; NULL multiclass
    predicted_at REAL NOT NULL, -- unix seconds
    label,                      -- ground truth as posted (number or string); NULL until labelled
    labelled_at REAL,
    PRIMARY KEY (request_id, row_index)
);
CREATE INDEX IF NOT EXISTS predictions_labelled
    ON predictions (model_name, model_version, predicted_at) WHERE label IS NOT NULL;
"""

LABELLED_COLUMNS = (
    "request_id",
    "index",
    "model_name",
    "model_version",
    "prediction",
    "score",
    "label",
    "predicted_at",
    "labelled_at",
)
"""Columns of :meth:`FeedbackStore.labelled`."""


def _scalar(value: Any, where: str) -> Any:
    """A label as JSON gave it: a string, a finite number or a boolean; anything else is refused."""
    value = _plain(value)
    if isinstance(value, str | bool | int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    raise ValueError(f"{where} must be a string, a finite number or a boolean, got {value!r}")


def _parse_label(position: int, item: Mapping[str, Any]) -> tuple[str, int, Any]:
    where = f"labels[{position}]"
    if not isinstance(item, Mapping):
        raise ValueError(f"{where} must be an object with request_id, index and label")
    request_id = item.get("request_id")
    if not isinstance(request_id, str) or not request_id:
        raise ValueError(f"{where}.request_id must be a non-empty string")
    index = item.get("index", 0)
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"{where}.index must be an integer >= 0, got {index!r}")
    if "label" not in item:
        raise ValueError(f"{where}.label is missing")
    return request_id, index, _scalar(item["label"], f"{where}.label")


class FeedbackStore:
    """The prediction log and its ground-truth labels, in one SQLite file.

    WAL mode and a busy timeout make it safe for several replicas (processes) and threads at once:
    each call opens its own short-lived connection and writes in one transaction. The file must be
    on a local file system (SQLite's WAL does not work over network file systems).
    """

    def __init__(self, path: Path, timeout_s: float = 30.0):
        """Open (creating if needed) the store at ``path``.

        Args:
            path: the SQLite file; its parent directory is created.
            timeout_s: how long a write waits for another writer before failing.

        """
        self.path = Path(path)
        self.timeout_s = timeout_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connection() as connection:
            # WAL is a property of the database file: set once, it holds for every connection.
            connection.execute("PRAGMA journal_mode=WAL")
            connection.executescript(_SCHEMA)

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        connection = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
        try:
            # In WAL mode NORMAL loses no committed data on a crash of the process, only on power
            # loss, and saves an fsync per commit.
            connection.execute("PRAGMA synchronous=NORMAL")
            yield connection
        finally:
            connection.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connection() as connection:
            # IMMEDIATE takes the write lock up front, so a busy database waits (busy timeout)
            # instead of failing halfway through a read-then-write.
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    def log_predictions(self, records: Iterable[PredictionRecord]) -> int:
        """Insert predictions in one transaction; an already logged (request, index) is kept.

        Returns:
            The number of rows inserted.

        """
        with self._transaction() as connection:
            before = connection.total_changes
            connection.executemany(
                "INSERT OR IGNORE INTO predictions (request_id, row_index, model_name,"
                " model_version, prediction, score, predicted_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                records,
            )
            return connection.total_changes - before

    def add_labels(self, items: Sequence[Mapping[str, Any]]) -> FeedbackResult:
        """Join ground-truth labels to logged predictions.

        Args:
            items: ``{"request_id": str, "index": int (default 0), "label": str | number}``, the
                index being the record's position in its request.

        Returns:
            How many labels matched a logged prediction, and which did not (those are not
            stored: the prediction may be unknown, or not logged yet, a few hundred
            milliseconds after the response; retrying then succeeds).

        Raises:
            ValueError: if an item is malformed (naming it); nothing is stored then.

        """
        parsed = [_parse_label(position, item) for position, item in enumerate(items)]
        matched, unknown = 0, []
        now = time.time()
        with self._transaction() as connection:
            for request_id, index, label in parsed:
                cursor = connection.execute(
                    "UPDATE predictions SET label = ?, labelled_at = ?"
                    " WHERE request_id = ? AND row_index = ?",
                    (label, now, request_id, index),
                )
                if cursor.rowcount:
                    matched += 1
                else:
                    unknown.append((request_id, index))
        return FeedbackResult(matched=matched, unknown=unknown)

    def labelled(
        self,
        model_version: str | None = None,
        since: datetime | None = None,
        model_name: str | None = None,
    ) -> pd.DataFrame:
        """Logged predictions that have a label, for the live performance estimate.

        Args:
            model_version: only this model version.
            since: only predictions made at or after this moment (naive = UTC).
            model_name: only this model.

        Returns:
            One row per labelled record with :data:`LABELLED_COLUMNS`; ``predicted_at`` and
            ``labelled_at`` are UTC timestamps, ``prediction`` and ``label`` as given.

        """
        clauses, parameters = ["label IS NOT NULL"], []
        if model_name is not None:
            clauses.append("model_name = ?")
            parameters.append(model_name)
        if model_version is not None:
            clauses.append("model_version = ?")
            parameters.append(str(model_version))
        if since is not None:
            clauses.append("predicted_at >= ?")
            parameters.append(_as_utc(since).timestamp())
        with self._connection() as connection:
            rows = connection.execute(
                "SELECT request_id, row_index, model_name, model_version, prediction, score,"
                " label, predicted_at, labelled_at FROM predictions WHERE "
                + " AND ".join(clauses)
                + " ORDER BY predicted_at, request_id, row_index",
                parameters,
            ).fetchall()
        frame = pd.DataFrame(rows, columns=list(LABELLED_COLUMNS))
        for column in ("predicted_at", "labelled_at"):
            frame[column] = pd.to_datetime(frame[column].astype(float), unit="s", utc=True)
        frame["score"] = frame["score"].astype(float)
        return frame

    def count(self) -> int:
        """Logged predictions (labelled or not)."""
        with self._connection() as connection:
            return int(connection.execute("SELECT COUNT(*) FROM predictions").fetchone()[0])


def _binary_positive(labels: np.ndarray, predictions: np.ndarray, positive_class: Any) -> Any:
    if positive_class is not None:
        return positive_class
    values = set(labels.tolist()) | set(predictions.tolist())
    if values <= {0, 1}:  # also 0.0/1.0 and False/True, which hash and compare equal
        return 1
    raise ValueError(
        f"binary labels are not 0/1 ({sorted(map(str, values))[:5]}); "
        "pass positive_class (the model spec's positive class)"
    )


def live_performance(
    frame: pd.DataFrame,
    task: Literal["binary", "multiclass", "regression"],
    positive_class: Any = None,
) -> dict[str, float | int]:
    """Performance of the served model on labelled traffic (a :meth:`FeedbackStore.labelled` frame).

    Labels and predictions are compared as given (``1 == 1.0``, ``"1" != 1``).

    Args:
        frame: columns ``prediction``, ``label`` and, for ``roc_auc``, ``score``.
        task: ``binary`` (rows, accuracy, roc_auc when both classes are labelled),
            ``multiclass`` (rows, accuracy) or ``regression`` (rows, mae, rmse).
        positive_class: the class ``score`` is the probability of (binary only); ``None``
            means 1, which is only accepted when labels and predictions are 0/1.

    Returns:
        The metrics; ``{"rows": 0}`` without labelled rows.

    Raises:
        ValueError: for an unknown task, non-numeric regression labels, or binary labels that are
            not 0/1 without ``positive_class``.

    """
    if task not in ("binary", "multiclass", "regression"):
        raise ValueError(f"task must be binary, multiclass or regression, got {task!r}")
    rows = len(frame)
    if rows == 0:
        return {"rows": 0}
    labels = frame["label"].to_numpy(dtype=object)
    predictions = frame["prediction"].to_numpy(dtype=object)
    if task == "regression":
        try:
            errors = predictions.astype(float) - labels.astype(float)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"regression labels and predictions must be numbers: {error}"
            ) from None
        return {
            "rows": rows,
            "mae": float(np.mean(np.abs(errors))),
            "rmse": float(np.sqrt(np.mean(errors**2))),
        }
    metrics: dict[str, float | int] = {
        "rows": rows,
        "accuracy": float(np.mean(predictions == labels)),
    }
    if task == "binary":
        positive = _binary_positive(labels, predictions, positive_class)
        scores = frame["score"].to_numpy(dtype=float)
        known = ~np.isnan(scores)
        truth = (labels == positive)[known].astype(int)
        if len(np.unique(truth)) == 2:
            metrics["roc_auc"] = float(roc_auc_score(truth, scores[known]))
    return metrics


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


def _plain(value: Any) -> Any:
    """Numpy scalars (which sqlite3 cannot bind) -> Python scalars."""
    return value.item() if isinstance(value, np.generic) else value


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
    up to ``linger_s`` and profiled together) into the profile of their window. A window is
    written when the clock passes its end, on :meth:`flush` and on :meth:`close`; a window written
    twice (a flush, a restart within the minute, late records) gets a new file name, never
    overwriting.
    """

    def __init__(
        self,
        directory: Path,
        model_name: str,
        model_version: str,
        spec: FeatureSpec,
        replica_id: str,
        window_s: int = 60,
        max_queue: int = 10_000,
        clock: Callable[[], float] = time.time,
        *,
        feedback: FeedbackStore | None = None,
        linger_s: float = 1.0,
        max_batch_rows: int = 5_000,
        drain_interval_s: float = 0.0,
    ):
        """Start recording (the background thread starts now).

        Args:
            directory: the traffic profiles root (e.g. ``<home>/profiles/traffic``).
            model_name: the served model's registered name.
            model_version: the served model version.
            spec: the model's feature spec (the records' columns and training dtypes).
            replica_id: this replica's id, part of every file name (any string).
            window_s: window length in seconds; windows start at multiples of it (UTC epoch).
            max_queue: requests waiting to be processed before :meth:`record` drops new ones.
            clock: seconds since the epoch (tests pass a controllable one).
            feedback: where to log predictions; ``None`` = profiles only.
            linger_s: longest a record waits to be profiled with others (not for the log).
            max_batch_rows: records profiled in one whylogs call at most.
            drain_interval_s: shortest time between two takes from the queue: the thread then
                logs several requests' predictions in one SQLite transaction (each costs a
                connection and a commit) instead of one transaction per request under load.

        Raises:
            ValueError: for a non-positive window, queue or batch size, or an unusable name.

        """
        if window_s <= 0 or max_queue <= 0 or max_batch_rows <= 0:
            raise ValueError("window_s, max_queue and max_batch_rows must be positive")
        self.model_name = str(model_name)
        self.model_version = str(model_version)
        self.replica_id = str(replica_id)
        self.spec = spec
        self.window_s = int(window_s)
        self.directory = _version_directory(Path(directory), self.model_name, self.model_version)
        self._file_prefix = _path_part(self.replica_id, "replica id")
        self._clock = clock
        self._feedback = feedback
        self._linger_s = linger_s
        self._max_batch_rows = max_batch_rows
        self._drain_interval_s = drain_interval_s
        self._last_drain = 0.0
        self._feature_columns = list(spec.features)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
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
        self._thread = threading.Thread(
            target=self._run, name=f"traffic-recorder-{self._file_prefix}", daemon=True
        )
        self._thread.start()

    # -- caller side (request handlers) --

    def record(
        self,
        request_id: str | Sequence[str],
        frame: pd.DataFrame | Sequence[Mapping[str, Any]],
        result: pd.DataFrame,
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
                or per-class probability columns for classifiers).

        Returns:
            Whether the request(s) were queued (``False``: dropped and counted).

        Raises:
            ValueError: if ``frame``, ``result`` (and the list of ids) have different lengths.

        """
        if len(frame) != len(result):
            raise ValueError(f"{len(frame)} records but {len(result)} predictions")
        if not isinstance(request_id, str) and len(request_id) != len(frame):
            raise ValueError(f"{len(frame)} records but {len(request_id)} request ids")
        if not self._closing:
            try:
                self._queue.put_nowait((self._clock(), request_id, frame, result))
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
                self._guarded(self._log_predictions, batch)
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
            for start in sorted(self._windows):
                if marker is not None or start + self.window_s <= now:
                    self._guarded(self._write_window, start)
            if marker is not None:
                marker.done.set()
                if marker.stop:
                    return

    def _drain(self, timeout: float) -> tuple[_Marker | None, _Batch | None]:
        """Wait up to ``timeout`` for a request, then take what is queued, up to a marker."""
        items: list[tuple[float, Any, pd.DataFrame, pd.DataFrame]] = []
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
            return marker, None

    def _to_batch(self, items: list[tuple[float, Any, pd.DataFrame, pd.DataFrame]]) -> _Batch:
        lengths = np.fromiter((len(item[2]) for item in items), dtype=np.int64, count=len(items))
        request_ids: list[str] = []
        indices: list[int] = []
        for _, ids, frame, _ in items:
            if isinstance(ids, str):  # one request, its records 0..n-1
                request_ids.extend(itertools.repeat(ids, len(frame)))
                indices.extend(range(len(frame)))
            else:  # one-record requests, micro-batched
                request_ids.extend(ids)
                indices.extend(itertools.repeat(0, len(ids)))
        return _Batch(
            features=_stack([item[2] for item in items], self._feature_columns),
            results=_stack([item[3] for item in items], list(items[0][3].columns)),
            timestamps=np.repeat([item[0] for item in items], lengths),
            request_ids=request_ids,
            indices=indices,
        )

    def _guarded(self, step: Callable[..., Any], *args: Any) -> None:
        """Run a step of the thread; an error is logged and counted, and the thread goes on."""
        try:
            step(*args)
        except Exception:
            self._errors += 1
            logger.exception("traffic recorder: %s failed", step.__name__)

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
                map(_plain, batch.results["prediction"].tolist()),
                _scores(batch.results),
                batch.timestamps.tolist(),
                strict=False,
            ),
        )
        self._logged_rows += self._feedback.log_predictions(records)

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
        self.directory.mkdir(parents=True, exist_ok=True)
        moment = datetime.fromtimestamp(start, UTC)
        stem = f"{moment.strftime(WINDOW_STAMP)}-{self._file_prefix}"
        temporary = self.directory / f".{stem}.{uuid.uuid4().hex}.tmp"
        temporary.write_bytes(window.view.serialize())
        try:
            profile_path = _claim_unique(temporary, self.directory, stem)
        finally:
            temporary.unlink(missing_ok=True)
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
        temporary_sidecar = self.directory / f".{profile_path.stem}.{uuid.uuid4().hex}.tmp"
        temporary_sidecar.write_text(json.dumps(sidecar, indent=1), encoding="utf-8")
        os.replace(temporary_sidecar, profile_path.with_suffix(".json"))
        self._windows_written += 1


def _claim_unique(source: Path, directory: Path, stem: str) -> Path:
    """Give ``source`` the first free name ``<stem>.bin``, ``<stem>-1.bin``, ... atomically.

    A hard link fails if the name exists, so two writers (a replica and its restarted self) can
    never overwrite each other's window.
    """
    for n in itertools.count():
        target = directory / (f"{stem}.bin" if n == 0 else f"{stem}-{n}.bin")
        try:
            os.link(source, target)
            return target
        except FileExistsError:
            continue
        except OSError:
            # No hard links on this file system: check then rename (racy only between two
            # writers with the same replica id in the same second).
            if target.exists():
                continue
            os.replace(source, target)
            return target
    raise AssertionError("unreachable")
