"""The endpoint's routes without Ray: the FastAPI app around a real model, through TestClient.

The champion is trained by the real assets into a real MLflow store; the app is the one every
replica serves (``build_api``), here in process. No Ray cluster is needed.
"""

import json
import math
from collections.abc import Callable

import httpx
import mlflow
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from mlplatform.demo.data import generate_loans
from mlplatform.monitoring.feedback import FeedbackStore, PredictionRecord
from mlplatform.serving.model import ServedModel, load_served_model
from mlplatform.serving.routes import answer_singles, build_api
from mlplatform.serving.served import ServedRelease, SingleRequest
from mlplatform.serving.settings import ServingKnobs
from mlplatform_tests.support import train_champion

MAX_RECORDS = 50
MAX_BODY_BYTES = 64 * 1024
LIMITS = ServingKnobs(max_records=MAX_RECORDS, max_body_bytes=MAX_BODY_BYTES)


@pytest.fixture(scope="module")
def champion(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A champion trained and registered by the real assets, loaded as a replica loads it."""
    home = tmp_path_factory.mktemp("routes-home")
    platform, run_id = train_champion(home, seed=4)
    model = load_served_model("models:/mlplatform@champion", platform.tracking_uri)
    return {
        "model": model,
        "tracking_uri": platform.tracking_uri,
        "dagster_run_id": run_id,
        "feedback_db": home / "feedback.sqlite",
    }


@pytest.fixture
def client(champion: dict) -> TestClient:
    """The routes with the prediction log; server errors come back as 500s, not exceptions."""
    api = build_api(champion["model"], LIMITS, feedback=FeedbackStore(champion["feedback_db"]))
    return TestClient(api, raise_server_exceptions=False)


def _records(model: ServedModel, n: int, seed: int = 11, file_columns: bool = False) -> list[dict]:
    """Demo loans as JSON records: the model's features, or every column of the user's file."""
    frame = generate_loans(n, seed=seed)
    if not file_columns:
        frame = frame[list(model.spec.features)]
    frame = frame.astype(object)
    return json.loads(frame.where(frame.notna(), None).to_json(orient="records"))


def _registered_predictions(champion: dict, records: list[dict]) -> pd.DataFrame:
    """What the registered model itself predicts (MLflow's pyfunc, not the serving fast path)."""
    mlflow.set_tracking_uri(champion["tracking_uri"])
    return mlflow.pyfunc.load_model("models:/mlplatform/1").predict(pd.DataFrame(records))


def check_health_card_and_docs(
    get: Callable[[str], httpx.Response], dagster_run_id: str, feedback: dict | None = None
) -> None:
    """The read-only routes of version 1 of a champion trained by ``dagster_run_id``.

    Args:
        get: ``GET`` of a path of the app (in process, or over HTTP through Ray Serve).
        dagster_run_id: the run that trained the champion.
        feedback: the feedback counters ``/healthz`` reports (``None``: feedback not enabled).

    """
    health = get("/healthz").json()
    assert isinstance(health.pop("pid"), int)  # the answering replica's process
    assert health == {
        "status": "ok",
        "model_name": "mlplatform",
        "model_version": "1",
        "release": {
            "champion": "1",
            "challenger": None,
            "stage": None,
            "canary_share": 0.0,
            "rollout_id": None,
        },
        "traffic": None,  # served without traffic profiling
        "versions": [{"version": "1", "role": "champion", "traffic": None}],
        "shadow": {"scored_requests": 0, "failed_records": 0, "dropped_requests": 0},
        "feedback": feedback,
    }
    card = get("/model").json()
    assert card["model_uri"] == "models:/mlplatform/1"  # the alias was pinned to its version
    assert card["dagster_run_id"] == dagster_run_id
    assert card["mlflow_run_id"]
    assert len(card["data_version"]) == 16
    assert 0.5 < card["metrics"]["test_roc_auc"] <= 1
    assert card["features"]["purpose"] == "categorical"
    assert set(card["example_record"]) == set(card["features"])
    assert card["uptime_s"] >= 0
    model_card = get("/model/card")
    assert model_card.status_code == 200
    assert model_card.headers["content-type"].startswith("text/markdown")
    assert model_card.text.startswith("# Model card: mlplatform v1")
    assert dagster_run_id in model_card.text
    openapi = get("/openapi.json").json()
    assert "records" in json.dumps(openapi["paths"]["/predict"])
    assert set(openapi["paths"]) == {"/predict", "/feedback", "/healthz", "/model", "/model/card"}
    assert get("/docs").status_code == 200


def test_health_model_card_and_docs(client, champion):
    check_health_card_and_docs(
        client.get, champion["dagster_run_id"], feedback={"failed_writes": 0}
    )


def test_predictions_match_the_registered_model(client, champion):
    records = _records(champion["model"], 20)
    expected = _registered_predictions(champion, records)
    batch = client.post("/predict", json={"records": records})
    assert batch.status_code == 200
    assert batch.headers["content-type"] == "application/json"
    body = batch.json()
    assert set(body) == {
        "request_id",
        "model_name",
        "model_version",
        "predictions",
        "probabilities",
    }
    assert (body["model_name"], body["model_version"]) == ("mlplatform", "1")
    assert body["predictions"] == expected["prediction"].tolist()
    assert body["probabilities"] == pytest.approx(expected["probability"].tolist(), abs=1e-12)
    single = [client.post("/predict", json={"records": [r]}).json() for r in records[:3]]
    assert [s["predictions"][0] for s in single] == expected["prediction"][:3].tolist()
    assert [s["probabilities"][0] for s in single] == pytest.approx(
        expected["probability"][:3].tolist(), abs=1e-12
    )
    assert len({s["request_id"] for s in single} | {body["request_id"]}) == 4


def test_records_as_the_file_has_them_are_predicted_like_the_registered_model(client, champion):
    records = _records(champion["model"], 5, seed=12, file_columns=True)  # id and label too
    expected = _registered_predictions(champion, records)
    batch = client.post("/predict", json={"records": records})
    assert batch.status_code == 200, batch.text
    assert batch.json()["predictions"] == expected["prediction"].tolist()


def test_single_records_go_through_the_given_batcher_and_batches_do_not(champion):
    model = champion["model"]
    batched: list[dict] = []

    async def batcher(request: SingleRequest) -> dict:
        batched.append(request.record)
        return answer_singles(ServedRelease.of(model), [request])[0]

    client = TestClient(build_api(model, LIMITS, predict_single=batcher))
    records = _records(model, 3, seed=13)
    single = client.post("/predict", json={"records": records[:1]})
    assert single.status_code == 200
    assert batched == records[:1]
    assert client.post("/predict", json={"records": records}).status_code == 200
    assert batched == records[:1]


BAD_BODIES = [
    ({"records": [{"age": 30}]}, 422, "is required"),
    ({"records": []}, 422, "at least one record"),
    ({"rows": []}, 422, "body must be an object"),
    ({"records": [], "debug": True}, 422, "unexpected field 'debug'"),
    ({"records": "all"}, 422, "must be a list"),
    ([1, 2], 422, "body must be an object"),
    (b"null", 422, "body must be an object"),
    ({"records": [None]}, 422, "must be an object of feature values"),
    (b"{not json", 400, "not valid JSON"),
    (b"\xff\xfe", 400, "not valid JSON"),
    (b"", 400, "not valid JSON"),
]
"""Malformed ``POST /predict`` bodies (JSON values, or raw bytes), their status and message."""


def body_arguments(body: object) -> dict:
    """The request arguments (httpx's, and TestClient's) that post ``body`` as it is given."""
    if isinstance(body, bytes):
        return {"content": body, "headers": {"content-type": "application/json"}}
    return {"json": body}


@pytest.mark.parametrize(("body", "status", "message"), BAD_BODIES)
def test_bad_requests_get_4xx_with_a_reason(client, body, status, message):
    response = client.post("/predict", **body_arguments(body))
    assert response.status_code == status
    assert message in json.dumps(response.json())


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("age", "forty", "field 'age' must be a number or null, got str"),
        ("age", True, "field 'age' must be a number or null, got bool"),
        ("age", [30], "field 'age' must be a number or null, got list"),
        ("purpose", 3, "field 'purpose' must be a string or null, got int"),
        ("purpose", {"a": 1}, "field 'purpose' must be a string or null, got dict"),
        ("has_cosigner", "yes", "field 'has_cosigner' must be true, false or null"),
        ("application_date", "yesterday", "must be an ISO 8601 date"),
        ("application_date", 20250601, "field 'application_date' must be a string or null"),
    ],
)
def test_wrongly_typed_fields_are_named(client, champion, field, value, message):
    record = _records(champion["model"], 1)[0] | {field: value}
    response = client.post("/predict", json={"records": [record]})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert [e["loc"] for e in detail] == [["body", "records", 0, field]]
    assert message in detail[0]["msg"]


