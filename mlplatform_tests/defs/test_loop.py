"""The self-healing loop without the daemon: traffic -> profiles -> sensors -> retrain -> serve."""

import time
from pathlib import Path

import dagster as dg
import httpx
import pytest
from mlflow import MlflowClient

from mlplatform.definitions import ASSETS, defs
from mlplatform.defs.monitoring import drift_sensor, freshness_sensor
from mlplatform.demo.simulate import move_demo_source, simulate
from mlplatform.monitoring.feedback import FeedbackStore
from mlplatform.monitoring.rules import DriftCursor
from mlplatform.resources import MlflowTracking
from mlplatform.settings import load_settings
from mlplatform_tests.support import (
    FAST_WINDOWS,
    promote_rollout,
    tick,
    wait_for_profiled_rows,
)

RETRAIN = dg.AssetSelection.assets("raw_data").downstream() - dg.AssetSelection.assets(
    "drift_report"
)


@pytest.fixture
def serving(resources, instance) -> str:
    result = dg.materialize(ASSETS, resources=resources, instance=instance, run_config=FAST_WINDOWS)
    assert result.success
    return result.output_for_node("model_endpoint").url


def test_undrifted_traffic_fires_nothing_and_drift_retrains_to_a_better_champion(
    serving, resources, instance, small_loans_csv: Path
):
    url = serving
    calm = simulate(url, rate=40, duration_s=2, drift=0.0, seed=1, batch_size=50, label_share=0.5)
    assert calm.ok == calm.requests and calm.versions == {"1": calm.requests}
    assert calm.labels_matched == calm.labels_sent > 0
    wait_for_profiled_rows("1", calm.records)

    quiet = tick(drift_sensor, instance)
    assert not quiet.run_requests
    assert quiet.skip_reason.skip_message.startswith("No retrain: 0 of")
    # The tick records what it saw on drift_report, with live performance from the labels.
    observation = quiet.asset_events[0]
    assert observation.asset_key == dg.AssetKey("drift_report")
    assert observation.metadata["rows"].value >= calm.records  # plus the deploy smoke test
    assert observation.metadata["live_performance"].value["rows"] == calm.labels_matched
    # The cursor remembers exactly the evidence this tick evaluated, and no retrain.
    assert quiet.cursor == DriftCursor(evidence_key=observation.metadata["evidence"].value).dump()

    # The world moves: the traffic and the training source both come from the drifted population.
    move_demo_source(small_loans_csv, drift=0.9, n_rows=1200)
    drifted = simulate(url, rate=40, duration_s=2, drift=0.9, seed=2, batch_size=50)
    assert drifted.ok == drifted.requests
    wait_for_profiled_rows("1", calm.records + drifted.records)

    fired = tick(drift_sensor, instance, cursor=quiet.cursor)
    assert len(fired.run_requests) == 1
    request = fired.run_requests[0]
    assert request.run_key.startswith("drift-v1-")
    assert request.tags["mlplatform/trigger"] == "drift"
    assert len(fired.asset_events[0].metadata["drifted_columns"].value) >= 3
    fired_cursor = DriftCursor.parse(fired.cursor)
    assert fired_cursor.evidence_key == fired.asset_events[0].metadata["evidence"].value
    assert fired_cursor.evidence_key != DriftCursor.parse(quiet.cursor).evidence_key
    assert fired_cursor.retrained_version == "1" and fired_cursor.retrained_at is not None
    # drift_report shows the same evidence in the UI, with a WARN check naming the columns.
    report = dg.materialize(
        ASSETS, selection=["drift_report"], resources=resources, instance=instance
    )
    check = report.get_asset_check_evaluations()[0]
    assert check.check_name == "no_drift" and not check.passed
    assert check.severity == dg.AssetCheckSeverity.WARN
    assert check.description.startswith("Retrain: ")
    metadata = report.asset_materializations_for_node("drift_report")[0].metadata
    assert (
        metadata["drifted_columns"].value == fired.asset_events[0].metadata["drifted_columns"].value
    )
    assert "data:image/png;base64," in metadata["plot"].value
    # The same evidence never fires twice.
    again = tick(drift_sensor, instance, cursor=fired.cursor)
    assert not again.run_requests and "No new traffic" in again.skip_reason.skip_message
    assert again.cursor == fired.cursor

    retrain = dg.materialize(
        ASSETS,
        selection=RETRAIN,
        resources=resources,
        instance=instance,
        run_config=FAST_WINDOWS,
        tags=request.tags,
    )
    assert retrain.success
    report = retrain.output_for_node("evaluation_report")
    assert report.champion.version == "1" and report.challenger.version == "2"
    assert report.difference["roc_auc"]["point"] > 0
    # The retrained model is rolled out in shadow; its rollout (here by hand) promotes it.
    assert httpx.get(f"{url}/healthz", timeout=10).json()["model_version"] == "1"
    promote_rollout(resources, instance, FAST_WINDOWS)
    assert httpx.get(f"{url}/healthz", timeout=10).json()["model_version"] == "2"

    # The new champion's traffic starts a new window of evidence: drifted traffic is now normal.
    after = simulate(url, rate=40, duration_s=2, drift=0.9, seed=3, batch_size=50)
    assert after.versions == {"2": after.requests}
    wait_for_profiled_rows("2", after.records)
    settled = tick(drift_sensor, instance, cursor=fired.cursor)
    assert not settled.run_requests
    assert settled.skip_reason.skip_message.startswith("No retrain")
    settled_cursor = DriftCursor.parse(settled.cursor)
    assert settled_cursor.evidence_key.startswith("v2-")
    assert settled_cursor.retrained_version == "1"  # the last drift retrain, remembered


