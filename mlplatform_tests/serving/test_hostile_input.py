"""Hostile input gets a 4xx naming the problem, never a 500, with bounded memory.

Numbers no float holds, date strings of any length, feedback indices and labels that can never
match, too many labels, a full disk under the prediction log, and a record the model cannot score
sent together with innocent ones. The routes run in process (TestClient) around a real champion;
the micro-batch is also checked on a live Ray Serve endpoint.
"""

import concurrent.futures
import dataclasses
import json
import pickle
import sys
from collections.abc import Iterator

import httpx
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from lightgbm import LGBMClassifier

from mlplatform.demo.data import generate_loans
from mlplatform.model import pipeline
from mlplatform.model.fast_path import TreeRecordsPredictor
from mlplatform.model.pipeline import build_preprocessor, make_model_pipeline, parse_iso_datetime
from mlplatform.model.pyfunc import TabularModel
from mlplatform.model.spec import FeatureSpec
from mlplatform.model.training import example_record
from mlplatform.monitoring.feedback import FeedbackStore, FeedbackUnavailable, PredictionRecord
from mlplatform.serving.model import ServedModel, load_served_model
from mlplatform.serving.routes import answer_singles, build_api
from mlplatform.serving.served import ServedRelease, SingleRequest
from mlplatform.serving.settings import ServingKnobs, ServingSettings
from mlplatform.serving.validation import InvalidRequest, check_labels, check_records
from mlplatform_tests.support import (
    deployed,
    loan_records,
    report_figure,
    small_disk,
    train_champion,
)

LIMITS = ServingKnobs(max_records=50, max_body_bytes=64 * 1024, max_feedback_labels=100)
HUGE = 10**400
"""A JSON integer of 401 digits: valid JSON, beyond any float (it used to overflow in scoring)."""


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> ServedModel:
    """A binary champion (classes 0 and 1) trained by the real assets, loaded as a replica does."""
    platform, _ = train_champion(tmp_path_factory.mktemp("hostile-home"), seed=4)
    return load_served_model("models:/mlplatform@champion", platform.tracking_uri)


def with_lightgbm(served: ServedModel) -> ServedModel:
    """``served`` with a LightGBM model on its spec instead, scored by the fast path.

    The demo's 1,000 rows make a linear champion (scored through its pipeline and pandas); the
    tree models of larger data are scored straight from the records: both paths are checked.
    """
    frame = generate_loans(1000, seed=9)
    estimator = LGBMClassifier(n_estimators=20, verbose=-1)
    fitted = make_model_pipeline(
        served.spec, build_preprocessor(served.spec, for_trees=True), estimator
    ).fit(frame, frame[served.spec.target])
    fast_path = TreeRecordsPredictor.from_pipeline(fitted, served.spec)
    assert fast_path is not None
    return dataclasses.replace(served, model=TabularModel(fitted, served.spec), fast_path=fast_path)


@pytest.fixture(scope="module")
def tree_model(model: ServedModel) -> ServedModel:
    """The champion's spec and card with a LightGBM model, scored by the fast path."""
    return with_lightgbm(model)


@pytest.fixture
def store(tmp_path) -> FeedbackStore:
    """An empty prediction log."""
    return FeedbackStore(tmp_path / "feedback.sqlite")


@pytest.fixture
def client(model: ServedModel, store: FeedbackStore) -> TestClient:
    """The routes with the prediction log; a server error comes back as a 500."""
    return TestClient(build_api(model, LIMITS, feedback=store), raise_server_exceptions=False)


def _post_raw(client: TestClient, path: str, body: str) -> httpx.Response:
    return client.post(path, content=body, headers={"content-type": "application/json"})


# --- numbers --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [HUGE, -HUGE, 10**309])
@pytest.mark.parametrize("n_records", [1, 3])
def test_integers_beyond_a_float_are_a_422_naming_the_field(client, model, value, n_records):
    records = loan_records(n_records, seed=11)
    records[-1]["income"] = value
    response = client.post("/predict", json={"records": records})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert [e["loc"] for e in detail] == [["body", "records", n_records - 1, "income"]]
    assert "field 'income' must be a finite number" in detail[0]["msg"]
    assert "64-bit float" in detail[0]["msg"]
    assert len(response.content) < 1000  # the number is not echoed back


