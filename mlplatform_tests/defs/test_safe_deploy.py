"""A version that cannot serve never replaces one that does, and the alias follows what serves."""

from collections.abc import Iterator

import dagster as dg
import httpx
import pytest
from mlflow import MlflowClient
from ray import serve

from mlplatform.definitions import ASSETS, defs
from mlplatform.monitoring.rules import EndpointState
from mlplatform.serving.cluster import observe_endpoint
from mlplatform_tests.support import BackgroundLoop, register_copy

SERVING_V1 = EndpointState("serving", version="1")


class HealthProbe(BackgroundLoop):
    """Polls ``GET /healthz`` until stopped, then once more, and keeps every state it saw.

    The final poll makes "v1 answered throughout and after" checkable however quickly the
    work inside the ``with`` block ends.
    """

    def __init__(self, url: str):
        super().__init__()
        self.url = url
        self.states: list[EndpointState] = []

    def step(self) -> None:
        """One poll."""
        self.states.append(observe_endpoint(self.url))

    def __exit__(self, *_: object) -> None:
        super().__exit__()
        self.step()


@pytest.fixture
def serving(resources, instance, monkeypatch, serve_port) -> Iterator[str]:
    """v1 trained and live; the Definitions' resources serve on the session's port."""
    monkeypatch.setenv("MLPLATFORM_SERVE_PORT", str(serve_port))
    result = dg.materialize(ASSETS, resources=resources, instance=instance)
    assert result.success
    return result.output_for_node("model_endpoint").url


def _champion() -> str:
    return str(MlflowClient().get_model_version_by_alias("mlplatform", "champion").version)


def _failure(result: dg.ExecuteInProcessResult) -> tuple[str, str]:
    """The step that failed and the message of the error it raised (under Dagster's wrapper)."""
    assert not result.success
    event = next(event for event in result.all_events if event.is_step_failure)
    error = event.step_failure_data.error
    while error.cause is not None:
        error = error.cause
    qualified_name, message = error.message.strip().split(": ", 1)
    assert qualified_name.endswith(error.cls_name)
    return event.step_key, message


def test_forcing_a_version_that_cannot_load_is_refused_while_the_old_one_serves(
    serving, resources, instance, tmp_path
):
    broken = register_copy("1", tmp_path / "copy", corrupt=True)
    force = {"action": "force", "version": broken, "reason": "hotfix"}
    with HealthProbe(serving) as probe:
        result = dg.materialize(
            ASSETS,
            selection=["champion_model", "model_endpoint"],
            resources=resources,
            instance=instance,
            run_config={"ops": {"champion_model": {"config": force}}},
            raise_on_error=False,
        )
    step, message = _failure(result)
    assert step == "champion_model"
    assert f"v{broken} cannot serve, so it was not forced; the champion stays v1: " in message
    assert f"models:/mlplatform/{broken} cannot be loaded: UnpicklingError" in message
    assert "invalid load key" in message
    assert len(probe.states) >= 2 and set(probe.states) == {SERVING_V1}
    assert _champion() == "1"
    tags = MlflowClient().get_model_version("mlplatform", broken).tags
    assert tags["promotion.decision"] == "denied"
    assert tags["promotion.reason"].startswith("not forced: ")
    assert "invalid load key" in tags["promotion.reason"]
    assert tags["promotion.previous_champion"] == "1"

    # The champion is still loadable, so a retrain evaluates against it and serves its result.
    retrain = dg.materialize(ASSETS, resources=resources, instance=instance)
    assert retrain.success
    served = retrain.output_for_node("model_endpoint").model_version
    assert served == _champion() == observe_endpoint(serving).version


def test_deploying_a_champion_that_cannot_load_keeps_the_served_version(
    serving, instance, tmp_path
):
    broken = register_copy("1", tmp_path / "copy", corrupt=True)
    # The alias moved outside champion_model (by hand, in the registry).
    MlflowClient().set_registered_model_alias("mlplatform", "champion", broken)
    with HealthProbe(serving) as probe:
        result = defs.resolve_job_def("deploy_job").execute_in_process(
            instance=instance, raise_on_error=False
        )
    step, message = _failure(result)
    assert step == "model_endpoint"
    assert message.startswith(
        f"v{broken} was not deployed: models:/mlplatform/{broken} cannot be loaded: "
    )
    assert "invalid load key" in message
    assert message.endswith(
        "The champion is v1 again (decision recorded). The endpoint is serving v1."
    )
    assert len(probe.states) >= 2 and set(probe.states) == {SERVING_V1}
    assert _champion() == "1"
    tags = MlflowClient().get_model_version("mlplatform", broken).tags
    assert tags["promotion.decision"] == "reverted"
    assert tags["promotion.previous_champion"] == broken
    assert "invalid load key" in tags["promotion.reason"]
    assert tags["promotion.dagster_run_id"] == result.run_id


