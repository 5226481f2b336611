"""Binary, multiclass and regression: one strategy per task, and the graph end to end."""

import json
import math
from pathlib import Path

import dagster as dg
import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    f1_score,
    log_loss,
    mean_absolute_error,
    mean_squared_error,
    r2_score,
    recall_score,
    roc_auc_score,
)

from mlplatform.definitions import ASSETS
from mlplatform.demo.data import generate_loans
from mlplatform.model.spec import DataError, infer_feature_spec, infer_task
from mlplatform.resources import DataSource, MlflowTracking, RayServe
from mlplatform.tasks.metrics import bootstrap_indices
from mlplatform.tasks.strategies import strategy_for

BINARY, MULTICLASS, REGRESSION = (strategy_for(t) for t in ("binary", "multiclass", "regression"))
MULTICLASS_REPORT_ORDER = [
    "roc_auc",
    "log_loss",
    "accuracy",
    "macro_precision",
    "macro_recall",
    "macro_f1",
]
REGRESSION_REPORT_ORDER = ["rmse", "mae", "r2"]


def _loans_with(target: str, n_rows: int = 1500, seed: int = 5) -> pd.DataFrame:
    """Demo loans with a multiclass ``grade`` or a regression ``interest_rate`` target.

    Both depend on several features plus noise, so they are learnable but not leaked.
    """
    frame = generate_loans(n_rows=n_rows, seed=seed).drop(columns=["defaulted", "interest_rate"])
    # A stream of its own: the generator's seed would replay the draws behind the features.
    rng = np.random.default_rng([seed, 1])
    credit = frame["credit_score"].fillna(frame["credit_score"].median())
    burden = 0.02 * (750 - credit) + 0.08 * frame["debt_to_income"].fillna(20)
    if target == "grade":
        latent = burden + rng.normal(0, 0.8, len(frame))
        frame["grade"] = pd.qcut(latent, 3, labels=["A", "B", "C"]).astype(str)
    else:
        frame["interest_rate"] = (
            5 + burden + 1.5 * (frame["term_months"] == 60) + rng.normal(0, 1.0, len(frame))
        ).round(2)
    return frame


@pytest.mark.parametrize(
    ("values", "requested", "expected"),
    [
        (["no", "yes", "yes"], None, "binary"),
        ([0, 1, 1, 0], None, "binary"),
        (["A", "B", "C", "A"], None, "multiclass"),
        ([1, 2, 3, 4, 5, 3], None, "multiclass"),
        ([1.5, 2.25, 3.0, 9.75], None, "regression"),
        (list(range(30)), None, "regression"),
        ([1, 2, 3, 4, 5, 3], "regression", "regression"),
        ([0.0, 1.0, 1.0, 0.0], "binary", "binary"),
    ],
)
def test_infer_task_from_the_target(values, requested, expected):
    assert infer_task(pd.Series(values, name="y"), requested) == expected


@pytest.mark.parametrize(
    ("values", "requested", "message"),
    [
        (["a", "b", "c"], "binary", "binary classification needs exactly two"),
        (["a", "b", "c"], "regression", "not numeric"),
        ([1, 2, 2], "multiclass", "multiclass classification needs 3 to"),
        ([f"c{i}" for i in range(60)], None, "multiclass classification needs 3 to 50"),
        ([1.0, None, 2.0], None, "missing values"),
        ([1, 2, 3], "ranking", "unknown task"),
    ],
)
def test_infer_task_rejects_targets_that_cannot_support_the_task(values, requested, message):
    with pytest.raises(DataError, match=message):
        infer_task(pd.Series(values, name="y"), requested)


def test_feature_spec_records_the_task_and_classes():
    grades = infer_feature_spec(_loans_with("grade"), "grade")
    assert grades.task == "multiclass"
    assert grades.classes == ("A", "B", "C")
    rates = infer_feature_spec(_loans_with("interest_rate"), "interest_rate")
    assert rates.task == "regression"
    assert rates.classes == ()


def test_multiclass_metrics_equal_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    probability = rng.dirichlet([1, 1, 1], 300)
    probability[np.arange(300), labels] += 0.5
    probability /= probability.sum(axis=1, keepdims=True)
    metrics = MULTICLASS.metrics(labels, probability)
    predicted = probability.argmax(axis=1)
    assert metrics["roc_auc"] == pytest.approx(
        roc_auc_score(labels, probability, multi_class="ovr", average="macro")
    )
    assert metrics["log_loss"] == pytest.approx(log_loss(labels, probability))
    assert metrics["accuracy"] == pytest.approx(np.mean(predicted == labels))
    assert metrics["macro_f1"] == pytest.approx(f1_score(labels, predicted, average="macro"))
    # A class absent from the split: metrics over the classes present, never NaN or a zero.
    kept = labels < 2
    missing_class = MULTICLASS.metrics(labels[kept], probability[kept])
    assert missing_class["roc_auc"] == pytest.approx(
        np.mean([roc_auc_score(labels[kept] == k, probability[kept, k]) for k in (0, 1)])
    )
    assert missing_class["macro_recall"] == pytest.approx(
        recall_score(labels[kept], predicted[kept], labels=[0, 1], average="macro")
    )
    assert MULTICLASS.absent_classes(labels[kept], ["a", "b", "c"]) == ["c"]
    one_class = MULTICLASS.metrics(labels[labels == 0], probability[labels == 0])
    assert math.isnan(one_class["roc_auc"])


