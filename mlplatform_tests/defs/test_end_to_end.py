"""The whole graph on real MLflow and real Ray Serve over HTTP."""

import json
import threading
from pathlib import Path

import dagster as dg
import httpx
import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from mlplatform.definitions import ASSETS
from mlplatform.demo.data import generate_loans
from mlplatform.progress import HEADLINES
from mlplatform.resources import DataSource
from mlplatform_tests.support import promote_rollout


def _records(n: int, seed: int) -> list[dict]:
    frame = (
        generate_loans(n, seed=seed).drop(columns=["defaulted", "application_id"]).astype(object)
    )
    return json.loads(frame.where(frame.notna(), None).to_json(orient="records"))


def _champion_version() -> str:
    return str(MlflowClient().get_model_version_by_alias("mlplatform", "champion").version)


class TrafficProbe(threading.Thread):
    """Sends single-record predictions in a loop and keeps every status and served version."""

    def __init__(self, url: str, record: dict):
        super().__init__(daemon=True)
        self.url, self.record = url, record
        self.statuses: list[int] = []
        self.versions: set[str] = set()
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                response = client.post(f"{self.url}/predict", json={"records": [self.record]})
                self.statuses.append(response.status_code)
                if response.status_code == 200:
                    self.versions.add(response.json()["model_version"])


@pytest.fixture
def first_run(resources, instance) -> dg.ExecuteInProcessResult:
    result = dg.materialize(ASSETS, resources=resources, instance=instance)
    assert result.success
    return result


def test_endpoint_answers_like_the_registered_champion(first_run):
    endpoint = first_run.output_for_node("model_endpoint")
    records = _records(25, seed=21)
    response = httpx.post(f"{endpoint.url}/predict", json={"records": records})
    assert response.status_code == 200
    body = response.json()
    expected = mlflow.pyfunc.load_model("models:/mlplatform@champion").predict(
        pd.DataFrame(records)
    )
    assert body["model_name"] == "mlplatform"
    assert body["model_version"] == endpoint.model_version == _champion_version()
    assert body["predictions"] == expected["prediction"].tolist()
    assert body["probabilities"] == pytest.approx(expected["probability"].tolist(), abs=1e-12)
    materialization = first_run.asset_materializations_for_node("model_endpoint")[0]
    assert materialization.metadata["model_version"].value == endpoint.model_version
    health = next(
        c for c in first_run.get_asset_check_evaluations() if c.check_name == "endpoint_health"
    )
    # The check reports what it measured; its latency verdict depends on the machine's load.
    assert health.description.startswith(f"serving v{endpoint.model_version}; p50 ")
    assert health.metadata["p50_ms"].value <= health.metadata["max_ms"].value
    # What `make run` prints per asset comes from each asset's own metadata, every figure found.
    for name, headline in HEADLINES.items():
        line = headline(first_run.asset_materializations_for_node(name)[0].metadata)
        assert "?" not in line, (name, line)
    served = first_run.asset_materializations_for_node("model_endpoint")[0].metadata
    assert HEADLINES["model_endpoint"](served) == f"serving v1 at {endpoint.url}"


def test_second_run_redeploys_without_dropping_requests(first_run, resources, instance):
    endpoint = first_run.output_for_node("model_endpoint")
    probe = TrafficProbe(endpoint.url, endpoint.example_record)
    probe.start()
    second = dg.materialize(ASSETS, resources=resources, instance=instance)
    assert second.success
    report = second.output_for_node("evaluation_report")
    assert (report.challenger.version, report.champion.version) == ("2", "1")
    tags = MlflowClient().get_model_version("mlplatform", "2").tags
    # v2 passed the gate: it enters the release in shadow, the champion v1 still answers ...
    assert tags["promotion.decision"] == "rollout_started"
    assert "vs champion v1" in tags["promotion.reason"]
    assert httpx.get(f"{endpoint.url}/healthz").json()["model_version"] == "1"
    # ... until its rollout promotes it (here by hand), again without dropping a request.
    promote_rollout(resources, instance)
    probe.stop.set()
    probe.join()
    assert len(probe.statuses) > 20
    assert set(probe.statuses) == {200}
    tags = MlflowClient().get_model_version("mlplatform", "2").tags
    assert tags["promotion.decision"] == "promoted"
    assert httpx.get(f"{endpoint.url}/healthz").json()["model_version"] == "2"
    assert probe.versions <= {"1", "2"}