def test_the_largest_integer_a_float_holds_is_accepted(model):
    record = loan_records(1, seed=11)[0] | {"income": int(sys.float_info.max)}
    assert check_records([record], model.spec, 10) == [record]
    with pytest.raises(InvalidRequest, match="64-bit float"):
        check_records([record | {"income": int(sys.float_info.max) + 2**971}], model.spec, 10)


@pytest.mark.parametrize("literal", ["1e400", "-1e400", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_a_422_naming_the_field(client, model, literal):
    record = loan_records(1, seed=11)[0] | {"age": "PLACEHOLDER"}
    body = json.dumps({"records": [record]}).replace('"PLACEHOLDER"', literal)
    response = _post_raw(client, "/predict", body)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "records", 0, "age"]
    assert "finite" in response.json()["detail"][0]["msg"]


# --- a record the model cannot score fails its own request only ------------------------------


@pytest.mark.parametrize("scored_by", ["pipeline", "fast path"])
def test_a_record_that_cannot_be_scored_fails_alone_in_its_micro_batch(
    model, tree_model, scored_by
):
    """Unvalidated on purpose: what a micro-batch does if a record reaches the model anyway."""
    model = tree_model if scored_by == "fast path" else model
    assert (model.fast_path is not None) == (scored_by == "fast path")
    good = loan_records(4, seed=21)
    hostile = good[1] | {"income": HUGE}
    answers = answer_singles(
        ServedRelease.of(model), _singles([good[0], hostile, good[2], good[3]])
    )
    assert len(answers) == 4
    refused = answers[1]
    assert isinstance(refused, InvalidRequest) and refused.status_code == 422
    assert refused.errors[0]["loc"] == ["body", "records", 0]
    assert "OverflowError" in refused.errors[0]["msg"]
    alone = [
        answer_singles(ServedRelease.of(model), _singles([record]))[0]
        for record in (good[0], good[2], good[3])
    ]
    innocent = [answers[0], answers[2], answers[3]]
    assert [a["predictions"] for a in innocent] == [a["predictions"] for a in alone]
    assert [a["probabilities"] for a in innocent] == [a["probabilities"] for a in alone]
    assert len({a["request_id"] for a in innocent}) == 3


def _singles(records: list[dict]) -> list[SingleRequest]:
    """One-record requests, each with its own id and key."""
    return [
        SingleRequest(record, f"request-{i}", f"request-{i}") for i, record in enumerate(records)
    ]


def unscorable(model: ServedModel) -> dict:
    """A valid record the linear champion cannot score: its scaling overflows to infinity."""
    assert model.fast_path is None, "the demo champion of seed 4 is expected to be linear"
    return loan_records(1, seed=22)[0] | {"delinquencies_2y": -sys.float_info.max}


@pytest.mark.parametrize("n_records", [1, 3])
def test_a_valid_record_the_model_cannot_score_is_a_422(client, model, n_records):
    records = [*loan_records(n_records - 1, seed=23), unscorable(model)]
    assert check_records(records, model.spec, 10) == records
    response = client.post("/predict", json={"records": records})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail[0]["loc"] == ["body", "records", 0] if n_records == 1 else ["body", "records"]
    assert (
        "the model cannot score these values (ValueError: Input X contains infinity"
        in (detail[0]["msg"])
    )


def test_an_error_a_batcher_returns_is_the_answer_of_its_request_only(model):
    """The route raises a returned error for its own request (Ray's batcher would raise it for
    every request of the batch)."""

    async def batcher(request: SingleRequest) -> dict | Exception:
        hostile = request._replace(record=request.record | {"income": HUGE})
        return answer_singles(ServedRelease.of(model), [hostile])[0]

    client = TestClient(build_api(model, LIMITS, predict_single=batcher))
    response = client.post("/predict", json={"records": loan_records(1, seed=11)})
    assert response.status_code == 422
    assert "cannot score" in response.json()["detail"][0]["msg"]


# --- dates ----------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [65, 1_000, 60_000])
def test_date_strings_longer_than_any_date_are_refused_at_once(client, model, length):
    value = "2025-06-01" + " " * (length - 10)  # pandas would read it, in time growing with length
    record = loan_records(1, seed=11)[0] | {"application_date": value}
    response = client.post("/predict", json={"records": [record]})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail[0]["loc"] == ["body", "records", 0, "application_date"]
    assert f"a string of {length} characters" in detail[0]["msg"]
    assert len(response.content) < 1000


def test_only_short_strings_enter_the_date_cache():
    cache = pipeline._parse_iso_datetime  # the cache behind parse_iso_datetime
    before = cache.cache_info().currsize
    for n in range(200):
        assert parse_iso_datetime(f"2025-06-01T10:00:00{' ' * 60}{n}") is None
    assert cache.cache_info().currsize == before
    assert parse_iso_datetime("1999-12-31T23:59:58") is not None  # a date is still cached
    assert cache.cache_info().currsize == before + 1


# --- the example record of GET /model ----------------------------------------------------------


def test_the_example_record_is_typical_values_and_no_row_of_the_data(client, model):
    example = client.get("/model").json()["example_record"]
    assert list(example) == list(model.spec.features)
    training = generate_loans(1000, seed=4)[list(model.spec.features)]  # the champion's data
    shared = (training.astype(object) == pd.Series(example, dtype=object)).sum(axis=1)
    assert shared.max() < len(example) / 2  # no row shares even half of its values
    assert 0.0 < example["income"] < 1e6 and example["income"] == float(f"{example['income']:.3g}")
    assert example["purpose"] in model.spec.categories["purpose"]
    assert isinstance(example["has_cosigner"], bool)
    # The deployment's smoke test posts it as it is.
    assert client.post("/predict", json={"records": [example]}).status_code == 200


def test_typical_values_per_column_kind():
    frame = pd.DataFrame(
        {
            "amount": [1234.5678, 10.0, 99_999.0, None, 250.0],
            "count": [3, 1, 4, 1, 5],
            "flag": ["true", "false", "true", "true", None],
            "when": ["2025-01-01", "2025-01-03", "2025-01-05", "2025-01-07", "2025-01-09"],
            "colour": ["red", "blue", "red", None, "green"],
            "nickname": ["ann", "bob", "cy", "dee", "ed"],  # every value singles out its row
        }
    )
    assert example_record(frame) == {
        "amount": 742.0,  # the median, 742.2839, to 3 significant digits
        "count": 3,
        "flag": True,
        "when": "2025-01-05",
        "colour": "red",
        "nickname": None,
    }


def test_a_model_registered_with_a_training_row_never_shows_it(model):
    old = TabularModel(model.model.pipeline, model.spec)
    row = loan_records(1, seed=5)[0]
    del old.__dict__["typical_record"]
    old.__dict__["example_record"] = row  # what models stored before
    loaded = pickle.loads(pickle.dumps(old))
    example = loaded.example_record
    assert list(example) == list(model.spec.features)
    assert all(example[name] != row[name] for name in ("age", "income", "application_date"))
    assert example["purpose"] == model.spec.categories["purpose"][0]
    assert check_records([example], model.spec, 1) == [example]


# --- feedback -------------------------------------------------------------------------------


def _logged(store: FeedbackStore, request_id: str, n: int) -> None:
    """What the replica's recorder logs for an answer of ``n`` records."""
    store.log_predictions(
        PredictionRecord(request_id, i, "mlplatform", "1", 0, 0.2, 0.0) for i in range(n)
    )


@pytest.mark.parametrize(
    ("item", "loc", "message"),
    [
        ({"index": 10**30, "label": 1}, "index", "below 50, the most records a request may have"),
        ({"index": 50, "label": 1}, "index", "below 50"),
        ({"index": -1, "label": 1}, "index", "greater than or equal to 0"),
        ({"label": 10**30}, "label", "must be one of the model's classes (0, 1), got int"),
        ({"label": HUGE}, "label", "must be one of the model's classes"),
        ({"label": "1"}, "label", "got str"),  # a string never equals the class 1
        ({"label": 2}, "label", "must be one of the model's classes"),
        ({"label": [1]}, "label", "got list"),
        ({"label": None}, "label", "got NoneType"),
    ],
)
def test_feedback_that_can_never_match_is_a_422_naming_the_field(client, store, item, loc, message):
    _logged(store, "r", 1)
    labels = [{"request_id": "r", "label": 0}, {"request_id": "r", **item}]
    response = client.post("/feedback", json={"labels": labels})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail[0]["loc"] == ["body", "labels", 1, loc]
    assert message in detail[0]["msg"]
    assert store.labelled().empty  # the good label of the same request is not stored either


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("2.5", "must be a number (the true value), got str"),
        (True, "got bool"),
        (None, "got NoneType"),
        (float("nan"), "got NaN"),
        (float("inf"), "must be a finite number"),
        (HUGE, "64-bit float"),
    ],
)
def test_regression_labels_are_finite_numbers(label, message):
    spec = FeatureSpec(features={"x": "numeric"}, target="y", classes=(), task="regression")
    check_labels([{"index": 0, "label": 2.5}, {"index": 1, "label": -3}], spec, 10)
    with pytest.raises(InvalidRequest) as error:
        check_labels([{"index": 0, "label": label}], spec, 10)
    assert error.value.errors[0]["loc"] == ["body", "labels", 0, "label"]
    assert message in error.value.errors[0]["msg"]


