"""Monitoring decisions as pure functions: drift triggers, cursors, freshness, alerts."""

import datetime as dt

import dagster as dg
import pandas as pd
import pytest

from mlplatform.defs.monitoring import run_failure_alert
from mlplatform.monitoring.drift import DriftThresholds, compare_profiles
from mlplatform.monitoring.profiles import profile_frame_fast
from mlplatform.monitoring.rules import (
    DriftCursor,
    DriftEvidence,
    alert_payload,
    decide_drift,
    freshness_run_key,
    load_monitoring_settings,
    post_alert,
    stale_assets,
)
from mlplatform_tests.support import running_webhook

THRESHOLDS = DriftThresholds(min_rows=100, drifted_share=0.5)


def _evidence(drifted: bool, rows: int = 2000, windows: tuple[str, ...] = ("w1",)) -> DriftEvidence:
    """Real drift results on small frames: column x shifted (or not), column y unchanged."""
    reference = pd.DataFrame({"x": [float(i % 100) for i in range(5000)], "y": ["a", "b"] * 2500})
    shift = 60.0 if drifted else 0.0
    current = pd.DataFrame(
        {"x": [float(i % 100) + shift for i in range(rows)], "y": ["a", "b"] * (rows // 2)}
    )
    result = compare_profiles(
        profile_frame_fast(reference), profile_frame_fast(current), THRESHOLDS
    )
    return DriftEvidence(model_version="3", windows=windows, result=result)


def test_drift_on_new_evidence_fires_once():
    evidence = _evidence(drifted=True)
    assert evidence.result.drifted_columns == ["x"]
    first = decide_drift(
        evidence, DriftCursor(), now=1000.0, cooldown_s=600, retrain_in_progress=False
    )
    assert first.retrain and first.run_key == f"drift-{evidence.key}"
    assert "1 of 2 columns drifted" in first.reason
    assert first.cursor == DriftCursor(evidence.key, retrained_version="3", retrained_at=1000.0)
    again = decide_drift(
        evidence, first.cursor, now=1060.0, cooldown_s=600, retrain_in_progress=False
    )
    assert not again.retrain and "No new traffic" in again.reason
    assert again.cursor == first.cursor
    # The cursor survives its JSON round trip (the sensor stores it as a string).
    assert DriftCursor.parse(first.cursor.dump()) == first.cursor


def test_drift_evidence_key_changes_with_new_windows_only():
    assert _evidence(True).key == _evidence(True).key
    assert _evidence(True).key != _evidence(True, windows=("w1", "w2")).key


def test_undrifted_traffic_and_too_few_rows_do_not_fire():
    calm = decide_drift(_evidence(drifted=False), DriftCursor(), 0.0, 600, False)
    assert not calm.retrain and calm.new_evidence and calm.reason.startswith("No retrain")
    assert calm.cursor == DriftCursor(evidence_key=_evidence(drifted=False).key)
    few = decide_drift(_evidence(drifted=True, rows=40), DriftCursor(), 0.0, 600, False)
    assert not few.retrain and "at least 100 rows needed" in few.reason
    assert few.cursor == DriftCursor(evidence_key=_evidence(drifted=True, rows=40).key)


def test_drift_waits_for_a_running_retrain_and_cools_down_per_version():
    evidence = _evidence(drifted=True)
    busy = decide_drift(evidence, DriftCursor(), 0.0, 600, retrain_in_progress=True)
    assert not busy.retrain and "already queued or running" in busy.reason
    assert busy.cursor == DriftCursor(evidence_key=evidence.key)  # seen, nothing requested
    fired = decide_drift(evidence, DriftCursor(), 1000.0, 600, False)
    newer = _evidence(drifted=True, windows=("w1", "w2"))
    cooling = decide_drift(newer, fired.cursor, 1300.0, 600, False)
    assert not cooling.retrain and "cooling down for 300 more seconds" in cooling.reason
    # The new evidence is remembered; the cooldown still counts from the retrain at 1000.
    assert cooling.cursor == DriftCursor(newer.key, retrained_version="3", retrained_at=1000.0)
    after = decide_drift(newer, fired.cursor, 1700.0, 600, False)
    assert after.retrain
    assert after.cursor == DriftCursor(newer.key, retrained_version="3", retrained_at=1700.0)


def test_no_evidence_says_why():
    decision = decide_drift(None, DriftCursor(), 0.0, 600, False, "no champion yet")
    assert not decision.retrain and decision.reason == "No evaluation: no champion yet."
    assert decision.cursor == DriftCursor()
    remembered = DriftCursor("v3-abc", retrained_version="3", retrained_at=5.0)
    assert decide_drift(None, remembered, 0.0, 600, False).cursor == remembered
    assert DriftCursor.parse("not json") == DriftCursor()


def test_stale_assets_with_a_controlled_clock():
    now = dt.datetime(2026, 1, 2, 12, tzinfo=dt.UTC).timestamp()
    windows = {"raw_data": dt.timedelta(hours=24), "candidate_model": dt.timedelta(days=7)}
    fresh = {"raw_data": now - 3600, "candidate_model": now - 86400}
    assert stale_assets(now, fresh, windows) == []
    old_data = {"raw_data": now - 25 * 3600, "candidate_model": now - 86400}
    stale = stale_assets(now, old_data, windows)
    assert [s.asset for s in stale] == ["raw_data"]
    assert stale[0].reason == "raw_data last materialized 1.0 d ago (allowed: 1.0 d)"
    assert stale_assets(now, {"raw_data": None, "candidate_model": None}, windows) == []
    # The run key names the stale materialization: the same staleness retrains once.
    assert freshness_run_key(stale) == freshness_run_key(stale_assets(now + 60, old_data, windows))
    newer = {"raw_data": now - 26 * 3600 + 100, "candidate_model": now - 86400}
    assert freshness_run_key(stale) != freshness_run_key(stale_assets(now, newer, windows))


def test_monitoring_settings_from_the_environment():
    settings = load_monitoring_settings(
        {
            "MLPLATFORM_DRIFT_INTERVAL_S": "15",
            "MLPLATFORM_DRIFT_SHARE": "0.5",
            "MLPLATFORM_RAW_DATA_MAX_AGE_H": "2",
            "MLPLATFORM_ALERT_WEBHOOK": "http://127.0.0.1:9/hook",
        }
    )
    assert settings.drift_interval_s == 15
    assert settings.thresholds.drifted_share == 0.5
    assert settings.raw_data_max_age == dt.timedelta(hours=2)
    assert settings.alert_webhook == "http://127.0.0.1:9/hook"
    with pytest.raises(ValueError, match="MLPLATFORM_DRIFT_MIN_ROWS must be a number"):
        load_monitoring_settings({"MLPLATFORM_DRIFT_MIN_ROWS": "many"})


def test_alerts_post_to_a_real_webhook_and_never_raise():
    payload = alert_payload("run-1", "retrain_job", "promotion_gate failed", None)
    with running_webhook() as hook:
        assert post_alert(hook.url, payload) is None
        (alert,) = hook.received
        assert alert["run_id"] == "run-1"
        assert "retrain_job failed: promotion_gate failed" in alert["text"]
    error = post_alert(hook.url, payload, timeout_s=2)
    assert error is not None and "ConnectError" in error
    assert len(hook.received) == 1


def test_run_failure_sensor_posts_the_failed_run(instance, monkeypatch):
    @dg.op
    def explode() -> None:
        raise RuntimeError("the data source is unreachable")

    @dg.job
    def broken_job() -> None:
        explode()

    result = broken_job.execute_in_process(instance=instance, raise_on_error=False)
    failure = next(
        event
        for event in instance.all_logs(result.run_id)
        if event.dagster_event and event.dagster_event.event_type == dg.DagsterEventType.RUN_FAILURE
    )
    with running_webhook() as hook:
        monkeypatch.setenv("MLPLATFORM_ALERT_WEBHOOK", hook.url)
        context = dg.build_run_status_sensor_context(
            sensor_name="run_failure_alert",
            dagster_event=failure.dagster_event,
            dagster_instance=instance,
            dagster_run=result.dagster_run,
        ).for_run_failure()
        run_failure_alert(context)
    (alert,) = hook.received  # this test's server saw this test's alert, and only that
    assert alert["run_id"] == result.run_id and alert["job_name"] == "broken_job"
    assert "broken_job failed" in alert["text"]
