"""Rolling the champion and the live endpoint back to an earlier model version."""

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import dagster as dg
import httpx
import mlflow
import pandas as pd
import pytest
import ray
from mlflow import MlflowClient

from mlplatform.cli import main, run_pipeline
from mlplatform.demo.data import generate_loans
from mlplatform.settings import load_settings

REASON = "v2 over-approves thin-file applicants in production"


@dataclasses.dataclass(frozen=True)
class Platform:
    """A platform home and Dagster home with two trained versions, v2 serving."""

    env: dict[str, str]
    url: str
    first_run_id: str


def _platform_environment() -> Iterator[str]:
    """Every variable that points the platform or MLflow somewhere."""
    for name in os.environ:
        if name.startswith("MLPLATFORM_") or name in {"MLFLOW_TRACKING_URI", "RAY_ADDRESS"}:
            yield name


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory: pytest.TempPathFactory, serve_port: int) -> Platform:
    """``python -m mlplatform run`` twice, in process, on homes shared with the command line."""
    root = tmp_path_factory.mktemp("rollback")
    source = root / "loans.csv"
    generate_loans(n_rows=1200, seed=3).to_csv(source, index=False)
    env = {
        "MLPLATFORM_HOME": str(root / "home"),
        "DAGSTER_HOME": str(root / "dagster"),
        "MLPLATFORM_SOURCE": str(source),
        "MLPLATFORM_TARGET": "defaulted",
        "MLPLATFORM_SERVE_PORT": str(serve_port),
    }
    with pytest.MonkeyPatch.context() as patch:
        for name in list(_platform_environment()):
            patch.delenv(name)
        for name, value in env.items():
            patch.setenv(name, value)
        assert run_pipeline() == 0
        assert run_pipeline() == 0  # v2 passes the gate and is rolled out in shadow ...
        assert main(["rollout", "promote", "--reason", "two champions to roll back between"]) == 0
        with dg.DagsterInstance.get() as instance:
            first = instance.fetch_materializations(
                dg.AssetKey("raw_data"), limit=1, ascending=True
            ).records[0]
    mlflow.set_tracking_uri(None)
    return Platform(env=env, url=f"http://127.0.0.1:{serve_port}", first_run_id=first.run_id)


@pytest.fixture
def platform(two_versions: Platform, monkeypatch: pytest.MonkeyPatch) -> Platform:
    """The shared homes, as this test's platform (the command line finds them in the env)."""
    for name, value in two_versions.env.items():
        monkeypatch.setenv(name, value)
    uri = load_settings().tracking_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return two_versions


def _client() -> MlflowClient:
    uri = load_settings().tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _champion() -> str:
    return str(_client().get_model_version_by_alias("mlplatform", "champion").version)


def _served(url: str) -> str:
    return httpx.get(f"{url}/model", timeout=30).json()["model_version"]


def _records(n: int, seed: int) -> list[dict]:
    frame = generate_loans(n, seed=seed).drop(columns=["defaulted", "application_id"])
    frame = frame.astype(object)
    return json.loads(frame.where(frame.notna(), None).to_json(orient="records"))


def test_rollback_needs_trained_models(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "empty"))
    assert main(["rollback", "--to", "1", "--reason", REASON]) == 1
    assert "Nothing to roll back" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("target", "reason", "message"),
    [
        ("current", REASON, "rollback must go to a version before champion v{current}"),
        ("later", REASON, "rollback must go to a version before champion v{current}"),
        ("earlier", None, "needs a reason"),
        ("earlier", "   ", "needs a reason"),
        ("0", REASON, "version=0"),
    ],
    ids=["current", "later", "no-reason", "blank-reason", "unknown-version"],
)
def test_a_refused_rollback_changes_nothing(platform, capsys, target, reason, message):
    current = _champion()
    version = {
        "current": current,
        "later": str(int(current) + 1),
        "earlier": str(int(current) - 1),
    }.get(target, target)
    tags_before = {v: _client().get_model_version("mlplatform", v).tags for v in ("1", "2")}
    served_before = _served(platform.url)

    args = ["rollback", "--to", version] + (["--reason", reason] if reason is not None else [])
    assert main(args) == 1

    error = capsys.readouterr().err
    assert "The rollback failed at champion_model" in error
    assert message.format(current=current) in error
    assert _champion() == current
    assert _served(platform.url) == served_before == current
    assert {v: _client().get_model_version("mlplatform", v).tags for v in ("1", "2")} == tags_before


def test_rollback_from_the_command_line_serves_the_earlier_version(platform, capsys):
    assert _champion() == _served(platform.url) == "2"
    records = _records(40, seed=21)
    v1 = mlflow.pyfunc.load_model("models:/mlplatform/1").predict(pd.DataFrame(records))

    command = [sys.executable, "-m", "mlplatform", "rollback", "--to", "1", "--reason", REASON]
    result = subprocess.run(
        command,
        env=os.environ | {"RAY_ADDRESS": ray.get_runtime_context().gcs_address},
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    assert "mlplatform v1 is the champion (was v2)" in result.stdout
    assert f"Reason: {REASON}" in result.stdout
    assert f"is live at {platform.url}" in result.stdout
    card = httpx.get(f"{platform.url}/model", timeout=30).json()
    assert card["model_version"] == "1"
    answer = httpx.post(f"{platform.url}/predict", json={"records": records}, timeout=30).json()
    assert answer["model_version"] == "1"
    assert answer["predictions"] == v1["prediction"].tolist()
    assert answer["probabilities"] == pytest.approx(v1["probability"].tolist(), abs=1e-12)
    assert _champion() == "1"
    tags = _client().get_model_version("mlplatform", "1").tags
    assert tags["promotion.decision"] == "rolled_back"
    assert tags["promotion.reason"] == REASON
    assert tags["promotion.previous_champion"] == "2"

    # The version now serving still traces to the raw data of the run that trained it.
    capsys.readouterr()
    assert main(["lineage", "--version", "1", "--json"]) == 0
    lineage = json.loads(capsys.readouterr().out)
    assert lineage["dagster_run_id"] == card["dagster_run_id"] == platform.first_run_id
    assert lineage["raw_data"]["run_id"] == platform.first_run_id
    assert lineage["data_version"] == card["data_version"]
    assert lineage["model_tags"]["promotion.decision"] == "rolled_back"


def test_status_shows_the_champion_the_endpoint_serves_and_the_decisions(platform, capsys):
    assert main(["status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    champion = _champion()
    assert status["champion"] == champion == status["served_version"] == _served(platform.url)
    assert status["in_sync"] is True and status["endpoint"]["status"] == "ok"
    # Newest first: the latest decision is the one that made the current champion.
    assert status["decisions"][0]["champion_version"] == champion
    assert main(["status"]) == 0
    text = capsys.readouterr().out
    assert f"Champion:  v{champion}" in text and f"v{champion} at {platform.url} (in sync)" in text
