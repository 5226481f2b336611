"""Traffic profiles: the same columns and types as the reference, and the window layout on disk
(one file per window and replica, found by its sidecar, never overwritten; unreadable files
skipped and named; recent windows found by name, without reading the history).

Real whylogs and the real recorder writing the windows; only the clock is controlled.
"""

import logging
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest
import whylogs as why

from mlplatform.monitoring.drift import compare_profiles
from mlplatform.monitoring.profiles import (
    list_traffic_windows,
    load_traffic_profiles,
    merge_profiles,
    profile_frame,
    profile_frame_fast,
)
from mlplatform.serving.recorder import TrafficRecorder
from mlplatform.serving.settings import TrafficKnobs
from mlplatform_tests.monitoring.synthetic import traffic
from mlplatform_tests.support import T0, FakeClock, binary_result, inputs, sidecars, wait_for


def test_traffic_profile_columns_and_types_match_the_reference(recorded_loans, tmp_path):
    frame, spec = recorded_loans
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


def test_windows_roll_with_the_clock(recorded_loans, tmp_path):
    frame, spec = recorded_loans
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


def test_restart_in_the_same_window_does_not_overwrite(recorded_loans, tmp_path):
    frame, spec = recorded_loans
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


def test_merging_profiles_equals_profiling_the_concatenation():
    frame = traffic(30_000, seed=6)
    parts = [
        profile_frame_fast(frame.iloc[start : start + 10_000]) for start in (0, 10_000, 20_000)
    ]

    merged = merge_profiles(parts)
    whole = profile_frame_fast(frame)

    summary, expected = merged.to_pandas(), whole.to_pandas()
    for name in frame.columns:
        for metric in ("counts/n", "counts/null", "types/fractional", "types/string"):
            assert summary.loc[name, metric] == expected.loc[name, metric]
    assert summary.loc["normal_1", "counts/n"] == 30_000
    assert compare_profiles(whole, merged).drifted_columns == []
    assert merge_profiles([]) is None


# whylogs' own variance update warns on the infinite values, on both paths.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_profile_frame_fast_equals_whylogs():
    rng = np.random.default_rng(7)
    n = 800  # small enough that the KLL sketches keep every value, so quantiles match exactly
    frame = pd.DataFrame(
        {
            "floats": rng.normal(size=n),
            "floats_missing": np.where(rng.random(n) < 0.1, np.nan, rng.normal(size=n)),
            "floats_inf": np.where(rng.random(n) < 0.01, np.inf, rng.normal(size=n)),
            "ints": rng.integers(0, 10, n),
            "strings": rng.choice(["a", "b", "c"], n),
            "strings_missing": np.where(rng.random(n) < 0.1, None, rng.choice(["x", "y"], n)),
            "mixed": pd.Series(["text" if r < 0.5 else 1.5 for r in rng.random(n)], dtype=object),
            "booleans": rng.random(n) < 0.3,
            "empty": np.full(n, np.nan),
        }
    )
    frame.loc[rng.random(n) < 0.1, "mixed"] = 7

    fast = profile_frame_fast(frame).to_pandas().sort_index()
    reference = why.log(pandas=frame).profile().view().to_pandas().sort_index()

    assert list(fast.columns) == list(reference.columns)
    pd.testing.assert_frame_equal(fast.astype(str), reference.astype(str))


def _record_window(root, recorded_loans, replica: str, at: float, rows: int) -> None:
    """One window of ``rows`` records from ``replica``, written by the real recorder at ``at``."""
    frame, spec = recorded_loans
    with TrafficRecorder(root, "loans", "1", spec, replica, clock=FakeClock(at)) as recorder:
        recorder.record(f"{replica}-{at}", inputs(frame, spec).iloc[:rows], binary_result(rows))


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.faults
def test_unreadable_windows_are_skipped_named_and_the_rest_merged(recorded_loans, tmp_path, caplog):
    for minute, replica, rows in [(0, "a", 3), (0, "b", 4), (1, "a", 5), (2, "a", 6)]:
        _record_window(tmp_path, recorded_loans, replica, T0 + 60 * minute + 1, rows)
    directory = tmp_path / "loans" / "v1"
    _truncate(directory / "20260101T000000Z-b.json")  # a sidecar cut short
    _truncate(directory / "20260101T000100Z-a.bin")  # a profile cut short

    with caplog.at_level(logging.WARNING, logger="mlplatform.monitoring.profiles"):
        profiles = load_traffic_profiles(tmp_path, "loans", "1")

    view, rows, windows = profiles
    assert rows == 3 + 6
    assert [w.path.name for w in windows] == ["20260101T000000Z-a.bin", "20260101T000200Z-a.bin"]
    assert view.get_column("age").get_metric("counts").n.value == 9
    assert [f.path.name for f in profiles.skipped] == [
        "20260101T000000Z-b.json",
        "20260101T000100Z-a.bin",
    ]
    assert profiles.skipped[0].reason.startswith("unreadable traffic window sidecar")
    assert profiles.skipped[1].reason.startswith("unreadable profile")
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "20260101T000000Z-b.json" in warned and "20260101T000100Z-a.bin" in warned
    # Listing opens no profile: only the bad sidecar is skipped there.
    listed = list_traffic_windows(tmp_path, "loans", "1")
    assert [w.rows for w in listed] == [3, 5, 6]
    assert [f.path.name for f in listed.skipped] == ["20260101T000000Z-b.json"]


def test_since_reads_only_the_sidecars_of_the_recent_windows(recorded_loans, tmp_path):
    for minute in range(6):
        _record_window(tmp_path, recorded_loans, "a", T0 + 60 * minute + 1, rows=minute + 1)
    directory = tmp_path / "loans" / "v1"
    # The old history is unreadable: a reader that opened it would have to skip and name it.
    for minute in range(3):
        (directory / f"20260101T00{minute:02d}00Z-a.json").write_text("{ not json")
    since = datetime(2026, 1, 1, 0, 3, 30)  # inside the window of minute 3

    recent = list_traffic_windows(tmp_path, "loans", "1", since=since)
    _, rows, merged = load_traffic_profiles(tmp_path, "loans", since=since)

    assert [w.rows for w in recent] == [4, 5, 6]  # the window containing `since`, kept whole
    assert recent.skipped == [] and merged.skipped == []  # the old sidecars were never opened
    assert rows == 4 + 5 + 6
    everything = list_traffic_windows(tmp_path, "loans", "1")
    assert [w.rows for w in everything] == [4, 5, 6]
    assert len(everything.skipped) == 3
