"""The endpoint converges to the registry: endpoint_sensor's decisions, ticks and redeploys."""

import json
import re
import subprocess
from pathlib import Path

import dagster as dg
import httpx
import pytest
from mlflow import MlflowClient
from ray import serve

from mlplatform.cli import main, run_pipeline
from mlplatform.definitions import ASSETS, defs
from mlplatform.defs.serving import deploy_in_progress, endpoint_sensor
from mlplatform.monitoring.rules import (
    EndpointCursor,
    EndpointState,
    decide_endpoint,
    load_monitoring_settings,
)
from mlplatform.serving.cluster import observe_endpoint
from mlplatform.settings import load_settings
from mlplatform_tests.support import free_port, running_webhook, tick

DOWN = EndpointState("down", detail="ConnectError: connection refused")
SERVING_V1 = EndpointState("serving", version="1")
SERVING_V2 = EndpointState("serving", version="2")


def _decide(
    desired: str | None,
    observed: EndpointState,
    cursor: EndpointCursor | None = None,
    busy: bool = False,
    registry_error: str | None = None,
):
    return decide_endpoint(
        desired,
        observed,
        cursor or EndpointCursor(),
        now=1000.0,
        deploy_in_progress=busy,
        registry_error=registry_error,
    )


def test_in_sync_requests_nothing_and_closes_any_earlier_difference():
    earlier = EndpointCursor("v1/down", "endpoint-v1-down-900", 900.0)
    decision = _decide("1", SERVING_V1, earlier)
    assert not decision.deploy and decision.run_key is None
    assert decision.reason == "In sync: the endpoint serves the champion v1."
    assert decision.cursor == EndpointCursor()


def test_a_down_endpoint_is_redeployed_once_per_difference():
    first = _decide("1", DOWN)
    assert first.deploy and first.run_key == "endpoint-v1-down-1000"
    assert first.reason == (
        "The champion is v1 but the endpoint is down (ConnectError: connection refused): "
        "redeploying v1."
    )
    assert first.cursor == EndpointCursor("v1/down", "endpoint-v1-down-1000", 1000.0)
    # The same difference on the next tick (the deploy failed, or has not run yet): no new request.
    again = decide_endpoint("1", DOWN, first.cursor, 1030.0, deploy_in_progress=False)
    assert not again.deploy and "already requested" in again.reason
    assert "endpoint-v1-down-1000" in again.reason
    assert again.cursor == first.cursor
    # Healed, then down again: a new difference, a new run key.
    healed = decide_endpoint("1", SERVING_V1, again.cursor, 1060.0, deploy_in_progress=False)
    assert healed.cursor == EndpointCursor()
    crashed = decide_endpoint("1", DOWN, healed.cursor, 2000.0, deploy_in_progress=False)
    assert crashed.deploy and crashed.run_key == "endpoint-v1-down-2000"
    assert crashed.cursor == EndpointCursor("v1/down", "endpoint-v1-down-2000", 2000.0)


def test_the_same_difference_after_its_deploy_succeeded_is_requested_again():
    first = _decide("1", DOWN)
    # Healed by that run, then down again before any tick saw it serving (a reboot).
    again = decide_endpoint(
        "1", DOWN, first.cursor, 1300.0, deploy_in_progress=False, requested_run_succeeded=True
    )
    assert again.deploy and again.run_key == "endpoint-v1-down-1300"
    assert again.cursor == EndpointCursor("v1/down", "endpoint-v1-down-1300", 1300.0)


def test_another_version_or_a_bad_answer_is_a_difference_of_its_own():
    moved = _decide("2", SERVING_V1)
    assert moved.deploy and moved.run_key == "endpoint-v2-v1-1000"
    assert "The champion is v2 but the endpoint is serving v1" in moved.reason
    assert moved.cursor == EndpointCursor("v2/v1", "endpoint-v2-v1-1000", 1000.0)
    unhealthy = EndpointState("unhealthy", detail="HTTP 503: no replica")
    # The endpoint changed from serving v1 to unhealthy: that is new, so it is requested again.
    sick = decide_endpoint("2", unhealthy, moved.cursor, 1030.0, deploy_in_progress=False)
    assert sick.deploy and sick.run_key == "endpoint-v2-unhealthy-1030"
    assert "unhealthy (HTTP 503: no replica)" in sick.reason
    assert sick.cursor == EndpointCursor("v2/unhealthy", "endpoint-v2-unhealthy-1030", 1030.0)


