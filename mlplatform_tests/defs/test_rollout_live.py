"""A staged rollout over real HTTP: a failing challenger is rolled back, a healthy one promoted.

The replicas load every version from MLflow in processes of their own, so the failing challenger
is a real registered model: v1's own TabularModel whose pipeline casts ``income`` to a 16-bit
unsigned integer before preprocessing. It loads, passes the deploy's preflight (its synthesized
records have an income of 0 and none) and answers most loans, but raises for every income above
65,535: a deterministic share of live requests fails, the way a bad feature transform would.
"""

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

from mlplatform.definitions import ASSETS, defs
from mlplatform.defs.rollout import judge
from mlplatform.monitoring.rollout import RolloutPolicy
from mlplatform.resources import MlflowTracking
from mlplatform.serving.model import load_served_model
from mlplatform.serving.preflight import preflight
from mlplatform.serving.release import REQUEST_KEY_HEADER, RolloutState
from mlplatform.settings import load_settings
from mlplatform_tests.support import FAST_WINDOWS, BackgroundLoop, loan_records, register_copy

NAME = "mlplatform"
RECORDS = loan_records(50, seed=21)
# Small enough for a test to gather, large enough for the rules to judge on.
JUDGE = {"min_requests": 30, "min_seconds": 1.0}


@pytest.fixture
def serving(resources, instance, monkeypatch, serve_port) -> Iterator[str]:
    """v1 trained and live; the Definitions' resources serve on the session's port."""
    monkeypatch.setenv("MLPLATFORM_SERVE_PORT", str(serve_port))
    result = dg.materialize(ASSETS, resources=resources, instance=instance, run_config=FAST_WINDOWS)
    assert result.success
    return result.output_for_node("model_endpoint").url


class Client(BackgroundLoop):
    """Sends one loan per request until stopped, and keeps every status and answering version."""

    def __init__(self, url: str):
        super().__init__()
        self.url = url
        self.answers: list[tuple[int, str | None]] = []
        self.http = httpx.Client(timeout=30)

    def step(self) -> None:
        """One request."""
        record = RECORDS[len(self.answers) % len(RECORDS)]
        response = self.http.post(f"{self.url}/predict", json={"records": [record]})
        self.answers.append((response.status_code, response.headers.get("X-Model-Version")))

    def __exit__(self, *_: object) -> None:
        super().__exit__()
        self.http.close()