def test_multiclass_labels_are_the_models_classes():
    classes = ("a", "b", "c")
    spec = FeatureSpec({"x": "numeric"}, target="y", classes=classes, task="multiclass")
    check_labels([{"index": 0, "label": "c"}], spec, 10)
    with pytest.raises(InvalidRequest, match=r"classes \('a', 'b', 'c'\), got str"):
        check_labels([{"index": 0, "label": "d"}], spec, 10)


def test_feedback_at_the_bounds_is_accepted(client, store):
    _logged(store, "r", 50)
    labels = [
        {"request_id": "r", "index": 49, "label": 1},
        {"request_id": "r", "index": 0, "label": 1.0},  # 1.0 == 1, as the live metrics compare
        {"request_id": "r", "index": 1, "label": True},
        {"request_id": "other", "index": 49, "label": 0},  # could be logged later: unknown
    ]
    response = client.post("/feedback", json={"labels": labels})
    assert response.status_code == 200
    assert response.json() == {"matched": 3, "unknown": [{"request_id": "other", "index": 49}]}


def test_too_many_labels_are_a_413_naming_the_limit(client, store):
    _logged(store, "r", 1)
    labels = [{"request_id": "r", "label": 1}] * 101
    response = client.post("/feedback", json={"labels": labels})
    assert response.status_code == 413
    assert response.json()["detail"] == [
        {
            "loc": ["body", "labels"],
            "msg": "101 labels exceed the limit of 100 per request",
            "type": "too_long",
        }
    ]
    assert store.labelled().empty
    assert client.post("/feedback", json={"labels": labels[:100]}).status_code == 200


