import json
import subprocess
import sys
from pathlib import Path

import httpx
import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from mlplatform.defs.serving import EndpointConfig
from mlplatform.demo.data import generate_loans
from mlplatform.model.pipeline import coerce_features
from mlplatform.model.registry import resolve_model_version
from mlplatform.model.spec import infer_feature_spec
from mlplatform.serving import cluster
from mlplatform.serving.settings import ServingKnobs, ServingSettings
from mlplatform.serving.validation import InvalidRequest, check_records
from mlplatform.settings import load_settings
from mlplatform_tests.serving.test_routes import (
    BAD_BODIES,
    body_arguments,
    check_health_card_and_docs,
)
from mlplatform_tests.support import train_champion

SPEC = infer_feature_spec(generate_loans(300), "defaulted")
MAX_RECORDS = 50
MAX_BODY_BYTES = 64 * 1024


def _records(n: int, seed: int = 11) -> list[dict]:
    frame = generate_loans(n, seed=seed)[list(SPEC.features)].astype(object)
    return json.loads(frame.where(frame.notna(), None).to_json(orient="records"))


def test_validation_accepts_good_records():
    records = _records(3)
    assert check_records(records, SPEC, max_records=10) is records
    frame = coerce_features(pd.DataFrame(records), SPEC)  # the model's input, as it reads them
    assert list(frame.columns) == list(SPEC.features)
    assert len(frame) == 3


@pytest.mark.parametrize(
    ("mutate", "status", "message"),
    [
        (lambda r: r[0].pop("age"), 422, "field 'age' is required"),
        (lambda r: r[0].update(age="forty"), 422, "field 'age' must be a number or null, got str"),
        (lambda r: r[0].update(age=True), 422, "field 'age' must be a number or null, got bool"),
        (
            lambda r: r[0].update(purpose=3),
            422,
            "field 'purpose' must be a string or null, got int",
        ),
        (
            lambda r: r[0].update(has_cosigner="yes"),
            422,
            "field 'has_cosigner' must be true, false or null",
        ),
        (lambda r: r[0].update(application_date="yesterday"), 422, "must be an ISO 8601 date"),
        (lambda r: r[0].update(shoe_size=44), 422, "unexpected field 'shoe_size'"),
        (lambda r: r.__setitem__(0, [1, 2]), 422, "must be an object of feature values"),
    ],
)
def test_validation_names_the_bad_field(mutate, status, message):
    records = _records(2)
    mutate(records)
    with pytest.raises(InvalidRequest) as error:
        check_records(records, SPEC, max_records=10)
    assert error.value.status_code == status
    assert any(message in e["msg"] for e in error.value.errors)


def _file_records(n: int, seed: int = 11) -> list[dict]:
    """Records as the user's file has them: identifier and label columns included."""
    frame = generate_loans(n, seed=seed).astype(object)
    return json.loads(frame.where(frame.notna(), None).to_json(orient="records"))


def test_validation_accepts_the_columns_training_ignored_and_only_those():
    assert {"application_id", "defaulted"} <= SPEC.ignored_inputs
    records = _file_records(3)
    assert set(records[0]) - set(SPEC.features) == {"application_id", "defaulted"}
    assert check_records(records, SPEC, max_records=10) is records
    frame = coerce_features(pd.DataFrame(records), SPEC)  # the model's input: features only
    assert list(frame.columns) == list(SPEC.features)
    records[1]["applicant_name"] = "Ada"
    with pytest.raises(InvalidRequest) as error:
        check_records(records, SPEC, max_records=10)
    assert [e["loc"] for e in error.value.errors] == [["body", "records", 1, "applicant_name"]]
    assert "trained on no such column" in error.value.errors[0]["msg"]


def test_validation_limits_batch_size_and_rejects_empty():
    with pytest.raises(InvalidRequest) as error:
        check_records(_records(11), SPEC, max_records=10)
    assert error.value.status_code == 413
    with pytest.raises(InvalidRequest) as error:
        check_records([], SPEC, max_records=10)
    assert error.value.status_code == 422


def test_endpoint_config_is_the_serving_knobs_with_their_defaults():
    config = EndpointConfig()
    platform = load_settings()
    assert config.serving_settings("m", "sqlite:///x.db") == ServingSettings(
        model_name="m",
        tracking_uri="sqlite:///x.db",
        traffic_dir=str(platform.traffic_dir),
        feedback_db=str(platform.feedback_db),
    )
    tuned = EndpointConfig(traffic_profiling=False, max_batch_size=8, traffic_window_s=2)
    settings = tuned.serving_settings("m", "sqlite:///x.db")
    assert (settings.max_batch_size, settings.traffic_window_s) == (8, 2)
    assert settings.traffic_dir is None and settings.feedback_db is None
    # Every knob is in the Launchpad with the serving app's own default and description.
    fields = EndpointConfig.to_config_schema().as_field().config_type.fields
    for name, knob in ServingKnobs.model_fields.items():
        assert (fields[name].default_value, fields[name].description) == (
            knob.default,
            knob.description,
        )