def test_a_running_deploy_or_retrain_is_waited_for():
    earlier = EndpointCursor("v2/down", "endpoint-v2-down-900", 900.0)
    decision = _decide("2", SERVING_V1, earlier, busy=True)
    assert not decision.deploy
    assert decision.reason == (
        "The champion is v2 but the endpoint is serving v1; a deploy or retrain is already "
        "queued or running."
    )
    assert decision.cursor == earlier


def test_a_registry_error_decides_nothing_and_is_never_no_champion():
    earlier = EndpointCursor("v1/down", "endpoint-v1-down-900", 900.0)
    decision = _decide(None, DOWN, earlier, registry_error="the model registry did not answer")
    assert not decision.deploy
    assert decision.reason == (
        "The registry did not answer, nothing decided: the model registry did not answer"
    )
    assert "champion" not in decision.reason
    assert decision.cursor == earlier
    nothing = _decide(None, DOWN, earlier)
    assert not nothing.deploy
    assert nothing.reason.startswith("No champion in the registry yet: nothing to serve")
    assert nothing.cursor == EndpointCursor()


def test_the_cursor_survives_its_json_round_trip_and_unreadable_ones_start_fresh():
    cursor = EndpointCursor("v3/down", "endpoint-v3-down-5", 5.0)
    assert EndpointCursor.parse(cursor.dump()) == cursor
    assert EndpointCursor.parse(None) == EndpointCursor.parse("{oops") == EndpointCursor()


def test_the_check_interval_is_a_setting():
    assert load_monitoring_settings({}).endpoint_check_s == 30
    assert load_monitoring_settings({"MLPLATFORM_ENDPOINT_CHECK_S": "5"}).endpoint_check_s == 5
    with pytest.raises(ValueError, match="MLPLATFORM_ENDPOINT_CHECK_S must be positive"):
        load_monitoring_settings({"MLPLATFORM_ENDPOINT_CHECK_S": "0"})
    assert endpoint_sensor.minimum_interval_seconds == load_monitoring_settings().endpoint_check_s


def test_the_endpoint_state_from_healthz():
    down = observe_endpoint(f"http://127.0.0.1:{free_port()}")
    assert down.status == "down" and "ConnectError" in down.detail
    with running_webhook(get_answer=(503, b"no replica")) as server:
        sick = observe_endpoint(server.url.removesuffix("/hook"))
    assert sick == EndpointState("unhealthy", detail="HTTP 503: no replica")
    body = json.dumps({"status": "ok", "model_name": "m", "model_version": "4"}).encode()
    with running_webhook(get_answer=(200, body)) as server:
        assert observe_endpoint(server.url.removesuffix("/hook")) == EndpointState(
            "serving", version="4"
        )


def _register_champion(tmp_path: Path) -> str:
    """A registered version named champion in the platform home's registry (never loaded)."""
    uri = load_settings().tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("mlplatform")
    version = client.create_model_version("mlplatform", source=str(tmp_path / "model")).version
    client.set_registered_model_alias("mlplatform", "champion", version)
    return str(version)


