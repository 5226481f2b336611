"""Binary, multiclass and regression: one strategy per task, and the graph end to end."""

import inspect
import io
import json
import math
from pathlib import Path

import dagster as dg
import httpx
import lightgbm
import matplotlib.image
import mlflow
import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import (
    f1_score,
    get_scorer,
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
from mlplatform.tasks.base import TaskStrategy
from mlplatform.tasks.binary import BinaryTask
from mlplatform.tasks.classification import ClassificationTask
from mlplatform.tasks.metrics import bootstrap_indices
from mlplatform.tasks.multiclass import MulticlassTask
from mlplatform.tasks.regression import RegressionTask
from mlplatform.tasks.strategies import TASKS, strategy_for

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
PNG_SIGNATURE = b"\x89PNG"


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


# ----------------------------------------------------------------------------------------------
# The strategies: one per task, each the whole interface
# ----------------------------------------------------------------------------------------------


def test_every_task_has_a_strategy_by_its_name():
    assert list(TASKS) == ["binary", "multiclass", "regression"]
    assert [type(strategy) for strategy in TASKS.values()] == [
        BinaryTask,
        MulticlassTask,
        RegressionTask,
    ]
    assert all(strategy_for(name) is strategy for name, strategy in TASKS.items())
    with pytest.raises(ValueError, match="task must be binary, multiclass or regression"):
        strategy_for("ranking")


@pytest.mark.parametrize("name", ["binary", "multiclass", "regression"])
def test_every_strategy_implements_the_whole_interface(name):
    strategy = strategy_for(name)
    assert not inspect.isabstract(type(strategy))
    # Every abstract member is implemented below the interface, not inherited from it.
    for member in TaskStrategy.__abstractmethods__:
        assert getattr(type(strategy), member) is not getattr(TaskStrategy, member), member
    if isinstance(strategy, ClassificationTask):
        assert type(strategy).predicted_classes is not ClassificationTask.predicted_classes
    # Every declared attribute is set, and the attributes agree with each other.
    for attribute in TaskStrategy.__annotations__:
        value = getattr(strategy, attribute)
        assert value is not None and value != "" and value != (), attribute
    assert strategy.name == name
    assert {strategy.selection_metric, strategy.gate_metric} <= set(strategy.metric_names)
    assert strategy.lower_is_better < set(strategy.metric_names)
    assert strategy.fairness_metric in strategy.slice_columns
    assert strategy.slice_columns[:3] == ("feature", "slice", "count")
    assert strategy.slice_columns[-1] == "small"
    get_scorer(strategy.permutation_scoring)  # a scorer scikit-learn knows


def test_each_task_has_its_own_defaults():
    defaults = {
        name: (
            s.selection_metric,
            s.gate_metric,
            s.gate_floor,
            s.fairness_metric,
            s.permutation_scoring,
            s.lightgbm_metric,
            s.linear_algorithm,
            s.has_classes,
            sorted(s.lower_is_better),
        )
        for name, s in TASKS.items()
    }
    assert defaults == {
        "binary": (
            "roc_auc",
            "roc_auc",
            0.6,
            "tpr",
            "roc_auc",
            "auc",
            "sklearn_logistic",
            True,
            ["brier", "log_loss"],
        ),
        "multiclass": (
            "log_loss",
            "roc_auc",
            0.6,
            "accuracy",
            "neg_log_loss",
            "multi_logloss",
            "sklearn_logistic",
            True,
            ["log_loss"],
        ),
        "regression": (
            "rmse",
            "r2",
            0.0,
            "relative_mae",
            "r2",
            "rmse",
            "sklearn_ridge",
            False,
            ["mae", "rmse"],
        ),
    }


def test_estimators_per_task():
    params = {"n_estimators": 7, "verbose": -1}
    assert type(BINARY.lightgbm_estimator(params)) is lightgbm.LGBMClassifier
    assert type(MULTICLASS.lightgbm_estimator(params)) is lightgbm.LGBMClassifier
    assert type(REGRESSION.lightgbm_estimator(params)) is lightgbm.LGBMRegressor
    assert BINARY.lightgbm_estimator(params).get_params()["n_estimators"] == 7
    for classifier in (BINARY, MULTICLASS):
        linear = classifier.linear_estimator(4.0, seed=3)
        assert type(linear) is LogisticRegression
        assert (linear.C, linear.max_iter, linear.random_state) == (0.25, 2000, 3)
    ridge = REGRESSION.linear_estimator(4.0, seed=3)
    assert type(ridge) is Ridge and ridge.alpha == 4.0


def test_tuning_labels_must_hold_what_the_search_metric_needs():
    with pytest.raises(ValueError, match="training labels must hold both classes for ROC AUC"):
        BINARY.check_tuning_labels(np.array([0, 1, 2]), "training")
    with pytest.raises(ValueError, match="validation labels must hold at least two distinct"):
        MULTICLASS.check_tuning_labels(np.array([2, 2]), "validation")
    with pytest.raises(ValueError, match="at least two distinct values"):
        REGRESSION.check_tuning_labels(np.array([1.5, 1.5]), "training")
    BINARY.check_tuning_labels(np.array([0, 1, 1]), "training")
    MULTICLASS.check_tuning_labels(np.array([0, 1]), "training")


# --- metrics on examples small enough to check by hand ------------------------------------------


def test_binary_metrics_by_hand():
    labels = np.array([0, 0, 1, 1])
    probability = np.array([0.1, 0.6, 0.4, 0.8])
    metrics = BINARY.metrics(labels, probability, 0.5)
    # Predicted [0, 1, 0, 1]: one true positive, one false positive, one false negative.
    # Ranking: of the 4 (positive, negative) pairs only 0.4 < 0.6 is out of order.
    # Average precision: positives at ranks 1 (precision 1) and 3 (precision 2/3).
    expected = {
        "roc_auc": 3 / 4,
        "pr_auc": (1 + 2 / 3) / 2,
        "log_loss": -(math.log(0.9) + math.log(0.4) + math.log(0.4) + math.log(0.8)) / 4,
        "brier": (0.1**2 + 0.6**2 + 0.6**2 + 0.2**2) / 4,
        "accuracy": 0.5,
        "precision": 0.5,
        "recall": 0.5,
        "f1": 0.5,
    }
    assert list(metrics) == list(expected)
    assert metrics == pytest.approx(expected)
    assert BINARY.metrics(labels, probability) == metrics  # no threshold: 0.5
    assert BINARY.metrics(labels, probability, 0.05)["recall"] == 1.0


def test_multiclass_metrics_by_hand():
    labels = np.array([0, 1, 2, 2])
    probability = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6], [0.3, 0.4, 0.3]])
    metrics = MULTICLASS.metrics(labels, probability)
    # Predicted [0, 1, 2, 1]. One-vs-rest AUC: classes 0 and 1 rank perfectly; class 2's
    # positives (0.6, 0.3) against its negatives (0.1, 0.3): 3 wins and a tie of 4 pairs.
    expected = {
        "roc_auc": (1 + 1 + 3.5 / 4) / 3,
        "log_loss": -(math.log(0.7) + math.log(0.5) + math.log(0.6) + math.log(0.3)) / 4,
        "accuracy": 3 / 4,
        "macro_precision": (1 + 1 / 2 + 1) / 3,
        "macro_recall": (1 + 1 + 1 / 2) / 3,
        "macro_f1": (1 + 2 / 3 + 2 / 3) / 3,
    }
    assert list(metrics) == MULTICLASS_REPORT_ORDER
    assert metrics == pytest.approx(expected)