def test_regression_metrics_and_intervals_equal_sklearn_and_numpy():
    rng = np.random.default_rng(1)
    values = rng.normal(10, 3, 400)
    predicted = values + rng.normal(0, 1, 400)
    metrics = REGRESSION.metrics(values, predicted)
    assert metrics["rmse"] == pytest.approx(math.sqrt(mean_squared_error(values, predicted)))
    assert metrics["mae"] == pytest.approx(mean_absolute_error(values, predicted))
    assert metrics["r2"] == pytest.approx(r2_score(values, predicted))
    intervals = REGRESSION.bootstrap(values, predicted, n_resamples=200)
    assert all(i.low <= i.point <= i.high for i in intervals.values())
    # One resample recomputed by hand: the vectorised bootstrap equals sklearn on those rows.
    indices = bootstrap_indices(len(values), 200, 0)
    first = indices[0]
    resampled = REGRESSION.resampled_metrics(values, predicted, indices)
    assert resampled["r2"][0] == pytest.approx(r2_score(values[first], predicted[first]))


def test_paired_difference_of_a_model_with_itself_is_zero():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, 200)
    probability = rng.dirichlet([1, 1, 1], 200)
    difference = MULTICLASS.paired_difference(labels, probability, probability, n_resamples=50)
    assert all(i.point == i.low == i.high == 0 for i in difference.values())


@pytest.fixture
def task_resources(tmp_path: Path, serve_port: int, request) -> dict:
    target = request.param
    path = tmp_path / f"{target}.csv"
    _loans_with(target).to_csv(path, index=False)
    return {
        "data_source": DataSource(uri=str(path), target=target),
        "mlflow_tracking": MlflowTracking(),
        "ray_serve": RayServe(port=serve_port),
    }


def _report(result: dg.ExecuteInProcessResult) -> dict:
    path = result.asset_materializations_for_node("evaluation_report")[0].metadata["report_json"]
    return json.loads(Path(path.value).read_text())


def _served_and_expected(url: str, target: str, n_records: int) -> tuple[dict, pd.DataFrame]:
    """The endpoint's answer for fresh records, and the registered champion's own prediction."""
    records = json.loads(
        _loans_with(target, n_records, seed=9)
        .drop(columns=[target, "application_id"])
        .to_json(orient="records")
    )
    response = httpx.post(f"{url}/predict", json={"records": records}, timeout=30)
    assert response.status_code == 200, response.text
    model = mlflow.pyfunc.load_model("models:/mlplatform@champion")
    return response.json(), model.predict(pd.DataFrame(records))


@pytest.mark.parametrize("task_resources", ["grade"], indirect=True)
def test_multiclass_end_to_end(task_resources, instance):
    result = dg.materialize(ASSETS, resources=task_resources, instance=instance)
    assert result.success
    report = _report(result)
    assert report["task"] == "multiclass"
    assert list(report["challenger_metrics"]) == MULTICLASS_REPORT_ORDER
    assert report["challenger_metrics"]["roc_auc"] > 0.75
    assert report["gate"]["metric"] == "roc_auc"
    assert {"feature", "slice", "accuracy"} <= set(report["slices"][0])
    plots = result.asset_materializations_for_node("evaluation_report")[0].metadata["plots"]
    assert "confusion matrix" in plots.value and "feature importance" in plots.value

    endpoint = result.output_for_node("model_endpoint")
    body, expected = _served_and_expected(endpoint.url, "grade", 20)
    assert body["predictions"] == expected["prediction"].tolist()
    assert [sorted(p) for p in body["probabilities"]] == [["A", "B", "C"]] * 20
    assert [p["B"] for p in body["probabilities"]] == pytest.approx(
        expected["probability_B"].tolist()
    )
    assert all(math.isclose(sum(p.values()), 1.0) for p in body["probabilities"])
    assert all(
        max(p, key=p.get) == label
        for p, label in zip(body["probabilities"], body["predictions"], strict=True)
    )
    info = httpx.get(f"{endpoint.url}/model", timeout=30).json()
    assert info["task"] == "multiclass" and info["classes"] == ["A", "B", "C"]
    card = httpx.get(f"{endpoint.url}/model/card", timeout=30).text
    assert "multiclass classification of 'grade'" in card


@pytest.mark.parametrize("task_resources", ["interest_rate"], indirect=True)
def test_regression_end_to_end_with_a_champion_to_beat(task_resources, instance):
    first = dg.materialize(ASSETS, resources=task_resources, instance=instance)
    assert first.success
    report = _report(first)
    assert report["task"] == "regression"
    assert list(report["challenger_metrics"]) == REGRESSION_REPORT_ORDER
    assert report["challenger_metrics"]["r2"] > 0.5
    assert {"target_mean", "mae", "relative_mae"} <= set(report["slices"][0])

    endpoint = first.output_for_node("model_endpoint")
    body, expected = _served_and_expected(endpoint.url, "interest_rate", 10)
    assert body["predictions"] == pytest.approx(expected["prediction"].tolist())
    assert body["probabilities"] is None

    # The second run compares the new challenger with the champion on the paired interval of R2.
    second = dg.materialize(ASSETS, resources=task_resources, instance=instance)
    assert second.success
    gate = _report(second)["gate"]
    assert gate["metric"] == "r2" and gate["champion_score"] is not None
    assert "paired interval" in gate["reason"]