def test_two_hundred_thousand_labels_are_refused_by_default(model, store):
    client = TestClient(build_api(model, ServingKnobs(), feedback=store))
    labels = [{"request_id": "r", "label": 1}] * 200_000
    response = client.post("/feedback", json={"labels": labels})
    assert response.status_code == 413
    assert "200000 labels exceed the limit of 10000" in response.text


def test_the_store_refuses_what_sqlite_cannot_hold_and_stores_big_labels_as_floats(store):
    _logged(store, "r", 1)
    with pytest.raises(ValueError, match=r"labels\[0\].index must be an integer from 0"):
        store.add_labels([{"request_id": "r", "index": 10**30, "label": 1}])
    with pytest.raises(ValueError, match="got an integer of 401 digits"):
        store.add_labels([{"request_id": "r", "label": HUGE}])
    assert store.add_labels([{"request_id": "r", "label": 10**30}]).matched == 1
    assert store.labelled()["label"].tolist() == [1e30]


# --- a full disk ------------------------------------------------------------------------------


@pytest.mark.faults
def test_a_full_disk_makes_feedback_a_503_and_predictions_go_on(model, tmp_path, record_property):
    with small_disk(tmp_path / "disk") as disk:
        store = FeedbackStore(disk.directory / "feedback.sqlite")
        _logged(store, "r", 3)
        client = TestClient(build_api(model, LIMITS, feedback=store), raise_server_exceptions=False)
        labels = [{"request_id": "r", "index": i, "label": 1} for i in range(3)]
        disk.fill()

        refused = client.post("/feedback", json={"labels": labels})
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "10"
        detail = refused.json()["detail"]
        assert detail[0]["loc"] == ["body", "labels"]
        assert "cannot be stored now" in detail[0]["msg"]
        assert "retry later" in detail[0]["msg"]
        assert client.get("/healthz").json()["feedback"] == {"failed_writes": 1}
        for n_records in (1, 3):
            answer = client.post("/predict", json={"records": loan_records(n_records, seed=11)})
            assert answer.status_code == 200

        disk.free()
        assert store.labelled().empty  # nothing half-written
        accepted = client.post("/feedback", json={"labels": labels})
        assert accepted.status_code == 200
        assert accepted.json() == {"matched": 3, "unknown": []}
        assert client.get("/healthz").json()["feedback"] == {"failed_writes": 1}
    report_figure(
        record_property,
        "disk_full_feedback",
        refused_503=1,
        predictions_answered=2,
        failed_writes=1,
    )