def test_regression_metrics_by_hand():
    values = np.array([1.0, 2.0, 3.0, 4.0])
    predicted = np.array([1.5, 2.0, 2.0, 5.0])
    metrics = REGRESSION.metrics(values, predicted)
    # Errors 0.5, 0, -1, 1; the values' squared deviations from their mean 2.5 sum to 5.
    expected = {"rmse": math.sqrt(2.25 / 4), "mae": 2.5 / 4, "r2": 1 - 2.25 / 5}
    assert list(metrics) == REGRESSION_REPORT_ORDER
    assert metrics == pytest.approx(expected)
    assert math.isnan(REGRESSION.metrics(np.ones(3), np.arange(3.0))["r2"])


# --- what a model answers ------------------------------------------------------------------------


def test_binary_output_and_response_fields():
    scores = np.array([0.2, 0.5, 0.7])
    output = BINARY.output(scores, ("no", "yes"), 0.5)
    assert output.names == ["prediction", "probability"]
    assert BINARY.response_fields(output, ("no", "yes")) == {
        "predictions": ["no", "yes", "yes"],
        "probabilities": [0.2, 0.5, 0.7],
    }
    assert BINARY.output(scores, (0, 1), 0.6)["prediction"].tolist() == [0, 0, 1]
    assert output.rows(1, 3).frame().to_dict("list") == {
        "prediction": ["yes", "yes"],
        "probability": [0.5, 0.7],
    }