def test_missing_and_extra_fields_are_named_in_every_record(client, champion):
    records = _records(champion["model"], 3)
    del records[0]["age"]
    records[2]["nickname"] = "x"
    response = client.post("/predict", json={"records": records})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert {tuple(e["loc"]) for e in detail} == {
        ("body", "records", 0, "age"),
        ("body", "records", 2, "nickname"),
    }
    assert {e["type"] for e in detail} == {"missing", "extra_forbidden"}


def test_non_finite_numbers_are_refused_not_a_server_error(client, champion):
    record = _records(champion["model"], 1)[0]
    body = json.dumps({"records": [record]}).replace(
        f'"age": {json.dumps(record["age"])}', '"age": 1e400'
    )
    assert "1e400" in body
    response = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert "finite" in response.text
    nan = client.post(
        "/predict",
        content=body.replace("1e400", "NaN"),
        headers={"content-type": "application/json"},
    )
    assert nan.status_code == 200  # NaN is JSON's missing number: imputed, as in training
    assert math.isfinite(nan.json()["probabilities"][0])


def test_oversized_requests_get_413(client, champion):
    too_many = client.post(
        "/predict", json={"records": _records(champion["model"], MAX_RECORDS + 1)}
    )
    assert too_many.status_code == 413
    assert f"limit of {MAX_RECORDS}" in too_many.text
    huge = client.post("/predict", content=b"x" * (MAX_BODY_BYTES + 1))
    assert huge.status_code == 413
    assert "exceeds the limit" in huge.text
    # Without a declared length (chunked), the body is measured once read.
    chunked = client.post("/predict", content=iter([b"x" * (MAX_BODY_BYTES + 1)]))
    assert chunked.status_code == 413
    assert "exceeds the limit" in chunked.text
    feedback = client.post("/feedback", content=b"x" * (MAX_BODY_BYTES + 1))
    assert feedback.status_code == 413