def test_sensor_requests_one_deploy_for_a_down_endpoint_and_alerts(instance, tmp_path, monkeypatch):
    monkeypatch.setenv("MLPLATFORM_SERVE_PORT", str(free_port()))  # nothing listens there
    assert tick(endpoint_sensor, instance).skip_reason.skip_message.startswith(
        "No champion in the registry yet"
    )
    version = _register_champion(tmp_path)
    with running_webhook() as hook, monkeypatch.context() as alerting:
        alerting.setenv("MLPLATFORM_ALERT_WEBHOOK", hook.url)
        first = tick(endpoint_sensor, instance)
    (request,) = first.run_requests
    assert request.run_key.startswith(f"endpoint-v{version}-down-")
    assert request.tags["mlplatform/trigger"] == "endpoint"
    cursor = EndpointCursor.parse(first.cursor)
    assert cursor.difference == f"v{version}/down" and cursor.run_key == request.run_key
    (alert,) = hook.received
    assert alert["run_key"] == request.run_key
    assert f"The champion is v{version} but the endpoint is down" in alert["text"]
    assert alert["endpoint"] == load_settings().endpoint_url

    again = tick(endpoint_sensor, instance, cursor=first.cursor)
    assert not again.run_requests and "already requested" in again.skip_reason.skip_message
    assert again.cursor == first.cursor

    # A deploy that is running (a run of a job carries the job's tags) holds requests back.
    deploy_job = defs.resolve_job_def("deploy_job")
    instance.create_run_for_job(
        deploy_job, status=dg.DagsterRunStatus.STARTED, tags=deploy_job.tags
    )
    busy = tick(endpoint_sensor, instance)
    assert not busy.run_requests and "already queued or running" in busy.skip_reason.skip_message
    assert busy.cursor == EndpointCursor().dump()


def test_sensor_asks_again_when_its_deploy_succeeded_and_the_endpoint_is_down_again(
    instance, tmp_path, monkeypatch
):
    monkeypatch.setenv("MLPLATFORM_SERVE_PORT", str(free_port()))  # nothing listens there
    _register_champion(tmp_path)
    first = tick(endpoint_sensor, instance)
    (request,) = first.run_requests
    # The requested deploy ran and succeeded; the daemon stopped before a tick saw it serving.
    deploy_job = defs.resolve_job_def("deploy_job")
    instance.create_run_for_job(
        deploy_job,
        status=dg.DagsterRunStatus.SUCCESS,
        tags={**deploy_job.tags, **request.tags, "dagster/run_key": request.run_key},
    )
    again = tick(endpoint_sensor, instance, cursor=first.cursor)
    (retry,) = again.run_requests
    assert retry.run_key.startswith("endpoint-v1-down-")
    assert EndpointCursor.parse(again.cursor).run_key == retry.run_key


@pytest.mark.parametrize(
    ("job_name", "deploys"),
    [
        ("retrain_job", True),
        ("rollback_job", True),
        ("deploy_job", True),
        ("drift_report_job", False),
    ],
)
def test_every_job_that_deploys_counts_as_a_deploy_in_progress(instance, job_name, deploys):
    assert not deploy_in_progress(instance)
    job = defs.resolve_job_def(job_name)
    instance.create_run_for_job(job, status=dg.DagsterRunStatus.STARTING, tags=job.tags)
    assert deploy_in_progress(instance) is deploys


