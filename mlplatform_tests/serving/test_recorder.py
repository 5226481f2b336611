"""The traffic recorder: no row lost across threads, never blocking a request, every output
profiled and logged.

Real whylogs, real SQLite, real threads; only the clock is controlled where a test is about time
windows.
"""

import datetime as dt
import sqlite3
import threading

import numpy as np
import pandas as pd
import pytest

from mlplatform.monitoring.feedback import FeedbackStore
from mlplatform.monitoring.profiles import load_traffic_profiles
from mlplatform.serving.recorder import TrafficRecorder
from mlplatform.serving.settings import TrafficKnobs
from mlplatform_tests.support import T0, FakeClock, binary_result, inputs, sidecars, wait_for


def test_many_threads_lose_no_rows(recorded_loans, tmp_path):
    frame, spec = recorded_loans
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


def test_flush_writes_the_partial_window(recorded_loans, tmp_path):
    frame, spec = recorded_loans
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


def test_record_never_blocks_on_a_stuck_writer(recorded_loans, tmp_path):
    frame, spec = recorded_loans
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
        "traffic_retention_days": 30.0,
        "traffic_retention_mb": 2048.0,
        "prediction_log_max_rows": 10_000_000,
    }
    for field in (
        "traffic_window_s",
        "traffic_max_queue",
        "traffic_batch_rows",
        "traffic_retention_days",
        "traffic_retention_mb",
        "prediction_log_max_rows",
    ):
        with pytest.raises(ValueError, match=field):
            TrafficKnobs(**{field: 0})


def test_record_checks_lengths_and_drops_after_close(recorded_loans, tmp_path):
    frame, spec = recorded_loans
    recorder = TrafficRecorder(tmp_path, "loans", "1", spec, "r")
    with pytest.raises(ValueError, match="2 records but 1 predictions"):
        recorder.record("x", inputs(frame, spec).iloc[:2], binary_result(1))
    recorder.close()
    assert not recorder.record("late", inputs(frame, spec).iloc[:2], binary_result(2))
    assert recorder.stats().dropped_rows == 2
    recorder.close()  # idempotent


def test_multiclass_and_regression_outputs_are_profiled_and_scored(recorded_loans, tmp_path):
    frame, spec = recorded_loans
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


def test_every_recorded_item_is_settled_with_its_tag_and_outcome(recorded_loans, tmp_path):
    frame, spec = recorded_loans
    rows = inputs(frame, spec)
    store = FeedbackStore(tmp_path / "feedback.db")
    settled = []
    recorder = TrafficRecorder(
        tmp_path,
        "loans",
        "1",
        spec,
        "r",
        TrafficKnobs(traffic_max_queue=3),
        feedback=store,
        on_settled=lambda items, logged: settled.extend((*item, logged) for item in items),
    )
    assert recorder.record("a", rows.iloc[:2], binary_result(2), tag=0)
    assert recorder.record(["b", "c"], rows.iloc[2:4], binary_result(2), tag=1)
    recorder.flush()
    # The prediction log breaks: the next items are settled as not logged.
    with sqlite3.connect(store.path) as connection:
        connection.execute("DROP TABLE predictions")
    assert recorder.record("d", rows.iloc[4:7], binary_result(3), tag=2)
    recorder.close()

    assert settled == [(0, 1, 2, True), (1, 2, 2, True), (2, 1, 3, False)]
    assert recorder.stats().errors == 1


def test_a_shadow_recorder_logs_shadow_predictions_and_profiles_nothing(recorded_loans, tmp_path):
    frame, spec = recorded_loans
    rows = inputs(frame, spec)
    store = FeedbackStore(tmp_path / "feedback.db")
    with TrafficRecorder(tmp_path, "loans", "1", spec, "r1", feedback=store) as champion:
        champion.record("a", rows.iloc[:4], binary_result(4, seed=1))
    with TrafficRecorder(
        tmp_path, "loans", "2", spec, "r2", feedback=store, shadow=True
    ) as challenger:
        challenger.record("a", rows.iloc[:4], binary_result(4, seed=2))
    assert challenger.stats().logged_rows == 4 and challenger.stats().profiled_rows == 0
    assert sidecars(tmp_path / "loans" / "v2") == []  # the champion's recorder profiles them
    assert [m["rows"] for m in sidecars(tmp_path / "loans" / "v1")] == [4]
    assert store.count() == 4  # the answers; the challenger's scores are beside them
    pairs = store.shadow_pairs("loans", "1", "2", dt.datetime.fromtimestamp(0, dt.UTC))
    assert len(pairs) == 4
    assert pairs["challenger_score"].tolist() == binary_result(4, seed=2)["probability"].tolist()
