"""The feedback store and live metrics: labels joined to logged predictions, safely across
processes, and metrics on them equal to sklearn's.

Real SQLite, real processes; only the clock is controlled.
"""

import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    accuracy_score,
    mean_absolute_error,
    roc_auc_score,
    root_mean_squared_error,
)

from mlplatform.monitoring.feedback import (
    LABELLED_COLUMNS,
    PAIRED_COLUMNS,
    FeedbackResult,
    FeedbackStore,
    PredictionRecord,
    live_performance,
)
from mlplatform.serving.recorder import TrafficRecorder
from mlplatform_tests.support import T0, FakeClock, inputs, report_figure, small_disk

REPO = Path(__file__).resolve().parents[2]


def test_feedback_joins_labels_to_logged_predictions(recorded_loans, tmp_path):
    frame, spec = recorded_loans
    rows = inputs(frame, spec)
    store = FeedbackStore(tmp_path / "feedback.db")
    clock = FakeClock(T0 + 1)
    with TrafficRecorder(tmp_path, "loans", "1", spec, "r", clock=clock, feedback=store) as rec:
        rec.record(
            "batch",
            rows.iloc[:3],
            pd.DataFrame({"prediction": [1, 0, 1], "probability": [0.9, 0.2, 0.6]}),
        )
        rec.record(
            "single", rows.iloc[3:4], pd.DataFrame({"prediction": [0], "probability": [0.1]})
        )
    clock.now = T0 + 120
    with TrafficRecorder(tmp_path, "loans", "2", spec, "r", clock=clock, feedback=store) as rec:
        rec.record("v2", rows.iloc[:1], pd.DataFrame({"prediction": [1], "probability": [0.7]}))

    result = store.add_labels(
        [
            {"request_id": "batch", "index": 0, "label": 1},
            {"request_id": "batch", "index": 2, "label": 1},
            {"request_id": "batch", "index": 2, "label": 0},  # a correction overwrites
            {"request_id": "single", "label": 0},  # index defaults to 0
            {"request_id": "single", "index": 5, "label": 1},
            {"request_id": "nobody", "label": 1},
            {"request_id": "v2", "label": 0},
        ]
    )

    assert result == FeedbackResult(matched=5, unknown=[("single", 5), ("nobody", 0)])
    labelled = store.labelled(model_version="1")
    assert list(labelled.columns) == list(LABELLED_COLUMNS)
    assert labelled[["request_id", "index", "prediction", "score", "label"]].to_dict("records") == [
        {"request_id": "batch", "index": 0, "prediction": 1, "score": 0.9, "label": 1},
        {"request_id": "batch", "index": 2, "prediction": 1, "score": 0.6, "label": 0},
        {"request_id": "single", "index": 0, "prediction": 0, "score": 0.1, "label": 0},
    ]
    assert labelled["predicted_at"].iloc[0] == pd.Timestamp(T0 + 1, unit="s", tz="UTC")
    assert len(store.labelled()) == 4
    assert store.labelled(since=datetime(2026, 1, 1, 0, 1, tzinfo=UTC))["request_id"].tolist() == [
        "v2"
    ]
    assert store.labelled(model_name="other").empty
    assert store.count() == 5  # unknown labels are not stored


