"""Retention: traffic windows and logged predictions older than the retention, or beyond its size
bounds (oldest first), are deleted (by file name and by time), counted, at most hourly by the
recorder when it writes a window.

Real whylogs, real SQLite, the real recorder; only the clock is controlled.
"""

import os
from datetime import UTC, datetime, timedelta

from mlplatform.monitoring.feedback import FeedbackStore, PredictionRecord
from mlplatform.monitoring.profiles import (
    ReplicaCounters,
    list_traffic_windows,
    prune_traffic_windows,
    read_replica_counters,
    replica_counters_path,
    write_replica_counters,
)
from mlplatform.serving.recorder import PRUNE_INTERVAL_S, TrafficRecorder
from mlplatform.serving.settings import TrafficKnobs
from mlplatform_tests.support import T0, FakeClock, binary_result, inputs

DAY = 86_400


def _record_window(root, recorded_loans, at: float, version: str = "1", store=None) -> None:
    frame, spec = recorded_loans
    with TrafficRecorder(
        root, "loans", version, spec, "r", clock=FakeClock(at), feedback=store
    ) as recorder:
        recorder.record(f"req-{version}-{at}", inputs(frame, spec).iloc[:2], binary_result(2))


def _counters(replica_id: str, version: str = "1") -> ReplicaCounters:
    return ReplicaCounters("loans", version, replica_id, 1, 2, 0, 0, 0, 0, "2026-01-01T00:00:00")


def test_windows_are_pruned_by_their_names(recorded_loans, tmp_path):
    for day in (0, 1, 5):
        _record_window(tmp_path, recorded_loans, T0 + day * DAY + 1)
    _record_window(tmp_path, recorded_loans, T0 + 1, version="0")  # an old version, all old
    version_1 = tmp_path / "loans" / "v1"
    leftover = version_1 / ".20260101T000000Z-r.0123abcd.tmp"  # an interrupted write
    leftover.write_bytes(b"half")
    old_counters = write_replica_counters(tmp_path, _counters("gone"))
    os.utime(old_counters, (T0, T0))
    write_replica_counters(tmp_path, _counters("live"))  # written now: kept

    pruned = prune_traffic_windows(tmp_path, "loans", datetime.fromtimestamp(T0 + 2 * DAY, UTC))

    assert pruned == 3  # days 0 and 1 of v1, day 0 of v0
    assert [w.start.day for w in list_traffic_windows(tmp_path, "loans")] == [6]
    assert not leftover.exists()
    assert not (tmp_path / "loans" / "v0").exists()  # emptied, removed
    assert [c.replica_id for c in read_replica_counters(tmp_path, "loans", "1")] == ["live"]
    assert replica_counters_path(tmp_path, "loans", "1", "live").exists()
    assert prune_traffic_windows(tmp_path / "nothing", "loans", datetime.now(UTC)) == 0


def test_the_oldest_windows_go_first_beyond_the_size_bound(recorded_loans, tmp_path):
    for day in (1, 2, 3):
        _record_window(tmp_path, recorded_loans, T0 + day * DAY + 1, version="1")
    _record_window(tmp_path, recorded_loans, T0 + 1, version="0")  # the oldest, another version
    files = sorted((tmp_path / "loans").rglob("*.bin")) + sorted(
        (tmp_path / "loans").rglob("*.json")
    )
    sizes = {path.name: path.stat().st_size for path in files}
    newest_two = [n for n in sizes if n.startswith(("20260103", "20260104"))]
    assert len(newest_two) == 4  # two windows, each a profile and its sidecar
    bound = sum(sizes[n] for n in newest_two)
    long_ago = datetime.fromtimestamp(T0 - DAY, UTC)  # the time retention deletes nothing

    assert prune_traffic_windows(tmp_path, "loans", long_ago, max_bytes=bound) == 2

    assert [w.start.day for w in list_traffic_windows(tmp_path, "loans")] == [3, 4]
    assert not (tmp_path / "loans" / "v0").exists()
    assert prune_traffic_windows(tmp_path, "loans", long_ago, max_bytes=bound) == 0  # fits now


def _prediction(request_id: str, at: float, model_name: str = "loans") -> PredictionRecord:
    return PredictionRecord(request_id, 0, model_name, "1", 1, 0.9, at)


