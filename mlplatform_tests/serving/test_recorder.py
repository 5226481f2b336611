"""Traffic recording: rolling whylogs profiles, the prediction log and the feedback join.

Real whylogs, real SQLite, real threads and processes; only the clock is controlled where a test
is about time windows.
"""

import json
import sqlite3
import subprocess
import sys
import threading
import time
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

from mlplatform.demo.data import generate_loans
from mlplatform.model.spec import FeatureSpec, infer_feature_spec
from mlplatform.monitoring.feedback import (
    LABELLED_COLUMNS,
    FeedbackResult,
    FeedbackStore,
    PredictionRecord,
    live_performance,
)
from mlplatform.monitoring.profiles import (
    list_traffic_windows,
    load_traffic_profiles,
    profile_frame,
)
from mlplatform.serving.recorder import TrafficRecorder
from mlplatform.serving.settings import TrafficKnobs

REPO = Path(__file__).resolve().parents[2]
# 2026-01-01T00:00:00Z, a multiple of 60 s: windows of a minute start here.
T0 = 1_767_225_600.0


class FakeClock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def loans() -> tuple[pd.DataFrame, FeatureSpec]:
    frame = generate_loans(n_rows=2000, seed=3)
    spec = infer_feature_spec(frame, "defaulted")
    return frame.reset_index(drop=True), spec


def inputs(frame: pd.DataFrame, spec: FeatureSpec) -> pd.DataFrame:
    """The raw input columns, as the endpoint's validation hands them on."""
    return frame[list(spec.features)]


def binary_result(n: int, seed: int = 0) -> pd.DataFrame:
    """What a binary model's predict_frame returns (the recorder only profiles and logs it)."""
    probability = np.random.default_rng(seed).random(n)
    return pd.DataFrame(
        {"prediction": (probability >= 0.5).astype(int), "probability": probability}
    )


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def sidecars(directory: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))]


def test_traffic_profile_columns_and_types_match_the_reference(loans, tmp_path):
    frame, spec = loans
    reference = profile_frame(frame, spec)
    with TrafficRecorder(tmp_path, "loans", "1", spec, "r0") as recorder:
        for i in range(50):
            recorder.record(f"req-{i}", inputs(frame, spec).iloc[i : i + 1], binary_result(1, i))
        recorder.record("batch", inputs(frame, spec).iloc[50:200], binary_result(150))
    view, rows, windows = load_traffic_profiles(tmp_path, "loans", "1")

    assert rows == 200 and len(windows) == 1
    traffic_columns = set(view.get_columns())
    assert traffic_columns - {"prediction", "probability"} == set(spec.features)
    assert set(reference.get_columns()) - {spec.target} == set(spec.features)
    # Same whylogs types per feature on both sides: datetimes as strings, booleans as 0.0/1.0.
    type_columns = ["types/integral", "types/fractional", "types/boolean", "types/string"]
    reference_types = reference.to_pandas()[type_columns].gt(0)
    traffic_types = view.to_pandas()[type_columns].gt(0)
    for name in spec.features:
        assert traffic_types.loc[name].equals(reference_types.loc[name]), name
    assert view.get_column("probability").get_metric("counts").n.value == 200


