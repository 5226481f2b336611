import dagster as dg
import pytest
from mlflow import MlflowClient

from mlplatform.defs.evaluation import evaluation_report
from mlplatform.defs.features import features
from mlplatform.defs.ingest import raw_data
from mlplatform.defs.registry import champion_model
from mlplatform.defs.training import candidate_model
from mlplatform.resources import DataSource, MlflowTracking
from mlplatform.settings import DEFAULT_METRICS_PORT, load_settings
from mlplatform.status import PlatformStatus, collect_status
from mlplatform_tests.support import free_port


def test_status_reports_each_source_on_its_own(instance, small_loans_csv):
    result = dg.materialize(
        [raw_data, features, candidate_model, evaluation_report, champion_model],
        resources={
            "data_source": DataSource(uri=str(small_loans_csv), target="defaulted"),
            "mlflow_tracking": MlflowTracking(),
        },
        instance=instance,
    )
    assert result.success
    uri = load_settings().tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    down = f"http://127.0.0.1:{free_port()}"  # nothing serves there

    metrics_url = load_settings().metrics_url
    status = collect_status(
        instance, client, "mlplatform", down, timeout_s=2, metrics_url=metrics_url
    )

    assert status.champion == "1" and status.registry_error is None
    assert status.endpoint is None and status.endpoint_error == "no answer: ConnectError"
    assert not status.in_sync and status.served_version is None
    assert [(d["decision"], d["decided_version"]) for d in status.decisions] == [("promoted", "1")]
    assert status.decisions[0]["reason"].startswith("test roc_auc")
    assert status.last_drift is None
    text = status.to_text()
    assert "Champion:  v1" in text and f"Endpoint:  down at {down}" in text
    assert "Drift:     no verdict yet" in text and "promoted v1: test roc_auc" in text
    scrape = f"http://127.0.0.1:{DEFAULT_METRICS_PORT}/metrics"
    assert f"Metrics:   {scrape} (Prometheus scrape address)" in text
    document = status.to_dict()
    assert document["in_sync"] is False and document["champion"] == "1"

    # A drift sensor tick records its verdict as an observation: the newest verdict is shown.
    instance.report_runless_asset_event(
        dg.AssetObservation(
            "drift_report",
            metadata={"summary": "2 of 9 columns drifted", "should_retrain": False, "rows": 500},
        )
    )
    drift = collect_status(instance, client, "mlplatform", down, timeout_s=2).last_drift
    assert drift["summary"] == "2 of 9 columns drifted" and drift["rows"] == 500
    assert drift["should_retrain"] is False and drift["recorded_at"]


@pytest.mark.faults
def test_an_unreachable_registry_is_reported_not_read_as_no_champion(instance, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    registry = f"http://127.0.0.1:{free_port()}"
    client = MlflowClient(tracking_uri=registry, registry_uri=registry)
    down = f"http://127.0.0.1:{free_port()}"

    status = collect_status(instance, client, "mlplatform", down, timeout_s=2)

    assert status.champion is None
    assert "the model registry did not answer for mlplatform@champion" in status.registry_error
    assert "Champion:  unknown (the model registry did not answer" in status.to_text()
    assert status.decisions == [] and "Decisions: none yet" in status.to_text()


def test_in_sync_means_the_whole_release():
    def status(release, rollout):
        endpoint = {"model_version": "1", "release": release}
        return PlatformStatus("m", "1", None, "http://e", endpoint, None, None, [], rollout)

    shadow = {"challenger": "2", "stage": "shadow", "canary_share": 0.2, "paused": False}
    alone = {"champion": "1", "challenger": None, "stage": None}
    in_shadow = {"champion": "1", "challenger": "2", "stage": "shadow"}
    assert status(alone, None).in_sync
    assert status(in_shadow, shadow).in_sync
    assert not status(alone, shadow).in_sync  # the challenger is not deployed yet
    assert not status(in_shadow, None).in_sync  # its rollout ended, the endpoint still has it
    assert not status(in_shadow, shadow | {"stage": "canary"}).in_sync
    # A rollout of the champion itself (promoted by hand) is no part of the release.
    assert status(alone, shadow | {"challenger": "1"}).in_sync


def test_metrics_port_setting_gives_the_local_heads_scrape_address(tmp_path):
    settings = load_settings({"MLPLATFORM_HOME": str(tmp_path), "MLPLATFORM_METRICS_PORT": "9555"})
    assert settings.metrics_port == 9555
    assert settings.metrics_url == "http://127.0.0.1:9555/metrics"
    # A cluster of one's own: every node exports on its own port, none of them ours to name.
    assert load_settings({"RAY_ADDRESS": "ray://head:10001"}).metrics_url is None
    with pytest.raises(ValueError, match="MLPLATFORM_METRICS_PORT must be a port number"):
        load_settings({"MLPLATFORM_METRICS_PORT": "metrics"})