def test_serving_package_imports_no_dagster():
    code = (
        "import sys, mlplatform.serving.app, mlplatform.serving.cluster, mlplatform.serving.model, "
        "mlplatform.serving.routes, mlplatform.serving.settings; "
        "leaked = sorted(m for m in sys.modules if m.split('.')[0].startswith('dagster')); "
        "print(leaked); sys.exit(bool(leaked))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def endpoint(serve_port: int, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A champion trained by the real assets, deployed on the session's Serve with tight limits."""
    platform, run_id = train_champion(tmp_path_factory.mktemp("serving-home"), seed=4)
    tracking_uri = platform.tracking_uri
    settings = ServingSettings(
        model_uri="models:/mlplatform@champion",
        tracking_uri=tracking_uri,
        max_records=MAX_RECORDS,
        max_body_bytes=MAX_BODY_BYTES,
    )
    cluster.deploy(
        settings,
        ray_address=None,
        host="127.0.0.1",
        port=serve_port,
        app_name="mlplatform",
        local_head=None,
    )
    url = f"http://127.0.0.1:{serve_port}"
    cluster.wait_until_serving(url, "1")
    return {"url": url, "tracking_uri": tracking_uri, "dagster_run_id": run_id}


def test_health_model_card_and_docs(endpoint):
    """The same answers through Ray Serve's ingress as from the app itself (test_routes)."""
    check_health_card_and_docs(
        lambda path: httpx.get(f"{endpoint['url']}{path}"), endpoint["dagster_run_id"]
    )


def test_predictions_match_the_registered_model(endpoint):
    records = _records(20)
    mlflow.set_tracking_uri(endpoint["tracking_uri"])
    expected = mlflow.pyfunc.load_model("models:/mlplatform/1").predict(pd.DataFrame(records))
    batch = httpx.post(f"{endpoint['url']}/predict", json={"records": records}).json()
    assert batch["model_version"] == "1"
    assert batch["predictions"] == expected["prediction"].tolist()
    assert batch["probabilities"] == pytest.approx(expected["probability"].tolist(), abs=1e-12)
    single = [
        httpx.post(f"{endpoint['url']}/predict", json={"records": [r]}).json() for r in records[:3]
    ]
    assert [s["probabilities"][0] for s in single] == pytest.approx(
        expected["probability"][:3].tolist(), abs=1e-12
    )
    assert len({s["request_id"] for s in single}) == 3


def test_records_as_the_file_has_them_are_predicted_like_the_registered_model(endpoint):
    records = _file_records(5, seed=12)  # with the dropped identifier and the label
    mlflow.set_tracking_uri(endpoint["tracking_uri"])
    expected = mlflow.pyfunc.load_model("models:/mlplatform/1").predict(pd.DataFrame(records))
    batch = httpx.post(f"{endpoint['url']}/predict", json={"records": records})
    assert batch.status_code == 200, batch.text
    assert batch.json()["predictions"] == expected["prediction"].tolist()
    single = httpx.post(f"{endpoint['url']}/predict", json={"records": records[:1]}).json()
    assert single["probabilities"][0] == pytest.approx(expected["probability"][0], abs=1e-12)


@pytest.mark.parametrize(("body", "status", "message"), BAD_BODIES)
def test_bad_requests_get_4xx_with_a_reason(endpoint, body, status, message):
    """The same answers through Ray Serve's ingress as from the app itself (test_routes)."""
    response = httpx.post(f"{endpoint['url']}/predict", **body_arguments(body))
    assert response.status_code == status
    assert message in json.dumps(response.json())


def test_wrongly_typed_and_extra_fields_are_named(endpoint):
    record = _records(1)[0] | {"age": "old", "nickname": "x"}
    response = httpx.post(f"{endpoint['url']}/predict", json={"records": [record]})
    assert response.status_code == 422
    locations = {tuple(e["loc"]) for e in response.json()["detail"]}
    assert locations == {("body", "records", 0, "age"), ("body", "records", 0, "nickname")}


def test_oversized_requests_get_413(endpoint):
    too_many = httpx.post(f"{endpoint['url']}/predict", json={"records": _records(MAX_RECORDS + 1)})
    assert too_many.status_code == 413
    assert f"limit of {MAX_RECORDS}" in too_many.text
    huge = httpx.post(f"{endpoint['url']}/predict", content=b"x" * (MAX_BODY_BYTES + 1))
    assert huge.status_code == 413
    assert "exceeds the limit" in huge.text


def test_concurrent_single_records_are_answered(endpoint):
    import concurrent.futures

    records = _records(40, seed=5)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = list(
            pool.map(
                lambda r: httpx.post(f"{endpoint['url']}/predict", json={"records": [r]}), records
            )
        )
    assert [r.status_code for r in responses] == [200] * 40


def test_only_model_registry_uris_are_served(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(ValueError, match="expected models:/"):
        resolve_model_version("runs:/abc/model", client=client)


def test_loopback_only(endpoint):
    """Nothing the embedded Ray and Serve started listens beyond 127.0.0.1."""
    listening = (
        Path("/proc/net/tcp").read_text().splitlines()[1:]
        + Path("/proc/net/tcp6").read_text().splitlines()[1:]
    )
    ray_ports = _ray_listening_ports()
    assert int(endpoint["url"].rsplit(":", 1)[1]) in ray_ports  # the scan sees Serve's own sockets
    exposed = []
    for line in listening:
        fields = line.split()
        local, state = fields[1], fields[3]
        address, port = local.split(":")
        if state == "0A" and int(port, 16) in ray_ports and address not in _LOOPBACK_HEX:
            exposed.append(int(port, 16))
    assert not exposed


_LOOPBACK_HEX = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


def _ray_listening_ports() -> set[int]:
    """Ports of sockets held by Ray processes (raylet, GCS, workers, Serve actors)."""
    import os

    inodes: set[str] = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"ray" not in cmdline:
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].split(":")[1], 16))
    return ports
