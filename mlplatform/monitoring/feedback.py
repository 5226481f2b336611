"""The prediction log, ground-truth labels joined to it, and the live metrics they give.

Every prediction the endpoint serves is logged in SQLite by request id and row index; labels
posted later to ``/feedback`` are joined to it, and :func:`live_performance` scores the model on
the labelled rows. Nothing here imports Dagster or Ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple

import pandas as pd

from mlplatform.model.spec import plain
from mlplatform.monitoring.profiles import as_utc
from mlplatform.tasks.base import Task
from mlplatform.tasks.strategies import strategy_for

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


class FeedbackUnavailable(RuntimeError):
    """The prediction log cannot be written now (disk full, I/O error, locked past the timeout).

    The write was rolled back: nothing of it is stored, and the same call can be retried later.
    """


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
-- A challenger in shadow scores the same records as the champion; its predictions are kept apart
-- (the answer is the champion's) and paired with the champion's by request id and row index.
CREATE TABLE IF NOT EXISTS shadow_predictions (
    request_id TEXT NOT NULL,
    row_index INTEGER NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    prediction,
    score REAL,
    predicted_at REAL NOT NULL,
    PRIMARY KEY (request_id, row_index, model_version)
);
CREATE INDEX IF NOT EXISTS shadow_predictions_version
    ON shadow_predictions (model_name, model_version, predicted_at);
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

PAIRED_COLUMNS = (
    "request_id",
    "index",
    "champion_prediction",
    "champion_score",
    "challenger_prediction",
    "challenger_score",
    "label",
    "predicted_at",
)
"""Columns of :meth:`FeedbackStore.shadow_pairs`."""


# SQLite's INTEGER is 64-bit: larger Python integers cannot be bound to a statement.
_SQLITE_INTEGERS = range(-(2**63), 2**63)


def _scalar(value: Any, where: str) -> Any:
    """A label as JSON gave it: a string, a finite number or a boolean; anything else is refused.

    An integer beyond SQLite's 64-bit range is stored as the float it is closest to (JSON has one
    number type), or refused when no float holds it.
    """
    value = plain(value)
    if isinstance(value, str | bool) or (isinstance(value, int) and value in _SQLITE_INTEGERS):
        return value
    if isinstance(value, int):
        try:
            value = float(value)
        except OverflowError:
            raise ValueError(
                f"{where} must be a string, a finite number or a boolean, got an integer of "
                f"{len(str(abs(value)))} digits"
            ) from None
    if isinstance(value, float) and math.isfinite(value):
        return value
    shown = repr(value) if len(repr(value)) <= 80 else f"a {type(value).__name__}"
    raise ValueError(f"{where} must be a string, a finite number or a boolean, got {shown}")


def _parse_label(position: int, item: Mapping[str, Any]) -> tuple[str, int, Any]:
    where = f"labels[{position}]"
    if not isinstance(item, Mapping):
        raise ValueError(f"{where} must be an object with request_id, index and label")
    request_id = item.get("request_id")
    if not isinstance(request_id, str) or not request_id:
        raise ValueError(f"{where}.request_id must be a non-empty string")
    index = item.get("index", 0)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < 2**63:
        shown = repr(index) if len(repr(index)) <= 80 else f"a {type(index).__name__}"
        raise ValueError(f"{where}.index must be an integer from 0 to 2**63 - 1, got {shown}")
    if "label" not in item:
        raise ValueError(f"{where}.label is missing")
    return request_id, index, _scalar(item["label"], f"{where}.label")


class FeedbackStore:
    """The prediction log and its ground-truth labels, in one SQLite file.

    WAL mode and a busy timeout make it safe for several replicas (processes) and threads at once:
    each call opens its own short-lived connection and writes in one transaction. The file must be
    on a local file system (SQLite's WAL does not work over network file systems).

    A write that fails (disk full, I/O error, locked beyond ``timeout_s``) is rolled back whole,
    counted in :attr:`failed_writes` and raised as :class:`FeedbackUnavailable`.
    """

    def __init__(self, path: Path, timeout_s: float = 30.0):
        """Open (creating if needed) the store at ``path``.

        Args:
            path: the SQLite file; its parent directory is created.
            timeout_s: how long a write waits for another writer before failing.

        """
        self.path = Path(path)
        self.timeout_s = timeout_s
        self._failures_lock = threading.Lock()
        self._failed_writes = 0
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

    @property
    def failed_writes(self) -> int:
        """Writes of this store object that failed and were rolled back (see the class)."""
        return self._failed_writes

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            with self._connection() as connection:
                # IMMEDIATE takes the write lock up front, so a busy database waits (busy
                # timeout) instead of failing halfway through a read-then-write.
                connection.execute("BEGIN IMMEDIATE")
                try:
                    yield connection
                    connection.execute("COMMIT")  # a full disk may fail here, writing the WAL
                except BaseException:
                    # SQLite may already have rolled back (it does on some I/O errors); a second
                    # ROLLBACK would then fail and hide the error that matters.
                    if connection.in_transaction:
                        connection.execute("ROLLBACK")
                    raise
        except sqlite3.OperationalError as error:
            with self._failures_lock:
                self._failed_writes += 1
            raise FeedbackUnavailable(
                f"the prediction log {self.path} cannot be written now ({error}); nothing was "
                "stored"
            ) from error

    def log_predictions(self, records: Iterable[PredictionRecord]) -> int:
        """Insert predictions in one transaction; an already logged (request, index) is kept.

        Returns:
            The number of rows inserted.

        Raises:
            FeedbackUnavailable: if the log cannot be written now; nothing is stored then.

        """
        return self._insert("predictions", records)

    def log_shadow_predictions(self, records: Iterable[PredictionRecord]) -> int:
        """Insert a shadowed challenger's predictions in one transaction (kept if logged already).

        The records are the challenger's on the same requests and rows as the champion's answer
        (:meth:`log_predictions`), so :meth:`shadow_pairs` can pair them.

        Returns:
            The number of rows inserted.

        Raises:
            FeedbackUnavailable: if the log cannot be written now; nothing is stored then.

        """
        return self._insert("shadow_predictions", records)

    def _insert(
        self,
        table: Literal["predictions", "shadow_predictions"],
        records: Iterable[PredictionRecord],
    ) -> int:
        """Insert predictions into ``table`` in one transaction; rows already there are kept."""
        with self._transaction() as connection:
            before = connection.total_changes
            connection.executemany(
                f"INSERT OR IGNORE INTO {table} (request_id, row_index, model_name,"
                " model_version, prediction, score, predicted_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                records,
            )
            return connection.total_changes - before

    def shadow_pairs(
        self,
        model_name: str,
        champion_version: str,
        challenger_version: str,
        since: datetime | None = None,
    ) -> pd.DataFrame:
        """The records both versions scored: the champion's answer beside the shadow's score.

        Args:
            model_name: the registered model.
            champion_version: the version whose answers are in the prediction log.
            challenger_version: the version that scored the same records in shadow.
            since: only records the challenger scored at or after this moment (naive = UTC).

        Returns:
            One row per record with :data:`PAIRED_COLUMNS`, oldest first; ``label`` is the
            ground truth posted for the champion's answer (``None`` until labelled),
            ``predicted_at`` the shadow's time as a UTC timestamp.

        """
        parameters: list[Any] = [str(challenger_version), model_name, str(champion_version)]
        clause = ""
        if since is not None:
            clause = " AND s.predicted_at >= ?"
            parameters.append(as_utc(since).timestamp())
        with self._connection() as connection:
            rows = connection.execute(
                "SELECT p.request_id, p.row_index, p.prediction, p.score, s.prediction, s.score,"
                " p.label, s.predicted_at FROM shadow_predictions s JOIN predictions p"
                " ON p.request_id = s.request_id AND p.row_index = s.row_index"
                " WHERE s.model_version = ? AND s.model_name = p.model_name AND p.model_name = ?"
                " AND p.model_version = ?" + clause + " ORDER BY s.predicted_at, p.request_id,"
                " p.row_index",
                parameters,
            ).fetchall()
        frame = pd.DataFrame(rows, columns=list(PAIRED_COLUMNS))
        # Labels as posted: an unlabelled record's None must not turn the others into floats.
        frame["label"] = pd.Series([row[6] for row in rows], dtype=object)
        frame["predicted_at"] = pd.to_datetime(
            frame["predicted_at"].astype(float), unit="s", utc=True
        )
        for column in ("champion_score", "challenger_score"):
            frame[column] = frame[column].astype(float)
        return frame

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
            FeedbackUnavailable: if the log cannot be written now; nothing is stored then.

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
            parameters.append(as_utc(since).timestamp())
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

    def prune(
        self, before: datetime, model_name: str | None = None, max_rows: int | None = None
    ) -> int:
        """Delete the predictions made before ``before`` (the retention), labelled or not.

        Args:
            before: the cutoff (naive = UTC); predictions at or after it are kept.
            model_name: only this model's predictions; ``None`` = every model's.
            max_rows: most predictions kept (of ``model_name``, or in all); the oldest beyond it
                are deleted too. ``None``: no bound.

        Returns:
            The number of predictions deleted.

        """
        scope, parameters = ("model_name = ?", [model_name]) if model_name else ("1", [])
        with self._transaction() as connection:
            deleted = connection.execute(
                f"DELETE FROM predictions WHERE {scope} AND predicted_at < ?",
                [*parameters, as_utc(before).timestamp()],
            ).rowcount
            # A shadow's predictions go with the time window of the answers they pair with.
            connection.execute(
                f"DELETE FROM shadow_predictions WHERE {scope} AND predicted_at < ?",
                [*parameters, as_utc(before).timestamp()],
            )
            if max_rows is not None:
                deleted += connection.execute(
                    "DELETE FROM predictions WHERE rowid IN (SELECT rowid FROM predictions"
                    f" WHERE {scope} ORDER BY predicted_at DESC LIMIT -1 OFFSET ?)",
                    [*parameters, max_rows],
                ).rowcount
        return deleted

    def logged_requests(self, request_ids: Iterable[str], *, shadow: bool = False) -> set[str]:
        """Which of these requests have their predictions in the log.

        A request's records are logged in one transaction, so a request is either logged
        whole or not at all: this settles what became of requests whose recorder died.

        Args:
            request_ids: the requests' ids.
            shadow: look for a shadowed challenger's scores of them, not for their answers
                (a request answered by the champion is not yet scored in shadow).

        Returns:
            The ids found.

        """
        ids = list(dict.fromkeys(request_ids))
        table = "shadow_predictions" if shadow else "predictions"
        per_query = 500  # SQLite bounds the parameters of one statement
        found: set[str] = set()
        with self._connection() as connection:
            for start in range(0, len(ids), per_query):
                chunk = ids[start : start + per_query]
                found.update(
                    row[0]
                    for row in connection.execute(
                        f"SELECT DISTINCT request_id FROM {table} WHERE request_id IN ("
                        + ",".join("?" * len(chunk))
                        + ")",
                        chunk,
                    )
                )
        return found

    def count(self) -> int:
        """Logged predictions (labelled or not)."""
        with self._connection() as connection:
            return int(connection.execute("SELECT COUNT(*) FROM predictions").fetchone()[0])


def live_performance(
    frame: pd.DataFrame,
    task: Task,
    positive_class: Any = None,
) -> dict[str, float | int]:
    """Performance of the served model on labelled traffic (a :meth:`FeedbackStore.labelled` frame).

    Labels and predictions are compared as given (``1 == 1.0``, ``"1" != 1``); the metrics are
    the task's own (``TaskStrategy.live_metrics``).

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
    strategy = strategy_for(task)
    rows = len(frame)
    if rows == 0:
        return {"rows": 0}
    return {"rows": rows} | strategy.live_metrics(frame, positive_class)