def test_freshness_sensor_requests_a_retrain_once_per_stale_materialization(instance, monkeypatch):
    fresh = tick(freshness_sensor, instance)
    # The freshness sensor keeps no cursor: the run key (asset and materialization) dedupes.
    assert "Everything fresh" in fresh.skip_reason.skip_message and fresh.cursor is None
    instance.report_runless_asset_event(dg.AssetMaterialization("raw_data"))
    instance.report_runless_asset_event(dg.AssetMaterialization("candidate_model"))
    assert "Everything fresh" in tick(freshness_sensor, instance).skip_reason.skip_message

    monkeypatch.setenv("MLPLATFORM_RAW_DATA_MAX_AGE_H", str(0.2 / 3600))  # 0.2 seconds
    # Ages only grow: tick until raw_data is past its window (no fixed sleep to race).
    deadline = time.monotonic() + 30
    first = tick(freshness_sensor, instance)
    while not first.run_requests and time.monotonic() < deadline:
        time.sleep(0.1)
        first = tick(freshness_sensor, instance)
    assert [r.tags["mlplatform/trigger"] for r in first.run_requests] == ["freshness"]
    second = tick(freshness_sensor, instance)
    assert second.run_requests[0].run_key == first.run_requests[0].run_key
    assert first.cursor is None and second.cursor is None

    # A running retrain holds further requests back: retrains never overlap.
    instance.create_run_for_job(
        defs.resolve_job_def("retrain_job"), status=dg.DagsterRunStatus.STARTED
    )
    busy = tick(freshness_sensor, instance)
    assert not busy.run_requests and "already queued" in busy.skip_reason.skip_message
    assert busy.cursor is None


def test_drift_sensor_reads_the_registry_of_its_configured_resource(instance, tmp_path):
    other = f"sqlite:///{tmp_path / 'other-mlflow.db'}"
    client = MlflowClient(tracking_uri=other, registry_uri=other)
    client.create_registered_model("mlplatform")
    version = client.create_model_version("mlplatform", source=str(tmp_path / "model")).version
    client.set_model_version_tag("mlplatform", version, "data_version", "abc123")
    client.set_registered_model_alias("mlplatform", "champion", version)

    # The Definitions' resource reads the platform home's registry: no champion there.
    assert tick(drift_sensor, instance).skip_reason.skip_message == (
        "No evaluation: no champion yet."
    )
    configured = {"mlflow_tracking": MlflowTracking(mlflow_tracking_uri=other)}
    with dg.build_sensor_context(instance=instance, resources=configured) as context:
        result = drift_sensor(context)
    assert result.skip_reason.skip_message == (
        f"No evaluation: no reference profile for v{version} (data version abc123)."
    )
    assert not result.run_requests
    assert result.cursor == DriftCursor().dump()  # nothing evaluated: a fresh cursor is kept


def test_feedback_endpoint_rejects_malformed_labels(serving):
    bad = httpx.post(f"{serving}/feedback", content=b"{", timeout=10)
    assert bad.status_code == 400
    missing = httpx.post(f"{serving}/feedback", json={"labels": [{"index": 0}]}, timeout=10)
    assert missing.status_code == 422
    assert missing.json()["detail"][0]["loc"][:3] == ["body", "labels", 0]
    unknown = httpx.post(
        f"{serving}/feedback", json={"labels": [{"request_id": "nope", "label": 1}]}, timeout=10
    )
    assert unknown.status_code == 200
    assert unknown.json() == {"matched": 0, "unknown": [{"request_id": "nope", "index": 0}]}
    assert FeedbackStore(load_settings().feedback_db).labelled().empty