def test_prediction_log_is_pruned_by_time_and_model(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.db")
    store.log_predictions(
        [
            _prediction("old", T0),
            _prediction("old-other-model", T0, model_name="other"),
            _prediction("recent", T0 + 3 * DAY),
        ]
    )
    store.add_labels([{"request_id": "old", "label": 1}])  # labelled rows age out too

    cutoff = datetime.fromtimestamp(T0 + DAY, UTC)
    assert store.prune(cutoff, model_name="loans") == 1
    assert store.logged_requests(["old", "old-other-model", "recent"]) == {
        "old-other-model",
        "recent",
    }
    assert store.prune(cutoff) == 1  # every model's
    assert store.count() == 1


def test_prediction_log_keeps_the_newest_rows_of_the_model_beyond_its_bound(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.db")
    store.log_predictions(_prediction(f"r{hour}", T0 + hour * 3600) for hour in range(10))
    store.log_predictions([_prediction("other", T0, model_name="other")])
    long_ago = datetime.fromtimestamp(T0 - DAY, UTC)

    assert store.prune(long_ago, model_name="loans", max_rows=4) == 6

    names = [f"r{hour}" for hour in range(10)] + ["other"]
    assert store.logged_requests(names) == {"r6", "r7", "r8", "r9", "other"}
    assert store.prune(long_ago, max_rows=1) == 4  # every model's: only the newest row stays
    assert store.logged_requests(names) == {"r9"}


def test_logged_requests_finds_requests_in_many_queries(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.db")
    store.log_predictions(_prediction(f"r{i}", T0) for i in range(0, 1200, 2))

    found = store.logged_requests(f"r{i}" for i in range(1200))

    assert found == {f"r{i}" for i in range(0, 1200, 2)}
    assert store.logged_requests([]) == set()


def test_logged_requests_of_a_shadow_are_its_scores_not_the_champions_answers(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.db")
    store.log_predictions(_prediction(f"r{i}", T0) for i in range(4))  # the champion answered
    store.log_shadow_predictions(_prediction(f"r{i}", T0) for i in range(2))  # the shadow scored

    assert store.logged_requests(["r0", "r1", "r2", "r3"], shadow=True) == {"r0", "r1"}
    assert store.logged_requests(["r0", "r3"]) == {"r0", "r3"}


def test_recorder_prunes_when_it_writes_a_window_at_most_hourly(recorded_loans, tmp_path):
    frame, spec = recorded_loans
    root = tmp_path / "traffic"
    store = FeedbackStore(tmp_path / "feedback.db")
    _record_window(root, recorded_loans, T0 + 1, store=store)  # 40 days before "now"
    now = T0 + 40 * DAY
    clock = FakeClock(now)
    recorder = TrafficRecorder(
        root,
        "loans",
        "1",
        spec,
        "r",
        TrafficKnobs(traffic_retention_days=30),
        clock=clock,
        feedback=store,
    )
    rows = inputs(frame, spec)
    recorder.record("today", rows.iloc[:3], binary_result(3))
    recorder.flush()
    stats = recorder.stats()
    assert (stats.pruned_windows, stats.pruned_predictions) == (1, 2)
    assert store.logged_requests([f"req-1-{T0 + 1}", "today"]) == {"today"}

    # More old history appears; within the hour the next window does not prune again.
    _record_window(root, recorded_loans, T0 + 2, store=store)
    clock.now = now + 60
    recorder.record("later", rows.iloc[:1], binary_result(1))
    recorder.flush()
    assert recorder.stats().pruned_windows == 1
    clock.now = now + PRUNE_INTERVAL_S
    recorder.record("an hour later", rows.iloc[:1], binary_result(1))
    recorder.close()

    stats = recorder.stats()
    assert (stats.pruned_windows, stats.pruned_predictions, stats.errors) == (2, 4, 0)
    remaining = list_traffic_windows(root, "loans", "1")
    assert min(w.start for w in remaining) > datetime.fromtimestamp(now, UTC) - timedelta(days=30)
    assert store.count() == 3 + 1 + 1


def test_recorder_applies_the_size_bounds_of_its_settings(recorded_loans, tmp_path):
    frame, spec = recorded_loans
    root = tmp_path / "traffic"
    store = FeedbackStore(tmp_path / "feedback.db")
    _record_window(root, recorded_loans, T0 + 1, store=store)  # yesterday: within 30 days
    bounds = TrafficKnobs(traffic_retention_mb=1e-6, prediction_log_max_rows=2)  # 1 byte
    with TrafficRecorder(
        root, "loans", "1", spec, "r", bounds, clock=FakeClock(T0 + DAY), feedback=store
    ) as recorder:
        recorder.record("today", inputs(frame, spec).iloc[:3], binary_result(3))

    stats = recorder.stats()
    assert stats.pruned_windows == 2  # a hard bound: even the window just written is over it
    assert list_traffic_windows(root, "loans") == []
    assert stats.pruned_predictions == 2 + 3 - 2
    assert store.count() == 2