def test_many_threads_lose_no_rows(loans, tmp_path):
    frame, spec = loans
    n_threads, per_thread = 8, 2000
    records = [inputs(frame, spec).iloc[i : i + 1] for i in range(per_thread)]
    results = [binary_result(1, i) for i in range(per_thread)]
    store = FeedbackStore(tmp_path / "feedback.db")
    recorder = TrafficRecorder(
        tmp_path / "traffic",
        "loans",
        "3",
        spec,
        "replica-a",
        TrafficKnobs(traffic_max_queue=n_threads * per_thread),
        feedback=store,
    )
    start = threading.Barrier(n_threads)
    accepted = []

    def send(thread: int) -> None:
        start.wait()
        accepted.append(
            sum(recorder.record(f"{thread}-{i}", records[i], results[i]) for i in range(per_thread))
        )

    threads = [threading.Thread(target=send, args=(t,)) for t in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    recorder.close()

    sent = n_threads * per_thread
    stats = recorder.stats()
    assert sum(accepted) == sent
    assert (stats.received_rows, stats.profiled_rows, stats.logged_rows) == (sent, sent, sent)
    assert (stats.dropped_requests, stats.errors, stats.queued) == (0, 0, 0)
    view, rows, windows = load_traffic_profiles(tmp_path / "traffic", "loans", "3")
    assert rows == sum(w.rows for w in windows) == sent
    assert view.get_column("age").get_metric("counts").n.value == sent
    assert store.count() == sent


def test_windows_roll_with_the_clock(loans, tmp_path):
    frame, spec = loans
    clock = FakeClock(T0 + 5)
    recorder = TrafficRecorder(
        tmp_path,
        "loans",
        "1",
        spec,
        "replica-a",
        TrafficKnobs(traffic_window_s=60, traffic_linger_s=0.05),
        clock=clock,
    )
    rows = inputs(frame, spec)
    for i in range(3):
        recorder.record(f"a{i}", rows.iloc[i : i + 1], binary_result(1, i))
    # The clock moves on only once the first window holds them: a window whose end has passed
    # is written at once, and records still queued for it would go to a second file.
    wait_for(lambda: recorder.stats().profiled_rows == 3)
    clock.now = T0 + 65
    recorder.record("b", rows.iloc[10:12], binary_result(2))
    directory = tmp_path / "loans" / "v1"
    # The first window is written once the clock has passed its end, without a flush.
    wait_for(lambda: (directory / "20260101T000000Z-replica-a.json").exists())
    assert not (directory / "20260101T000100Z-replica-a.json").exists()
    recorder.close()

    assert sorted(p.name for p in directory.glob("*.bin")) == [
        "20260101T000000Z-replica-a.bin",
        "20260101T000100Z-replica-a.bin",
    ]
    assert [(m["window_start"], m["rows"]) for m in sidecars(directory)] == [
        ("2026-01-01T00:00:00+00:00", 3),
        ("2026-01-01T00:01:00+00:00", 2),
    ]
    windows = list_traffic_windows(tmp_path, "loans")
    assert [w.rows for w in windows] == [3, 2]
    assert windows[0].end == windows[1].start == datetime(2026, 1, 1, 0, 1, tzinfo=UTC)
    _, rows_since, since_windows = load_traffic_profiles(
        tmp_path, "loans", "1", since=datetime(2026, 1, 1, 0, 1, 30)
    )
    assert rows_since == 2 and len(since_windows) == 1


def test_restart_in_the_same_window_does_not_overwrite(loans, tmp_path):
    frame, spec = loans
    rows = inputs(frame, spec)
    for attempt in range(2):  # the replica restarts within the same minute, same id
        with TrafficRecorder(tmp_path, "loans", "1", spec, "r", clock=FakeClock(T0 + 10)) as rec:
            rec.record(f"x{attempt}", rows.iloc[: 4 + attempt], binary_result(4 + attempt))
    directory = tmp_path / "loans" / "v1"
    assert sorted(p.name for p in directory.glob("*.bin")) == [
        "20260101T000000Z-r-1.bin",
        "20260101T000000Z-r.bin",
    ]
    _, total, windows = load_traffic_profiles(tmp_path, "loans", "1")
    assert total == 9 and sorted(w.rows for w in windows) == [4, 5]
    assert not list(directory.glob(".*")), "temporary files are cleaned up"


def test_flush_writes_the_partial_window(loans, tmp_path):
    frame, spec = loans
    rows = inputs(frame, spec)
    recorder = TrafficRecorder(tmp_path, "loans", "2", spec, "r", clock=FakeClock(T0 + 1))
    recorder.record("a", rows.iloc[:3], binary_result(3))
    recorder.flush()
    assert [m["rows"] for m in sidecars(tmp_path / "loans" / "v2")] == [3]
    recorder.record("b", rows.iloc[3:5], binary_result(2))
    recorder.close()
    view, total, windows = load_traffic_profiles(tmp_path, "loans", "2")
    assert total == 5 and len(windows) == 2
    assert view.get_column("prediction").get_metric("counts").n.value == 5
    assert load_traffic_profiles(tmp_path, "loans", "9") == (None, 0, [])


def test_record_never_blocks_on_a_stuck_writer(loans, tmp_path):
    frame, spec = loans
    one, result = inputs(frame, spec).iloc[:1], binary_result(1)
    store = FeedbackStore(tmp_path / "feedback.db")
    blocker = sqlite3.connect(store.path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another process holds the database: the writer waits
    recorder = TrafficRecorder(
        tmp_path, "loans", "1", spec, "r", TrafficKnobs(traffic_max_queue=10), feedback=store
    )
    try:
        recorder.record("first", one, result)
        wait_for(lambda: recorder.stats().received_requests == 1)  # now stuck on the lock

        accepted = sum(recorder.record(f"r{i}", one, result) for i in range(1000))

        stats = recorder.stats()
        # The writer is still stuck on the first request (it gives up only after SQLite's 30 s
        # busy timeout, with an error): all 1000 calls returned without waiting for it.
        assert (stats.logged_rows, stats.errors) == (0, 0)
        assert (accepted, stats.queued) == (10, 10)
        assert (stats.dropped_requests, stats.dropped_rows) == (990, 990)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    recorder.close()
    stats = recorder.stats()
    assert (stats.profiled_rows, stats.logged_rows, stats.errors) == (11, 11, 0)
    assert store.count() == 11


def test_recorder_settings_are_the_serving_defaults_and_must_be_positive():
    # The values every replica's recorder has run with: one default each, in the settings.
    assert TrafficKnobs().model_dump() == {
        "traffic_window_s": 60,
        "traffic_max_queue": 10_000,
        "traffic_linger_s": 5.0,
        "traffic_batch_rows": 50_000,
        "traffic_drain_interval_s": 0.25,
    }
    for field in ("traffic_window_s", "traffic_max_queue", "traffic_batch_rows"):
        with pytest.raises(ValueError, match=field):
            TrafficKnobs(**{field: 0})


def test_record_checks_lengths_and_drops_after_close(loans, tmp_path):
    frame, spec = loans
    recorder = TrafficRecorder(tmp_path, "loans", "1", spec, "r")
    with pytest.raises(ValueError, match="2 records but 1 predictions"):
        recorder.record("x", inputs(frame, spec).iloc[:2], binary_result(1))
    recorder.close()
    assert not recorder.record("late", inputs(frame, spec).iloc[:2], binary_result(2))
    assert recorder.stats().dropped_rows == 2
    recorder.close()  # idempotent


def test_feedback_joins_labels_to_logged_predictions(loans, tmp_path):
    frame, spec = loans
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


def test_live_performance_on_joined_labels_equals_sklearn(loans, tmp_path):
    frame, spec = loans
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


def test_multiclass_and_regression_outputs_are_profiled_and_scored(loans, tmp_path):
    frame, spec = loans
    rows = inputs(frame, spec).iloc[:2]
    store = FeedbackStore(tmp_path / "feedback.db")
    multiclass = pd.DataFrame(
        {
            "prediction": ["a", "c"],
            "probability_a": [0.7, 0.1],
            "probability_b": [0.2, 0.2],
            "probability_c": [0.1, 0.7],
        }
    )
    with TrafficRecorder(tmp_path, "multi", "1", spec, "r", feedback=store) as recorder:
        recorder.record("m", rows, multiclass)
    with TrafficRecorder(tmp_path, "reg", "1", spec, "r", feedback=store) as recorder:
        recorder.record("g", rows, pd.DataFrame({"prediction": [12.5, 40.0]}))
    store.add_labels([{"request_id": "m", "label": "a"}, {"request_id": "g", "label": 10}])

    view, total, _ = load_traffic_profiles(tmp_path, "multi")
    assert total == 2
    assert {"prediction", "probability_a", "probability_b", "probability_c"} <= set(
        view.get_columns()
    )
    scores = store.labelled().set_index("request_id")["score"]
    assert np.isnan(scores["m"]) and scores["g"] == 12.5