def test_add_labels_rejects_malformed_items_and_stores_none(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.db")
    store.log_predictions([PredictionRecord("a", 0, "m", "1", 1, 0.8, T0)])
    for bad, message in [
        ({"index": 0, "label": 1}, r"labels\[1\].request_id"),
        ({"request_id": "a", "index": -1, "label": 1}, r"labels\[1\].index"),
        ({"request_id": "a", "label": None}, r"labels\[1\].label"),
        ({"request_id": "a", "label": [1]}, r"labels\[1\].label"),
        ({"request_id": "a"}, r"labels\[1\].label is missing"),
    ]:
        with pytest.raises(ValueError, match=message):
            store.add_labels([{"request_id": "a", "label": 1}, bad])
    assert store.labelled().empty
    with sqlite3.connect(store.path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.faults
def test_a_full_disk_fails_the_log_write_off_the_request_path_and_counts_it(
    recorded_loans, tmp_path, record_property
):
    frame, spec = recorded_loans
    settled: list[tuple[list, bool]] = []
    with small_disk(tmp_path / "disk") as disk:
        store = FeedbackStore(disk.directory / "feedback.db")
        disk.fill()
        recorder = TrafficRecorder(
            tmp_path / "profiles",
            "loans",
            "1",
            spec,
            "r",
            feedback=store,
            on_settled=lambda items, logged: settled.append((items, logged)),
        )
        with recorder:
            queued = recorder.record(
                "full",
                inputs(frame, spec).iloc[:3],
                pd.DataFrame({"prediction": [1, 0, 1], "probability": [0.9, 0.2, 0.6]}),
                tag="hand-over 0",
            )
        assert queued  # the request itself is not held up by the disk
        stats = recorder.stats()
        assert (stats.received_rows, stats.profiled_rows) == (3, 3)  # still profiled
        # Both writes to the log failed, counted: the predictions and the retention's prune.
        assert (stats.logged_rows, stats.errors) == (0, 2)
        assert store.failed_writes == 2
        # Its owner learns the request was not logged (the serving sink counts it as dropped).
        assert settled == [([("hand-over 0", 1, 3)], False)]
        disk.free()
        assert store.count() == 0
    report_figure(
        record_property,
        "disk_full_recorder",
        rows_answered=3,
        rows_profiled=stats.profiled_rows,
        rows_logged=stats.logged_rows,
        rows_counted_dropped=settled[0][0][0][2],
        failed_writes=store.failed_writes,
    )


WRITER = """
import sys
from pathlib import Path
from mlplatform.monitoring.feedback import FeedbackStore, PredictionRecord
# A replica's process: the traffic module must not drag Dagster or Ray in.
assert not {m.split(".")[0] for m in sys.modules} & {"dagster", "ray"}, "dagster or ray imported"
store = FeedbackStore(Path(sys.argv[1]))
name = sys.argv[2]
for batch in range(20):
    store.log_predictions(
        PredictionRecord(f"{name}-{batch}", i, "m", "1", i % 2, 0.5, 0.0) for i in range(250)
    )
    store.add_labels([{"request_id": f"{name}-{batch}", "index": 3, "label": 1}])
"""


def test_feedback_store_is_safe_across_processes_without_dagster_or_ray(tmp_path):
    path = tmp_path / "feedback.db"
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), name],
            cwd=REPO,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("replica-a", "replica-b")
    ]
    for writer in writers:
        _, errors = writer.communicate(timeout=120)
        assert writer.returncode == 0, errors
    store = FeedbackStore(path)
    assert store.count() == 2 * 20 * 250
    assert len(store.labelled()) == 2 * 20


def test_live_performance_on_joined_labels_equals_sklearn(recorded_loans, tmp_path):
    frame, spec = recorded_loans
    n = 300
    truth = frame[spec.target].to_numpy()[:n]
    rng = np.random.default_rng(11)
    probability = np.clip(0.35 * truth + 0.65 * rng.random(n), 0, 1)
    predicted = (probability >= 0.5).astype(int)
    store = FeedbackStore(tmp_path / "feedback.db")
    with TrafficRecorder(tmp_path, "loans", "1", spec, "r", feedback=store) as recorder:
        recorder.record(
            "all",
            inputs(frame, spec).iloc[:n],
            pd.DataFrame({"prediction": predicted, "probability": probability}),
        )
    labels = [{"request_id": "all", "index": i, "label": int(truth[i])} for i in range(n)]
    assert store.add_labels(labels).matched == n

    metrics = live_performance(store.labelled(), "binary")

    assert metrics == pytest.approx(
        {
            "rows": n,
            "accuracy": accuracy_score(truth, predicted),
            "roc_auc": roc_auc_score(truth, probability),
        }
    )