def test_multiclass_output_and_response_fields():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])
    output = MULTICLASS.output(scores, ("A", "B", "C"), None)
    assert output.names == ["prediction", "probability_A", "probability_B", "probability_C"]
    assert MULTICLASS.response_fields(output, ("A", "B", "C")) == {
        "predictions": ["B", "A"],
        "probabilities": [{"A": 0.1, "B": 0.7, "C": 0.2}, {"A": 0.5, "B": 0.2, "C": 0.3}],
    }


def test_regression_output_and_response_fields():
    output = REGRESSION.output(np.array([1.5, 2.0]), (), None)
    assert output.names == ["prediction"]
    assert REGRESSION.response_fields(output, ()) == {
        "predictions": [1.5, 2.0],
        "probabilities": None,
    }


def test_predicted_classes():
    scores = np.array([0.2, 0.5, 0.7])
    assert BINARY.predicted_classes(scores, 0.5).tolist() == [0, 1, 1]
    assert BINARY.predicted_classes(scores, None).tolist() == [0, 1, 1]
    assert BINARY.predicted_classes(scores, 0.6).tolist() == [0, 0, 1]
    probability = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5]])
    assert MULTICLASS.predicted_classes(probability, None).tolist() == [1, 0, 2]
    assert not isinstance(REGRESSION, ClassificationTask)  # values, no classes


def test_only_binary_models_keep_a_threshold():
    labels, probability = np.array([0, 0, 1, 1]), np.array([0.1, 0.3, 0.35, 0.8])
    assert BINARY.model_threshold(0.3) == 0.3
    assert BINARY.choose_threshold(labels, probability) == 0.35  # F1 1.0 from there
    for strategy in (MULTICLASS, REGRESSION):
        assert strategy.model_threshold(0.3) is None
        assert strategy.choose_threshold(labels, probability) is None


# --- the target ----------------------------------------------------------------------------------


def test_binary_classes_and_encoding():
    assert BINARY.classes_of(pd.Series(["no", "yes", "yes"])) == ("no", "yes")
    assert BINARY.classes_of(pd.Series(["stay", "churn", "stay", "stay"])) == ("stay", "churn")
    classes = BINARY.classes_of(pd.Series(np.array([0, 1, 0, 0])))
    assert classes == (0, 1) and all(type(label) is int for label in classes)
    encoded = BINARY.encode_target(pd.Series(["yes", "no", "maybe"]), ("no", "yes"))
    assert encoded.tolist() == [1, 0, 0]


