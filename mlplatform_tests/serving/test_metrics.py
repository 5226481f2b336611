"""The endpoint's metrics without Ray: what the routes count, per version and role.

The routes are the app every replica serves (``build_api``) around a real champion, through
TestClient; the counts are read where the replica hands them to Ray (``EndpointMetrics.take``).
That Ray exports them and Prometheus reads them back is ``test_prometheus.py``'s part.
"""

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import whylogs as why
from fastapi.testclient import TestClient

from mlplatform.demo.data import generate_loans
from mlplatform.monitoring.drift import DriftThresholds, compare_profiles
from mlplatform.monitoring.drift_summary import (
    DriftSummary,
    FeatureDrift,
    drift_summary_path,
    read_drift_summary,
    write_drift_summary,
)
from mlplatform.serving.metrics import (
    SCORE_BUCKETS,
    VALUE_BUCKETS,
    EndpointMetrics,
    bucket_counts,
    scores_of,
)
from mlplatform.serving.model import load_served_model
from mlplatform.serving.release import Release
from mlplatform.serving.routes import build_api
from mlplatform.serving.served import ReleaseMember, ServedRelease
from mlplatform.serving.settings import ServingKnobs
from mlplatform_tests.support import train_champion


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    """A champion trained and registered by the real assets, loaded as a replica loads it."""
    platform, _ = train_champion(tmp_path_factory.mktemp("metrics-home"), seed=5)
    return load_served_model("models:/mlplatform@champion", platform.tracking_uri)


def _records(model, n: int, seed: int = 3) -> list[dict]:
    frame = generate_loans(n, seed=seed)[list(model.spec.features)].astype(object)
    return json.loads(frame.where(frame.notna(), None).to_json(orient="records"))


def test_bucket_counts_follow_prometheus_le_in_both_paths():
    bounds = (0.1, 0.5, 1.0)
    values = [0.1, 0.2, 0.5, 0.7, 1.0, 3.0, float("nan"), -1.0]
    # A value equal to a bound is in that bound's bucket; NaN is not counted.
    assert bucket_counts(values, bounds) == [2, 2, 2, 1]
    many = np.random.default_rng(0).normal(size=1000).tolist() + [0.5] * 7
    assert len(many) > 16  # the vectorised path
    one_by_one = [0] * 4
    for value in many:
        for i, count in enumerate(bucket_counts([value], bounds)):
            one_by_one[i] += count
    assert bucket_counts(many, bounds) == one_by_one and sum(one_by_one) == len(many)


def test_scores_are_probabilities_or_the_predicted_class_probability():
    assert scores_of([0.2, 0.9]) == [0.2, 0.9]
    assert scores_of([{"a": 0.1, "b": 0.7, "c": 0.2}]) == [0.7]
    assert scores_of([]) == []


def test_routes_count_requests_and_predictions_by_version_and_role(model):
    metrics = EndpointMetrics("mlplatform")  # never started: counts stay pending for take()
    served = ServedRelease(Release(champion="1"), ReleaseMember(model, "champion", metrics=metrics))
    client = TestClient(
        build_api(served, ServingKnobs(max_records=50), metrics=metrics),
        raise_server_exceptions=False,
    )
    records = _records(model, 30)

    singles = [client.post("/predict", json={"records": [record]}) for record in records[:5]]
    batch = client.post("/predict", json={"records": records[5:30]})
    refused = client.post("/predict", json={"records": [{"nope": 1}]})
    client.get("/healthz")  # not a prediction: not counted

    for answer in [*singles, batch]:
        assert answer.status_code == 200
        assert answer.headers["X-Model-Version"] == "1" == answer.json()["model_version"]
        assert answer.headers["X-Model-Role"] == "champion"
    assert refused.status_code == 422
    pending = metrics.take()
    assert pending.requests == {("1", "champion", 200): 6, ("1", "champion", 422): 1}
    assert len(pending.latencies) == 7
    assert all(version == "1" and seconds > 0 for version, _, seconds in pending.latencies)
    answered = [p for a in [*singles, batch] for p in a.json()["predictions"]]
    assert sum(pending.classes.values()) == 30
    assert {label: n for (_, _, label), n in pending.classes.items()} == {
        str(label): answered.count(label) for label in set(answered)
    }
    probabilities = [p for a in [*singles, batch] for p in a.json()["probabilities"]]
    assert pending.scores == {("1", "champion"): bucket_counts(probabilities, SCORE_BUCKETS)}
    assert pending.values == {}
    assert metrics.take().requests == {}  # taken once


def test_regression_predictions_are_a_value_histogram():
    metrics = EndpointMetrics("prices")
    metrics.observe_predictions("4", "canary", [-3.0, 0.0, 12.5, 12.5, 2e7], None)
    pending = metrics.take()
    assert pending.classes == {} and pending.scores == {}
    counts = pending.values[("4", "canary")]
    assert len(counts) == len(VALUE_BUCKETS) + 1 and sum(counts) == 5
    assert counts[VALUE_BUCKETS.index(0.0)] == 1 and counts[-1] == 1  # 0 in le="0"; 2e7 above


def test_flush_exports_release_traffic_and_drift_without_raising(tmp_path: Path):
    # Outside a replica Ray records nothing; every export path still runs, types and all.
    path = drift_summary_path(tmp_path, "mlplatform")
    summary = DriftSummary("1", time.time(), 500, (FeatureDrift("income", 0.31, True, "ks"),))
    write_drift_summary(tmp_path, "mlplatform", summary)
    metrics = EndpointMetrics("mlplatform", drift_file=path, drift_poll_s=0)
    metrics.set_release(Release(champion="1"))
    metrics.set_release(
        Release(champion="1", challenger="2", stage="canary", canary_share=0.1, rollout_id="v2-1")
    )
    metrics.set_release(Release(champion="1"))  # the challenger dropped: a rollback
    metrics.observe_request("2", "canary", 503, 0.01)
    metrics.observe_predictions("2", "canary", [1, 0], [0.9, 0.2])
    collected = []
    metrics.add_collector(lambda: collected.append(True))
    metrics.flush()
    assert collected == [True] and metrics.take().requests == {}
    assert read_drift_summary(path) == summary


def test_drift_summary_round_trips_a_real_comparison(tmp_path: Path, recorded_loans):
    frame, spec = recorded_loans
    reference = why.log(frame[list(spec.features)].iloc[:1000]).view()
    current = why.log(frame[list(spec.features)].iloc[1000:]).view()
    result = compare_profiles(reference, current, DriftThresholds())
    summary = DriftSummary.from_result(result, "3", now=123.0)
    write_drift_summary(tmp_path, "mlplatform", summary)

    read = read_drift_summary(drift_summary_path(tmp_path, "mlplatform"))
    assert read == summary and read.model_version == "3" and read.rows == 1000
    assert {f.feature for f in read.features} == {c.column for c in result.columns}
    for feature, column in zip(read.features, result.columns, strict=True):
        assert feature.drifted == column.drifted
        assert feature.effect is None or math.isclose(feature.effect, column.effect)
    assert read_drift_summary(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a drift summary"):
        read_drift_summary(tmp_path / "bad.json")