def test_feedback_joins_labels_to_logged_predictions(client, champion):
    records = _records(champion["model"], 2, seed=14)
    answer = client.post("/predict", json={"records": records}).json()
    request_id = answer["request_id"]
    # What the replica's traffic recorder logs for this answer.
    store = FeedbackStore(champion["feedback_db"])
    store.log_predictions(
        PredictionRecord(request_id, i, "mlplatform", "1", prediction, probability, 0.0)
        for i, (prediction, probability) in enumerate(
            zip(answer["predictions"], answer["probabilities"], strict=True)
        )
    )
    labels = [
        {"request_id": request_id, "index": 1, "label": 1},
        {"request_id": request_id, "label": 0},  # index 0 by default
        {"request_id": request_id, "index": 5, "label": 1},
        {"request_id": "nope", "label": 1},
    ]
    response = client.post("/feedback", json={"labels": labels})
    assert response.status_code == 200
    assert response.json() == {
        "matched": 2,
        "unknown": [{"request_id": request_id, "index": 5}, {"request_id": "nope", "index": 0}],
    }
    labelled = store.labelled().sort_values("index")
    assert labelled[["request_id", "index", "label"]].to_dict("records") == [
        {"request_id": request_id, "index": 0, "label": 0},
        {"request_id": request_id, "index": 1, "label": 1},
    ]


def test_feedback_rejects_malformed_labels(client):
    bad = client.post("/feedback", content=b"{")
    assert bad.status_code == 400
    missing = client.post("/feedback", json={"labels": [{"index": 0}]})
    assert missing.status_code == 422
    assert missing.json()["detail"][0]["loc"][:3] == ["body", "labels", 0]
    empty = client.post("/feedback", json={"labels": []})
    assert empty.status_code == 422
    not_a_label = client.post("/feedback", json={"labels": [{"request_id": "a", "label": [1]}]})
    assert not_a_label.status_code == 422
    assert "label" in not_a_label.text


def test_feedback_is_404_when_not_enabled(champion):
    client = TestClient(build_api(champion["model"], LIMITS))
    response = client.post("/feedback", json={"labels": [{"request_id": "a", "label": 1}]})
    assert response.status_code == 404
    assert response.json()["detail"][0]["msg"] == "feedback is not enabled"