def test_multiclass_classes_and_encoding():
    assert MULTICLASS.classes_of(pd.Series([3, 1, 2, 1])) == (1, 2, 3)
    assert MULTICLASS.classes_of(pd.Series(["b", "c", "a"])) == ("a", "b", "c")
    encoded = MULTICLASS.encode_target(pd.Series(["B", "A", "C"]), ("A", "B", "C"))
    assert encoded.tolist() == [1, 0, 2]
    # Labels are compared as text, so numpy numbers find their class.
    assert MULTICLASS.encode_target(pd.Series([np.int64(2), 1]), (1, 2, 3)).tolist() == [1, 0]
    with pytest.raises(DataError, match="labels not seen in training: D"):
        MULTICLASS.encode_target(pd.Series(["A", "D"]), ("A", "B", "C"))
    assert MULTICLASS.absent_classes(np.array([0, 2, 2]), ("A", "B", "C")) == ["B"]


def test_regression_values_and_encoding():
    assert REGRESSION.classes_of(pd.Series([1.5, 2.5, 3.5])) == ()
    encoded = REGRESSION.encode_target(pd.Series(["1.5", 2, "x"]), ())
    np.testing.assert_array_equal(encoded, [1.5, 2.0, np.nan])
    assert REGRESSION.absent_classes(np.array([1.5, 2.5]), ()) == []


def test_target_balance_and_summary():
    labels = np.array([0, 1, 1, 1])
    assert BINARY.target_balance(labels, ("no", "yes")) == {"no": 0.25, "yes": 0.75}
    assert MULTICLASS.target_balance(np.array([0, 0, 2]), ("A", "B", "C")) == {
        "A": 0.6667,
        "B": 0.0,
        "C": 0.3333,
    }
    assert MULTICLASS.target_summary(np.array([0, 0, 2]), ("A", "B", "C"))["A"] == 2 / 3
    values = np.array([1.0, 2.0, 3.0, 6.0])
    assert REGRESSION.target_balance(values, ()) == {"mean": 3.0, "std": math.sqrt(3.5)}
    assert REGRESSION.target_summary(values, ()) == {
        "mean": 3.0,
        "std": math.sqrt(3.5),
        "min": 1.0,
        "max": 6.0,
    }
    names = {name: s.target_summary_name for name, s in TASKS.items()}
    assert names == {
        "binary": "class_balance",
        "multiclass": "class_balance",
        "regression": "target",
    }


def test_model_card_sentences_per_task():
    task, use = BINARY.describe("defaulted", (False, True), 0.41234)
    assert task == "binary classification of 'defaulted' (positive class: True)"
    assert "decision threshold 0.412" in use
    task, use = MULTICLASS.describe("grade", ("A", "B", "C"), None)
    assert task == "multiclass classification of 'grade' (3 classes: A, B, C)"
    assert "most probable class" in use
    task, use = REGRESSION.describe("rate", (), None)
    assert task == "regression of 'rate'"
    assert use.startswith("Predicts the value of 'rate'")


# --- slices, plots and live metrics ------------------------------------------------------------


def test_binary_slices_with_few_positives_are_small():
    frame = pd.DataFrame({"group": ["a"] * 10 + ["b"] * 10})
    labels = np.array([1, 1] + [0] * 8 + [1] * 5 + [0] * 5)
    probability = np.linspace(0.05, 0.95, 20)
    table = BINARY.slices(frame, labels, probability, 0.5, ["group"], min_rows=1, min_positives=3)
    assert list(table.columns) == list(BINARY.slice_columns)
    assert table.set_index("slice")["small"].to_dict() == {"a": True, "b": False}
    unflagged = BINARY.slices(frame, labels, probability, 0.5, ["group"], min_rows=1)
    assert not unflagged["small"].any()


def test_multiclass_and_regression_slices_have_their_columns():
    frame = pd.DataFrame({"group": ["a", "a", "b", "b"]})
    labels = np.array([0, 1, 2, 2])
    probability = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.3, 0.6], [0.2, 0.2, 0.6]])
    table = MULTICLASS.slices(frame, labels, probability, None, ["group"], min_rows=1)
    assert list(table.columns) == list(MULTICLASS.slice_columns)
    assert table["accuracy"].tolist() == [0.5, 1.0]
    values, predicted = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 3.0, 3.0])
    table = REGRESSION.slices(frame, values, predicted, None, ["group"], min_rows=1)
    assert list(table.columns) == list(REGRESSION.slice_columns)
    # Overall MAE 0.5; slice a: 0.5, slice b: 0.5.
    assert table["mae"].tolist() == [0.5, 0.5]
    assert table["relative_mae"].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="same length"):
        REGRESSION.slices(frame, values[:3], predicted[:3], None, ["group"])