def test_live_performance_per_task_equals_sklearn():
    rng = np.random.default_rng(5)
    n = 500
    truth = rng.choice(["no", "yes"], n)
    score = np.clip((truth == "yes") * 0.3 + rng.random(n) * 0.7, 0, 1)
    predicted = np.where(score >= 0.5, "yes", "no")
    binary = pd.DataFrame({"prediction": predicted, "label": truth, "score": score})
    assert live_performance(binary, "binary", positive_class="yes") == pytest.approx(
        {
            "rows": n,
            "accuracy": accuracy_score(truth, predicted),
            "roc_auc": roc_auc_score(truth == "yes", score),
        }
    )
    with pytest.raises(ValueError, match="positive_class"):
        live_performance(binary, "binary")
    one_class = binary.assign(label="yes")
    assert "roc_auc" not in live_performance(one_class, "binary", positive_class="yes")

    classes = rng.choice(["a", "b", "c"], n)
    guesses = np.where(rng.random(n) < 0.6, classes, rng.choice(["a", "b", "c"], n))
    multiclass = pd.DataFrame({"prediction": guesses, "label": classes, "score": np.nan})
    assert live_performance(multiclass, "multiclass") == pytest.approx(
        {"rows": n, "accuracy": accuracy_score(classes, guesses)}
    )

    values = rng.normal(100, 20, n)
    estimates = values + rng.normal(0, 5, n)
    regression = pd.DataFrame({"prediction": estimates, "label": values, "score": estimates})
    assert live_performance(regression, "regression") == pytest.approx(
        {
            "rows": n,
            "mae": mean_absolute_error(values, estimates),
            "rmse": root_mean_squared_error(values, estimates),
        }
    )
    assert live_performance(regression.iloc[:0], "regression") == {"rows": 0}
    with pytest.raises(ValueError, match="task"):
        live_performance(regression, "ranking")


def test_shadow_predictions_pair_with_the_champions_answers_and_their_labels(tmp_path):
    path = tmp_path / "feedback.db"
    # A prediction log from before shadow predictions existed opens and gains their table.
    with sqlite3.connect(path) as old:
        old.executescript(
            "CREATE TABLE predictions (request_id TEXT NOT NULL, row_index INTEGER NOT NULL,"
            " model_name TEXT NOT NULL, model_version TEXT NOT NULL, prediction, score REAL,"
            " predicted_at REAL NOT NULL, label, labelled_at REAL,"
            " PRIMARY KEY (request_id, row_index));"
        )
        old.execute(
            "INSERT INTO predictions VALUES ('old', 0, 'loans', '1', 1, 0.8, ?, 1, ?)", (T0, T0)
        )
    store = FeedbackStore(path)
    store.log_predictions(
        [
            PredictionRecord("a", 0, "loans", "1", 1, 0.9, T0 + 10),
            PredictionRecord("a", 1, "loans", "1", 0, 0.2, T0 + 10),
            PredictionRecord("b", 0, "loans", "1", 0, 0.3, T0 + 20),
        ]
    )
    shadow = [
        PredictionRecord("old", 0, "loans", "2", 0, 0.4, T0),
        PredictionRecord("a", 0, "loans", "2", 1, 0.7, T0 + 10),
        PredictionRecord("a", 1, "loans", "2", 1, 0.6, T0 + 10),
        PredictionRecord("b", 0, "loans", "3", 1, 0.9, T0 + 20),  # another challenger's
    ]
    assert store.log_shadow_predictions(shadow) == 4
    assert store.log_shadow_predictions(shadow[1:2]) == 0  # logged once
    store.add_labels([{"request_id": "a", "index": 1, "label": 0}])

    pairs = store.shadow_pairs("loans", "1", "2", since=datetime.fromtimestamp(T0 + 5, UTC))
    assert list(pairs.columns) == list(PAIRED_COLUMNS)
    assert pairs[["request_id", "index"]].values.tolist() == [["a", 0], ["a", 1]]
    assert pairs["champion_score"].tolist() == [0.9, 0.2]
    assert pairs["challenger_score"].tolist() == [0.7, 0.6]
    assert pairs["label"].tolist() == [None, 0]
    assert len(store.shadow_pairs("loans", "1", "2")) == 3  # the old answer too
    assert store.shadow_pairs("other", "1", "2").empty
    assert store.count() == 4  # shadow predictions are not answers

    # Retention prunes both tables.
    store.prune(datetime.fromtimestamp(T0 + 15, UTC))
    assert store.shadow_pairs("loans", "1", "3")["request_id"].tolist() == ["b"]
    assert store.shadow_pairs("loans", "1", "2").empty