def _bad_data(kind: str, directory: Path) -> str:
    frame = generate_loans(800, seed=9)
    if kind == "missing_target":
        frame = frame.drop(columns=["defaulted"])
    elif kind == "all_null_column":
        frame["credit_score"] = None
    elif kind == "one_class_target":
        frame["defaulted"] = 0
    elif kind == "wrong_file":
        frame = pd.DataFrame({"city": ["a", "b"] * 200, "population": range(400)})
    path = directory / f"{kind}.csv"
    frame.to_csv(path, index=False)
    return str(path)


@pytest.mark.parametrize(
    ("kind", "failing_check"),
    [
        ("missing_target", "schema"),
        ("all_null_column", "no_empty_columns"),
        ("one_class_target", "target_is_usable"),
        ("wrong_file", "schema"),
    ],
)
def test_bad_data_stops_at_raw_data_and_serving_is_untouched(
    first_run, resources, instance, tmp_path, kind, failing_check
):
    endpoint = first_run.output_for_node("model_endpoint")
    champion_before = _champion_version()
    versions_before = len(MlflowClient().search_model_versions("name='mlplatform'"))
    bad = resources | {"data_source": DataSource(uri=_bad_data(kind, tmp_path), target="defaulted")}
    result = dg.materialize(ASSETS, resources=bad, instance=instance, raise_on_error=False)
    assert not result.success
    failed = {c.check_name for c in result.get_asset_check_evaluations() if not c.passed}
    assert failing_check in failed
    executed = {e.step_key for e in result.all_events if e.is_step_success}
    assert executed.isdisjoint({"features", "candidate_model", "champion_model", "model_endpoint"})
    assert _champion_version() == champion_before
    assert len(MlflowClient().search_model_versions("name='mlplatform'")) == versions_before
    answer = httpx.post(f"{endpoint.url}/predict", json={"records": [endpoint.example_record]})
    assert answer.status_code == 200
    assert answer.json()["model_version"] == champion_before


def _noise_trained_source(directory: Path) -> DataSource:
    """Real data whose training rows (the oldest 70%) carry shuffled labels: a worse model."""
    frame = generate_loans(1200, seed=3)
    train = slice(0, 840)  # the time-ordered split trains on the oldest rows
    shuffled = frame["defaulted"].iloc[train].sample(frac=1, random_state=0).to_numpy()
    frame.loc[frame.index[train], "defaulted"] = shuffled
    path = directory / "noisy.csv"
    frame.to_csv(path, index=False)
    return DataSource(uri=str(path), target="defaulted")


def test_gate_promotes_a_better_challenger_and_stops_a_worse_one(resources, instance, tmp_path):
    noisy = resources | {"data_source": _noise_trained_source(tmp_path)}
    no_floor = {"ops": {"evaluation_report": {"config": {"min_score": 0.0}}}}
    # v1: trained on noise; without a floor it becomes the first champion.
    first = dg.materialize(ASSETS, resources=noisy, instance=instance, run_config=no_floor)
    assert first.success
    url = first.output_for_node("model_endpoint").url
    # v2: trained on real labels, clearly better on the same test rows: rolled out and served.
    better = dg.materialize(ASSETS, resources=resources, instance=instance)
    assert better.success
    assert _champion_version() == "1"  # in shadow until its rollout promotes it
    promote_rollout(resources, instance)
    assert _champion_version() == "2"
    difference = better.output_for_node("evaluation_report").difference["roc_auc"]
    assert difference["low"] > 0
    # v3: trained on noise again; even without a floor the paired interval stops it.
    worse = dg.materialize(
        ASSETS, resources=noisy, instance=instance, run_config=no_floor, raise_on_error=False
    )
    assert not worse.success
    gate = next(c for c in worse.get_asset_check_evaluations() if c.check_name == "promotion_gate")
    assert not gate.passed
    assert "credibly worse than" in gate.description
    assert _champion_version() == "2"
    assert httpx.get(f"{url}/healthz").json()["model_version"] == "2"