def _pixels(png: bytes) -> np.ndarray:
    assert isinstance(png, bytes) and png.startswith(PNG_SIGNATURE)
    return matplotlib.image.imread(io.BytesIO(png), format="png")


def _plot_inputs(name: str, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray], list[str]]:
    rng = np.random.default_rng(seed)
    n = 200
    if name == "binary":
        labels = rng.integers(0, 2, n)
        scores = np.clip(0.5 * labels + 0.6 * rng.random(n), 0, 1)
        return labels, {"challenger": scores, "champion": scores**2}, ["no", "yes"]
    if name == "multiclass":
        labels = rng.integers(0, 3, n)
        scores = rng.dirichlet([1, 1, 1], n)
        scores[np.arange(n), labels] += rng.random(n)
        scores /= scores.sum(axis=1, keepdims=True)
        return labels, {"challenger": scores}, ["A", "B", "C"]
    values = rng.normal(10, 3, n)
    return values, {"challenger": values + rng.normal(0, 1 + seed, n)}, []


@pytest.mark.parametrize(
    ("name", "figures"),
    [
        (
            "binary",
            ["roc", "precision_recall", "calibration", "confusion_matrix", "feature_importance"],
        ),
        ("multiclass", ["confusion_matrix", "feature_importance"]),
        ("regression", ["predicted_vs_actual", "residuals", "feature_importance"]),
    ],
)
def test_plots_are_pictures_of_their_inputs(name, figures):
    strategy = strategy_for(name)
    pictures = []
    for seed in (1, 2):
        labels, curves, class_names = _plot_inputs(name, seed)
        importance = pd.Series({"income": 3.0 * seed, "age": 1.0, "region": 0.5}, name="gain")
        plots = strategy.plots(labels, curves, 0.5, class_names, importance)
        assert list(plots) == figures
        pictures.append({key: _pixels(png) for key, png in plots.items()})
    for key in figures:
        first, second = pictures[0][key], pictures[1][key]
        assert first.std() > 0.01, f"{name} {key} is blank"
        assert first.shape != second.shape or not np.array_equal(first, second), key


def test_live_metrics_compare_labels_as_given():
    frame = pd.DataFrame(
        {
            "prediction": [1, 0, 1.0, "1", True],
            "label": [1.0, 0, 1, 1, 1],
            "score": [0.9, 0.1, np.nan, 0.6, 0.7],
        }
    )
    # 1 == 1.0 and True == 1, but the text "1" is not the number 1.
    assert MULTICLASS.live_metrics(frame) == {"accuracy": 4 / 5}
    live = BINARY.live_metrics(frame, positive_class=1)
    # The labelled scores (NaN is skipped) rank the one negative below every positive.
    assert live == {"accuracy": 4 / 5, "roc_auc": 1.0}
    regression = pd.DataFrame({"prediction": [1.0, 2.0, 5.0], "label": [1, 3, 3]})
    assert REGRESSION.live_metrics(regression) == pytest.approx(
        {"mae": 1.0, "rmse": math.sqrt(5 / 3)}
    )
    with pytest.raises(ValueError, match="must be numbers"):
        REGRESSION.live_metrics(regression.assign(label=["x", 1, 2]))


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


def test_only_binary_scores_are_one_class_probability():
    assert TASKS["binary"].positive_class(("no", "yes")) == "yes"
    assert TASKS["multiclass"].positive_class(("a", "b", "c")) is None
    assert TASKS["regression"].positive_class(()) is None