@pytest.mark.faults
def test_sensor_skips_while_the_registry_does_not_answer(instance, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    earlier = EndpointCursor("v1/down", "endpoint-v1-down-900", 900.0).dump()
    result = tick(endpoint_sensor, instance, cursor=earlier)
    assert not result.run_requests
    message = result.skip_reason.skip_message
    assert message.startswith("The registry did not answer, nothing decided:")
    assert "did not answer for mlplatform@champion" in message
    assert result.cursor == earlier


@pytest.fixture
def serving(resources, instance, monkeypatch, serve_port) -> str:
    """v1 trained and live; the Definitions' resources serve on the session's port."""
    monkeypatch.setenv("MLPLATFORM_SERVE_PORT", str(serve_port))
    result = dg.materialize(ASSETS, resources=resources, instance=instance)
    assert result.success
    return result.output_for_node("model_endpoint").url


def _deploy(request: dg.RunRequest, instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
    """Run the requested deploy_job as the daemon would, on the Definitions' resources."""
    job = defs.resolve_job_def("deploy_job")
    return job.execute_in_process(instance=instance, tags=request.tags)


def test_a_crashed_endpoint_is_brought_back_by_the_sensor(serving, instance):
    assert tick(endpoint_sensor, instance).skip_reason.skip_message == (
        "In sync: the endpoint serves the champion v1."
    )
    serve.delete("mlplatform")  # the app is gone, as after a crash of the Ray head
    assert observe_endpoint(serving).status != "serving"

    crashed = tick(endpoint_sensor, instance)
    (request,) = crashed.run_requests
    assert request.run_key.startswith("endpoint-v1-")
    assert EndpointCursor.parse(crashed.cursor).run_key == request.run_key
    deployed = _deploy(request, instance)
    assert deployed.success
    assert {e.step_key for e in deployed.all_events if e.is_step_success} == {"model_endpoint"}
    assert deployed.output_for_node("model_endpoint").model_version == "1"
    assert httpx.get(f"{serving}/healthz", timeout=10).json()["model_version"] == "1"

    healed = tick(endpoint_sensor, instance, cursor=crashed.cursor)
    assert not healed.run_requests
    assert healed.skip_reason.skip_message == "In sync: the endpoint serves the champion v1."
    assert healed.cursor == EndpointCursor().dump()


def test_a_champion_moved_in_the_registry_is_deployed(serving, instance):
    client = MlflowClient()
    v1 = client.get_model_version("mlplatform", "1")
    v2 = client.create_model_version("mlplatform", source=v1.source, run_id=v1.run_id).version
    client.set_registered_model_alias("mlplatform", "champion", v2)

    moved = tick(endpoint_sensor, instance)
    (request,) = moved.run_requests
    assert request.run_key.startswith(f"endpoint-v{v2}-v1-")
    assert (
        f"The champion is v{v2} but the endpoint is serving v1"
        in (request.tags["mlplatform/endpoint-state"])
    )
    assert EndpointCursor.parse(moved.cursor).difference == f"v{v2}/v1"
    deployed = _deploy(request, instance)
    assert deployed.success
    metadata = deployed.asset_materializations_for_node("model_endpoint")[0].metadata
    assert metadata["model_version"].value == str(v2)
    assert metadata["previously"].value == "serving v1"
    assert httpx.get(f"{serving}/healthz", timeout=10).json()["model_version"] == str(v2)
    assert tick(endpoint_sensor, instance, cursor=moved.cursor).cursor == EndpointCursor().dump()


@pytest.fixture
def command_line(platform_home, tmp_path, small_loans_csv, monkeypatch) -> Path:
    """The environment `make` gives the command line: the platform and Dagster homes, the data."""
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    monkeypatch.setenv("MLPLATFORM_SOURCE", str(small_loans_csv))
    monkeypatch.setenv("MLPLATFORM_TARGET", "defaulted")
    return platform_home


def test_serve_without_a_champion_says_so(command_line, capsys):
    assert main(["serve"]) == 1
    error = capsys.readouterr().err
    assert "The deploy failed at model_endpoint" in error
    assert "model mlplatform has no champion yet: train one first" in error
    assert "unchanged" not in error  # the deploy's own message says what serves


def test_serve_deploys_the_champion_again_without_retraining(
    command_line, monkeypatch, serve_port, capsys
):
    monkeypatch.setenv("MLPLATFORM_SERVE_PORT", str(serve_port))
    assert run_pipeline() == 0
    serve.delete("mlplatform")  # as after `make stop`: nothing serves
    capsys.readouterr()

    assert main(["serve"]) == 0
    out = capsys.readouterr().out
    assert f"Model mlplatform v1 is live at http://127.0.0.1:{serve_port}" in out
    curl = re.search(r"^\s*(curl .*)$", out, re.MULTILINE).group(1)
    answer = subprocess.run(curl, shell=True, capture_output=True, text=True, check=True)
    assert json.loads(answer.stdout)["model_version"] == "1"
    with dg.DagsterInstance.get() as instance:
        runs = instance.get_run_records(dg.RunsFilter(job_name="deploy_job"))
        assert [record.dagster_run.status for record in runs] == [dg.DagsterRunStatus.SUCCESS]
        trained = instance.fetch_materializations(dg.AssetKey("candidate_model"), limit=10)
        assert len(trained.records) == 1  # deployed, not retrained