@pytest.mark.faults
def test_a_failed_write_is_rolled_back_whole_and_counted(tmp_path):
    with small_disk(tmp_path / "disk") as disk:
        store = FeedbackStore(disk.directory / "feedback.sqlite")
        _logged(store, "r", 1000)
        disk.fill()
        with pytest.raises(FeedbackUnavailable, match="nothing was stored"):
            store.add_labels([{"request_id": "r", "index": i, "label": 1} for i in range(1000)])
        with pytest.raises(FeedbackUnavailable):
            _logged(store, "s", 1000)
        assert store.failed_writes == 2
        disk.free()
        assert store.labelled().empty
        assert store.count() == 1000


# --- the live endpoint: Ray Serve's micro-batch -------------------------------------------------


@pytest.fixture(scope="module")
def live(serve_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A champion served on the session's Ray Serve under /hostile, single records batched."""
    platform, _ = train_champion(tmp_path_factory.mktemp("hostile-live-home"), seed=4)
    settings = ServingSettings(
        model_uri="models:/mlplatform@champion",
        tracking_uri=platform.tracking_uri,
        feedback_db=str(platform.feedback_db),
        batch_wait_timeout_s=0.05,  # single records sent together wait for each other
    )
    with deployed(settings, serve_port, "hostile") as url:
        yield url


def test_hostile_records_sent_with_innocent_ones_fail_alone_on_the_live_endpoint(live, model):
    innocent = loan_records(24, seed=31)
    refused = [  # by validation, before any batch
        innocent[0] | {"income": HUGE},
        innocent[0] | {"age": -HUGE},
        innocent[0] | {"application_date": "2025-06-01" + " " * 100},
    ]
    failing = unscorable(model)  # valid: it joins a micro-batch, and fails in the model
    alone = httpx.post(f"{live}/predict", json={"records": [failing]})
    assert alone.status_code == 422 and "cannot score" in alone.text
    posts = [[r] for r in innocent] + [[r] for r in refused] * 4 + [[failing]] * 8
    order = list(range(len(posts)))[::2] + list(range(len(posts)))[1::2]  # interleaved
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = dict(
            zip(
                order,
                pool.map(
                    lambda i: httpx.post(f"{live}/predict", json={"records": posts[i]}), order
                ),
                strict=True,
            )
        )
    statuses = [answers[i].status_code for i in range(len(posts))]
    assert statuses == [200] * len(innocent) + [422] * (12 + 8)
    batch = httpx.post(f"{live}/predict", json={"records": innocent}).json()
    assert [answers[i].json()["predictions"][0] for i in range(24)] == batch["predictions"]
    health = httpx.get(f"{live}/healthz").json()
    assert health["feedback"] == {"failed_writes": 0}
    feedback = httpx.post(
        f"{live}/feedback", json={"labels": [{"request_id": "x", "index": 10**30, "label": 10**30}]}
    )
    assert feedback.status_code == 422
    assert {tuple(e["loc"][-1:]) for e in feedback.json()["detail"]} == {("index",), ("label",)}