def test_a_deploy_whose_replicas_cannot_start_restores_the_previous_deployment(serving, instance):
    client = MlflowClient()
    v1 = client.get_model_version("mlplatform", "1")
    v2 = client.create_model_version("mlplatform", source=v1.source, run_id=v1.run_id).version
    client.set_registered_model_alias("mlplatform", "champion", v2)
    # v2 loads, but its replicas ask for more CPUs than the cluster has: they never start.
    unplaceable = {"replica_cpus": 64, "ready_timeout_s": 15}
    result = defs.resolve_job_def("deploy_job").execute_in_process(
        instance=instance,
        run_config={"ops": {"model_endpoint": {"config": unplaceable}}},
        raise_on_error=False,
    )
    step, message = _failure(result)
    assert step == "model_endpoint"
    assert message.startswith(f"v{v2} was not deployed: DeployFailed: mlplatform was not running")
    assert "restored the previous deployment (v1)" in message
    assert message.endswith(
        "The champion is v1 again (decision recorded). The endpoint is serving v1."
    )
    assert httpx.get(f"{serving}/healthz", timeout=10).json()["model_version"] == "1"
    assert _champion() == "1"
    assert client.get_model_version("mlplatform", str(v2)).tags["promotion.decision"] == (
        "reverted"
    )
    # The previous deployment came back with its own knobs: a 64-CPU replica never runs here.
    assert serve.status().applications["mlplatform"].status == "RUNNING"


def test_serving_beyond_loopback_needs_keys_and_a_keyed_deploy_checks_itself_with_one(
    serving, instance, monkeypatch
):
    client = MlflowClient()
    v1 = client.get_model_version("mlplatform", "1")
    v2 = str(client.create_model_version("mlplatform", source=v1.source, run_id=v1.run_id).version)
    client.set_registered_model_alias("mlplatform", "champion", v2)
    deploy_job = defs.resolve_job_def("deploy_job")

    monkeypatch.setenv("MLPLATFORM_SERVE_HOST", "0.0.0.0")
    with HealthProbe(serving) as probe:
        refused = deploy_job.execute_in_process(instance=instance, raise_on_error=False)
    step, message = _failure(refused)
    assert step == "model_endpoint"
    assert message.startswith(f"v{v2} was not deployed: refusing to serve on 0.0.0.0 without API")
    assert message.endswith("Nothing was changed; the endpoint is serving v1.")
    # Nothing was rolled (v1 answered while the run ran, and after), and a configuration error
    # moves no alias.
    assert len(probe.states) >= 2 and set(probe.states) == {SERVING_V1}
    assert _champion() == v2

    key = "a-deploy-key-0123456789abcdef"
    monkeypatch.setenv("MLPLATFORM_SERVE_HOST", "127.0.0.1")
    monkeypatch.setenv("MLPLATFORM_API_KEYS", f"predict,feedback:{key}")
    deployed = deploy_job.execute_in_process(instance=instance)

    # The deploy's own card read, smoke test and latency check presented the key.
    endpoint = deployed.output_for_node("model_endpoint")
    assert endpoint.model_version == v2 and endpoint.requires_key
    assert 'Authorization: Bearer $MLPLATFORM_API_KEY"' in endpoint.curl_example
    assert deployed.get_asset_check_evaluations()[0].passed
    assert httpx.get(f"{serving}/model", timeout=10).status_code == 401
    keyed = httpx.get(f"{serving}/model", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert keyed.json()["model_version"] == v2
    assert observe_endpoint(serving) == EndpointState("serving", version=v2)
    # The key is nowhere in the run's events, metadata or logs.
    events = instance.all_logs(deployed.run_id)
    assert events and not any(key in dg.serialize_value(event) for event in events)