def _failing(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The loans the failing copy cannot score: an income over 65,535."""
    return [r for r in records if r["income"] is not None and r["income"] > 65_535]


def _failing_copy_of_v1() -> str:
    """v1's model with a cast of ``income`` to UInt16 first: it fails for incomes over 65,535."""
    tracking_uri = load_settings().tracking_uri
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1").unwrap_python_model()
    (coerce, *rest) = model.pipeline.steps
    cast = [
        (
            "income_as_uint16",
            FunctionTransformer(pd.DataFrame.astype, kw_args={"dtype": {"income": "UInt16"}}),
        ),
        (
            "income_as_float",
            FunctionTransformer(pd.DataFrame.astype, kw_args={"dtype": {"income": "float64"}}),
        ),
    ]
    model.pipeline = Pipeline([coerce, *cast, *rest])

    # In process first: the failure is the one meant, on a share of the loans only.
    failing = _failing(RECORDS)
    assert 5 <= len(failing) <= 40, len(failing)
    scored = [r for r in RECORDS if r not in failing]
    assert len(model.predict_frame(pd.DataFrame(scored))) == len(scored)
    with pytest.raises(TypeError, match="cannot safely cast"):
        model.predict_frame(pd.DataFrame(failing[:1]))

    v1 = MlflowClient().get_model_version(NAME, "1")
    info = mlflow.models.get_model_info(f"models:/{NAME}/1")
    experiment = mlflow.get_experiment_by_name(NAME)
    with mlflow.start_run(experiment_id=experiment.experiment_id):
        logged = mlflow.pyfunc.log_model(
            name="model",
            python_model=model,
            signature=info.signature,
            registered_model_name=NAME,
        )
    version = str(logged.registered_model_version)
    MlflowClient().set_model_version_tag(NAME, version, "data_version", v1.tags["data_version"])

    # What the deploy checks passes; a replica's loaded model fails the same share.
    preflight(f"models:/{NAME}/{version}")
    served = load_served_model(f"models:/{NAME}/{version}")
    assert len(served.predict(scored[:3])) == 3
    with pytest.raises(TypeError, match="cannot safely cast"):
        served.predict(failing[:1])
    return version


def _release(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/healthz", timeout=10).json()["release"]


def _send(url: str, n: int = len(RECORDS), key: str | None = None) -> list[httpx.Response]:
    answers = []
    with httpx.Client(timeout=30) as client:
        for i, record in enumerate(RECORDS[:n]):
            headers = {REQUEST_KEY_HEADER: f"{key}-{i}"} if key else {}
            answers.append(
                client.post(f"{url}/predict", json={"records": [record]}, headers=headers)
            )
    return answers


def _wait_for_evidence(requests: int, timeout_s: float = 60.0) -> None:
    """Until the replicas' stage counts (written every few seconds) show the challenger's work."""
    policy = RolloutPolicy()
    deadline = time.monotonic() + timeout_s
    seen = 0
    while time.monotonic() < deadline:
        judgement = judge(MlflowTracking(), policy)
        assert not isinstance(judgement, str), judgement
        seen = judgement.evidence.challenger.requests
        if seen >= requests:
            return
        time.sleep(0.5)
    raise AssertionError(f"the challenger's counts show {seen} of {requests} requests")


def _deploy(instance: dg.DagsterInstance) -> None:
    result = defs.resolve_job_def("deploy_job").execute_in_process(
        instance=instance, run_config=FAST_WINDOWS
    )
    assert result.success


def _rollout(instance: dg.DagsterInstance, **config: Any) -> dg.ExecuteInProcessResult:
    result = defs.resolve_job_def("rollout_job").execute_in_process(
        instance=instance,
        run_config={
            "ops": {
                **FAST_WINDOWS["ops"],
                "rollout_report": {"config": JUDGE | config},
            }
        },
    )
    assert result.success
    return result


def _verdict(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    return result.output_for_node("rollout_report")


def _champion() -> str:
    return str(MlflowClient().get_model_version_by_alias(NAME, "champion").version)


def test_a_failing_challenger_is_rolled_back_and_a_healthy_one_promoted_over_http(
    serving, instance, tmp_path: Path
):
    # A challenger that fails on a share of live requests only.
    v2 = _failing_copy_of_v1()
    MlflowTracking().set_rollout_state(RolloutState.begin(v2, 0.2))
    _deploy(instance)
    release = _release(serving)
    assert (release["champion"], release["challenger"], release["stage"]) == ("1", v2, "shadow")

    # In shadow every answer is v1's, whatever v2 does beside it.
    answers = _send(serving)
    assert {(a.status_code, a.headers["X-Model-Version"]) for a in answers} == {(200, "1")}
    _wait_for_evidence(len(RECORDS))

    with Client(serving) as client:
        rolled_back = _rollout(instance)
    assert _verdict(rolled_back)["verdict"] == "roll_back"
    assert client.answers and set(client.answers) == {(200, "1")}, Counter(client.answers)
    assert _champion() == "1"
    assert MlflowTracking().rollout_state() is None
    tags = MlflowClient().get_model_version(NAME, v2).tags
    assert tags["rollout.decision"] == "rolled_back"
    assert tags["rollout.verdict"] == "roll_back"
    assert "error rate" in tags["rollout.reason"]
    # Every loan v2 failed was counted against it (the client's requests may add to them).
    evidence = json.loads(tags["rollout.evidence"])
    errors, requests = evidence["challenger_errors"], evidence["challenger_requests"]
    assert errors >= len(_failing(RECORDS)) and requests >= len(RECORDS)
    assert evidence["champion_errors"] == 0
    assert f"({errors} of {requests})" in tags["rollout.reason"]
    release = _release(serving)
    assert (release["champion"], release["challenger"]) == ("1", None)
    assert {a.status_code for a in _send(serving, 5)} == {200}

    # A healthy challenger: shadow, then canary, then champion.
    v3 = register_copy("1", tmp_path / "copy")
    MlflowTracking().set_rollout_state(RolloutState.begin(v3, 0.2))
    _deploy(instance)
    assert _release(serving)["challenger"] == v3
    assert {a.status_code for a in _send(serving)} == {200}
    _wait_for_evidence(len(RECORDS))
    advanced = _rollout(instance)
    assert _verdict(advanced)["verdict"] == "advance", _verdict(advanced)
    release = _release(serving)
    assert (release["champion"], release["challenger"], release["stage"]) == ("1", v3, "canary")
    canary = _send(serving, key="user")
    assert {a.status_code for a in canary} == {200}
    assert {a.headers["X-Model-Version"] for a in canary} == {"1", v3}

    _wait_for_evidence(5)
    promoted = _rollout(instance, min_requests=5, min_labels=0)
    assert _verdict(promoted)["verdict"] == "advance", _verdict(promoted)
    assert _champion() == v3
    assert MlflowTracking().rollout_state() is None
    release = _release(serving)
    assert (release["champion"], release["challenger"]) == (v3, None)
    assert {a.headers["X-Model-Version"] for a in _send(serving, 10)} == {v3}
