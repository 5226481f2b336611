"""Tracing live predictions and model versions back to the exact raw data materialization."""

import json

import dagster as dg
import httpx
import pytest
from mlflow import MlflowClient

from mlplatform.definitions import ASSETS
from mlplatform.defs.features import features
from mlplatform.defs.ingest import raw_data
from mlplatform.defs.training import candidate_model
from mlplatform.lineage import (
    FALLBACK,
    PROVENANCE,
    LineageError,
    trace_model_version,
    trace_prediction,
)
from mlplatform.settings import load_settings
from mlplatform_tests.support import promote_rollout

RETRAIN = ["candidate_model", "evaluation_report", "champion_model", "model_endpoint"]


def _materialization(instance: dg.DagsterInstance, asset: str, run_id: str) -> dg.EventLogRecord:
    """The one materialization of ``asset`` in run ``run_id``, read straight from the instance."""
    records = instance.fetch_materializations(dg.AssetKey(asset), limit=100).records
    [record] = [r for r in records if r.run_id == run_id]
    return record


def _version_tags(version: str) -> dict[str, str]:
    uri = load_settings().tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return client.get_model_version("mlplatform", version).tags


def _predict(url: str, record: dict) -> dict:
    response = httpx.post(f"{url}/predict", json={"records": [record]}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_prediction_traces_to_the_raw_data_of_its_training_run(resources, instance):
    run = dg.materialize(ASSETS, resources=resources, instance=instance)
    assert run.success
    endpoint = run.output_for_node("model_endpoint")
    body = _predict(endpoint.url, endpoint.example_record)
    card = httpx.get(f"{endpoint.url}/model", timeout=30).json()

    lineage = trace_prediction(instance, body)

    raw = _materialization(instance, "raw_data", run.run_id)
    tags = _version_tags(body["model_version"])
    assert lineage.request_id == body["request_id"]
    assert (lineage.model_name, lineage.model_version) == ("mlplatform", body["model_version"])
    assert lineage.path == PROVENANCE
    assert lineage.problems == ()
    assert lineage.dagster_run_id == run.run_id == card["dagster_run_id"] == tags["dagster_run_id"]
    assert lineage.mlflow_run_id == card["mlflow_run_id"]
    assert lineage.dagster_run_status == "SUCCESS"
    for link, asset in (
        (lineage.candidate_model, "candidate_model"),
        (lineage.features, "features"),
        (lineage.raw_data, "raw_data"),
    ):
        assert link.run_id == run.run_id
        assert link.storage_id == _materialization(instance, asset, run.run_id).storage_id
    assert lineage.raw_data.storage_id == raw.storage_id
    assert lineage.raw_data.timestamp == raw.timestamp
    assert lineage.raw_data.found_by == lineage.features.found_by == PROVENANCE
    assert (
        lineage.data_version
        == raw.asset_materialization.metadata["data_version"].value
        == tags["data_version"]
        == card["data_version"]
    )
    assert lineage.source_uri == resources["data_source"].uri

    as_dict = json.loads(json.dumps(lineage.to_dict()))
    assert as_dict["raw_data"]["storage_id"] == raw.storage_id
    assert as_dict["path"] == PROVENANCE
    rendered = lineage.to_markdown()
    assert f"| raw_data | {raw.storage_id} | `{run.run_id}` |" in rendered
    assert lineage.data_version in rendered


def test_a_model_retrained_later_traces_to_the_raw_data_of_the_first_run(resources, instance):
    first = dg.materialize(ASSETS, resources=resources, instance=instance)
    assert first.success
    # The same file ingested again: same data version, a newer raw_data materialization that the
    # retrain below never reads (it trains on the stored features of the first run).
    again = dg.materialize(ASSETS, selection=["raw_data"], resources=resources, instance=instance)
    assert again.success
    second = dg.materialize(ASSETS, selection=RETRAIN, resources=resources, instance=instance)
    assert second.success
    assert second.output_for_node("model_endpoint").model_version == "1"  # v2 in shadow
    endpoint = promote_rollout(resources, instance).output_for_node("model_endpoint")
    assert endpoint.model_version == "2"

    lineage = trace_prediction(instance, _predict(endpoint.url, endpoint.example_record))

    first_raw = _materialization(instance, "raw_data", first.run_id)
    newer_raw = _materialization(instance, "raw_data", again.run_id)
    assert lineage.model_version == "2"
    assert lineage.path == PROVENANCE
    assert lineage.problems == ()
    assert lineage.dagster_run_id == lineage.candidate_model.run_id == second.run_id
    assert lineage.features.run_id == first.run_id
    assert (
        lineage.features.storage_id
        == _materialization(instance, "features", first.run_id).storage_id
    )
    assert (lineage.raw_data.run_id, lineage.raw_data.storage_id) == (
        first.run_id,
        first_raw.storage_id,
    )
    assert newer_raw.storage_id > first_raw.storage_id  # the latest raw_data is not the one used
    assert lineage.data_version == _version_tags("2")["data_version"]
    assert lineage.data_version == newer_raw.asset_materialization.metadata["data_version"].value
    card = httpx.get(f"{endpoint.url}/model", timeout=30).json()
    assert (card["model_version"], card["data_version"]) == ("2", lineage.data_version)
    assert card["dagster_run_id"] == second.run_id

    v1 = trace_model_version(instance, "mlplatform", "1")
    assert v1.dagster_run_id == first.run_id
    assert v1.raw_data.storage_id == first_raw.storage_id


def test_without_recorded_provenance_the_trace_falls_back_to_the_data_version(
    training_resources, instance
):
    ingest = dg.materialize([raw_data, features], resources=training_resources, instance=instance)
    assert ingest.success
    built = ingest.asset_materializations_for_node("features")[0].metadata["data_version"].value
    # Features reported from outside a run carry no input event pointer to raw_data.
    instance.report_runless_asset_event(
        dg.AssetMaterialization("features", metadata={"data_version": built})
    )
    training = dg.materialize(
        [raw_data, features, candidate_model],
        selection=[candidate_model],
        resources=training_resources,
        instance=instance,
    )
    assert training.success

    lineage = trace_model_version(instance, "mlplatform", "1")

    assert lineage.path == FALLBACK
    assert lineage.problems == ()
    assert lineage.features.found_by == PROVENANCE
    assert lineage.features.run_id == ""  # the reported materialization
    assert lineage.raw_data.found_by == FALLBACK
    raw = _materialization(instance, "raw_data", ingest.run_id)
    assert (lineage.raw_data.storage_id, lineage.data_version) == (raw.storage_id, built)
    assert "data version match" in lineage.to_markdown()

    with pytest.raises(LineageError, match="no model version mlplatform v9 in the MLflow registry"):
        trace_model_version(instance, "mlplatform", "9")
    with pytest.raises(LineageError, match="not a /predict response"):
        trace_prediction(instance, {"detail": [{"msg": "field required"}]})
    missing_run = f"{training.run_id}.* not in this Dagster instance"
    with dg.instance_for_test() as other, pytest.raises(LineageError, match=missing_run):
        trace_model_version(other, "mlplatform", "1")
