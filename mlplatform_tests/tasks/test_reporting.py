import math

import lightgbm
import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    f1_score,
    log_loss,
    precision_score,
    recall_score,
    roc_auc_score,
)

from mlplatform.demo.data import generate_loans
from mlplatform.evaluation.card import render_model_card
from mlplatform.evaluation.importance import feature_importance
from mlplatform.model.pipeline import build_preprocessor, make_model_pipeline
from mlplatform.model.pyfunc import TabularModel, encode_target
from mlplatform.model.spec import infer_feature_spec
from mlplatform.tasks.metrics import (
    LOWER_IS_BETTER,
    METRIC_NAMES,
    Interval,
    bootstrap_indices,
    bootstrap_metrics,
    choose_threshold,
    classification_metrics,
    paired_difference,
    resampled_metrics,
)
from mlplatform.tasks.plots import (
    plot_calibration,
    plot_confusion_matrix,
    plot_feature_importance,
    plot_precision_recall,
    plot_roc,
)
from mlplatform.tasks.slices import fairness_gaps, known_limitations, slice_metrics

PNG_SIGNATURE = b"\x89PNG"


def scored(n: int, seed: int = 0, signal: float = 1.5, prevalence: float = 0.2):
    """Labels and informative, noisy probabilities (logistic in a Gaussian score)."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < prevalence).astype(int)
    score = signal * labels + rng.normal(0, 1, n) - 1.5
    return labels, 1 / (1 + np.exp(-score))


def sklearn_metrics(labels, probability, threshold):
    predicted = (probability >= threshold).astype(int)
    return {
        "roc_auc": roc_auc_score(labels, probability),
        "pr_auc": average_precision_score(labels, probability),
        "log_loss": log_loss(labels, np.clip(probability, 1e-7, 1 - 1e-7), labels=[0, 1]),
        "brier": brier_score_loss(labels, probability),
        "accuracy": accuracy_score(labels, predicted),
        "precision": precision_score(labels, predicted, zero_division=0),
        "recall": recall_score(labels, predicted, zero_division=0),
        "f1": f1_score(labels, predicted, zero_division=0),
    }


# ----------------------------------------------------------------------------------------------
# Metrics and threshold
# ----------------------------------------------------------------------------------------------


def test_classification_metrics_equal_sklearn():
    labels, probability = scored(700, seed=1)
    probability[:5] = [0.0, 1.0, 0.0, 1.0, 0.5]  # exercises the log-loss clipping
    metrics = classification_metrics(labels, probability, 0.35)
    expected = sklearn_metrics(labels, probability, 0.35)
    assert list(metrics) == list(METRIC_NAMES)
    assert metrics == pytest.approx(expected, abs=1e-12)
    assert all(isinstance(value, float) for value in metrics.values())
    assert {"log_loss", "brier", "rmse", "mae"} == LOWER_IS_BETTER


def test_classification_metrics_with_a_single_class():
    metrics = classification_metrics(np.zeros(10, int), np.linspace(0, 0.9, 10), 0.5)
    assert math.isnan(metrics["roc_auc"]) and math.isnan(metrics["pr_auc"])
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["precision"] == metrics["recall"] == metrics["f1"] == 0.0


def test_choose_threshold_beats_half_on_an_imbalanced_split():
    # Calibrated probabilities of a rare class: P(y=1 | score) for score ~ N(2 y, 1).
    rng = np.random.default_rng(2)
    labels = (rng.random(3000) < 0.08).astype(int)
    score = 2.0 * labels + rng.normal(0, 1, 3000)
    probability = 1 / (1 + np.exp(-(np.log(0.08 / 0.92) + 2.0 * score - 2.0)))
    threshold = choose_threshold(labels, probability)
    assert threshold == choose_threshold(labels, probability)  # deterministic
    assert 0 < threshold < 0.5
    tuned = f1_score(labels, probability >= threshold)
    assert tuned > f1_score(labels, probability >= 0.5) + 0.02
    # No candidate threshold does better.
    candidates = np.unique(probability)[:, None]
    predicted = probability[None, :] >= candidates
    true_positives = (predicted & (labels == 1)).sum(axis=1)
    f1 = 2 * true_positives / (predicted.sum(axis=1) + labels.sum())
    assert tuned == pytest.approx(f1.max(), abs=1e-12)


def test_choose_threshold_single_class_is_half():
    assert choose_threshold(np.ones(20, int), np.linspace(0, 1, 20)) == 0.5


# ----------------------------------------------------------------------------------------------
# Bootstrap
# ----------------------------------------------------------------------------------------------


def test_resampled_metrics_equal_sklearn_on_every_resample():
    labels, probability = scored(400, seed=3)
    probability = probability.round(2)  # many tied scores
    indices = bootstrap_indices(len(labels), 25, seed=4)
    assert indices.shape == (25, 400)
    np.testing.assert_array_equal(indices, bootstrap_indices(len(labels), 25, seed=4))
    per_resample = resampled_metrics(labels, probability, 0.3, indices)
    for row, rows in enumerate(indices):
        expected = sklearn_metrics(labels[rows], probability[rows], 0.3)
        actual = {name: values[row] for name, values in per_resample.items()}
        assert actual == pytest.approx(expected, abs=1e-10)


def test_resampled_metrics_skip_auc_for_single_class_resamples():
    labels = np.array([0, 0, 0, 1])
    probability = np.array([0.1, 0.2, 0.3, 0.9])
    per_resample = resampled_metrics(
        labels, probability, 0.5, np.array([[0, 1, 2, 2], [0, 3, 3, 1]])
    )
    assert math.isnan(per_resample["roc_auc"][0]) and math.isnan(per_resample["pr_auc"][0])
    assert per_resample["roc_auc"][1] == 1.0
    assert per_resample["accuracy"].tolist() == [1.0, 1.0]


def test_bootstrap_intervals_contain_the_point_and_shrink_with_more_data():
    small = bootstrap_metrics(*scored(300, seed=5), threshold=0.3)
    large = bootstrap_metrics(*scored(5000, seed=5), threshold=0.3)
    for name in METRIC_NAMES:
        assert small[name].contains(small[name].point), name
        assert large[name].contains(large[name].point), name
        assert large[name].width < small[name].width, name
    labels, probability = scored(300, seed=5)
    assert small["roc_auc"].point == roc_auc_score(labels, probability)
    assert small["roc_auc"].as_dict() == {
        "point": small["roc_auc"].point,
        "low": small["roc_auc"].low,
        "high": small["roc_auc"].high,
    }


def test_bootstrap_is_seeded():
    labels, probability = scored(1000, seed=6)
    first = bootstrap_metrics(labels, probability, 0.3, n_resamples=400)
    assert first == bootstrap_metrics(labels, probability, 0.3, n_resamples=400)
    assert first != bootstrap_metrics(labels, probability, 0.3, n_resamples=400, seed=1)


def test_bootstrap_interval_is_the_percentile_of_the_resamples():
    labels, probability = scored(500, seed=7)
    intervals = bootstrap_metrics(labels, probability, 0.3, n_resamples=200, confidence=0.9)
    per_resample = resampled_metrics(labels, probability, 0.3, bootstrap_indices(500, 200, 0))
    low, high = np.quantile(per_resample["brier"], [0.05, 0.95])
    assert intervals["brier"] == Interval(brier_score_loss(labels, probability), low, high)


def test_bootstrap_rejects_bad_arguments():
    with pytest.raises(ValueError, match="empty"):
        bootstrap_metrics(np.array([], int), np.array([]), 0.5)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_metrics(np.array([0, 1]), np.array([0.2, 0.8]), 0.5, confidence=95)


def test_paired_difference_of_a_model_with_itself_is_exactly_zero():
    labels, probability = scored(800, seed=8)
    difference = paired_difference(labels, probability, probability, 0.3, 0.3)
    assert set(difference) == set(METRIC_NAMES)
    for interval in difference.values():
        assert (interval.point, interval.low, interval.high) == (0.0, 0.0, 0.0)


def test_paired_difference_finds_a_clearly_better_model():
    rng = np.random.default_rng(9)
    labels = (rng.random(1000) < 0.3).astype(int)
    shared = rng.normal(0, 1, 1000)
    champion = 1 / (1 + np.exp(-(0.7 * labels + shared - 1)))
    challenger = 1 / (1 + np.exp(-(2.5 * labels + shared - 1.8)))
    difference = paired_difference(labels, challenger, champion, 0.4, 0.4)
    assert difference["roc_auc"].low > 0
    assert difference["pr_auc"].low > 0
    assert difference["log_loss"].high < 0  # lower is better
    expected = roc_auc_score(labels, challenger) - roc_auc_score(labels, champion)
    assert difference["roc_auc"].point == pytest.approx(expected, abs=1e-12)


def test_paired_difference_uses_the_same_resamples_for_both_models():
    labels, challenger = scored(300, seed=10)
    champion = np.clip(challenger + np.random.default_rng(11).normal(0, 0.1, 300), 0, 1)
    difference = paired_difference(labels, challenger, champion, 0.3, 0.4, n_resamples=100)
    indices = bootstrap_indices(300, 100, seed=0)
    per_resample = (
        resampled_metrics(labels, challenger, 0.3, indices)["f1"]
        - resampled_metrics(labels, champion, 0.4, indices)["f1"]
    )
    assert (difference["f1"].low, difference["f1"].high) == pytest.approx(
        tuple(np.quantile(per_resample, [0.025, 0.975]))
    )


def test_interval_helpers():
    interval = Interval(0.5, 0.4, 0.6)
    assert interval.contains(0.4) and interval.contains(0.6) and not interval.contains(0.61)
    assert not Interval(0.5, math.nan, math.nan).contains(0.5)
    assert interval.as_dict() == {"point": 0.5, "low": 0.4, "high": 0.6}


# ----------------------------------------------------------------------------------------------
# Slices and fairness
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def sliced():
    # Region a: 4 rows, 2 positives (one caught), 2 negatives (one flagged).
    # Region b: 3 rows, 1 positive (caught), 2 negatives (none flagged).
    # Missing region: 1 positive row, missed.
    frame = pd.DataFrame(
        {
            "region": ["a", "a", "a", "a", "b", "b", "b", None],
            "amount": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, np.nan],
        }
    )
    labels = np.array([1, 1, 0, 0, 1, 0, 0, 1])
    probability = np.array([0.9, 0.2, 0.8, 0.1, 0.7, 0.3, 0.4, 0.1])
    return frame, labels, probability


def test_slice_metrics_match_hand_computed_numbers(sliced):
    frame, labels, probability = sliced
    slices = slice_metrics(frame, labels, probability, 0.5, categorical=["region"], min_rows=4)
    assert list(slices.columns) == [
        "feature",
        "slice",
        "count",
        "positive_rate",
        "auc",
        "tpr",
        "fpr",
        "small",
    ]
    by_slice = slices.set_index("slice")
    assert by_slice["feature"].eq("region").all()
    assert by_slice["count"].to_dict() == {"a": 4, "b": 3, "<missing>": 1}
    assert by_slice.loc["a", "positive_rate"] == 0.5
    assert by_slice.loc["b", "positive_rate"] == pytest.approx(1 / 3)
    assert by_slice.loc["a", "tpr"] == 0.5 and by_slice.loc["a", "fpr"] == 0.5
    assert by_slice.loc["b", "tpr"] == 1.0 and by_slice.loc["b", "fpr"] == 0.0
    assert by_slice.loc["<missing>", "tpr"] == 0.0
    assert math.isnan(by_slice.loc["<missing>", "fpr"])  # no negatives
    assert math.isnan(by_slice.loc["<missing>", "auc"])  # one class
    # AUC in region a: positives {0.9, 0.2} vs negatives {0.8, 0.1}: 3 of 4 pairs ordered.
    assert by_slice.loc["a", "auc"] == 0.75
    assert by_slice.loc["b", "auc"] == 1.0
    assert by_slice["small"].to_dict() == {"a": False, "b": True, "<missing>": True}


def test_slice_metrics_bin_numeric_columns_by_quantile(sliced):
    frame, labels, probability = sliced
    slices = slice_metrics(frame, labels, probability, 0.5, [], numeric_bins={"amount": 2})
    assert slices["feature"].eq("amount").all()
    assert slices["slice"].tolist() == ["(0.999, 4.0]", "(4.0, 7.0]", "<missing>"]
    assert slices["count"].tolist() == [4, 3, 1]
    assert slices["small"].all()  # default min_rows=30
    constant = pd.DataFrame({"amount": [5.0] * 8})
    one_bin = slice_metrics(constant, labels, probability, 0.5, [], numeric_bins={"amount": 4})
    assert one_bin["count"].tolist() == [8]
    assert one_bin["slice"].tolist() == ["[5.0, 5.0]"]


def test_slice_metrics_rejects_unknown_columns(sliced):
    frame, labels, probability = sliced
    with pytest.raises(ValueError, match="colour"):
        slice_metrics(frame, labels, probability, 0.5, categorical=["colour"])


def test_fairness_gap_is_the_largest_difference_ignoring_small_slices():
    slices = pd.DataFrame(
        {
            "feature": ["region"] * 4 + ["term"] * 2 + ["purpose"] * 2,
            "slice": ["a", "b", "c", "tiny", "36", "60", "x", "y"],
            "count": [100, 80, 60, 5, 200, 150, 90, 3],
            "tpr": [0.70, 0.55, 0.62, 0.0, 0.6, np.nan, 0.5, 0.9],
            "small": [False, False, False, True, False, False, False, True],
        }
    )
    gaps = fairness_gaps(slices)
    assert gaps == {"region": pytest.approx(0.15)}  # term and purpose keep one usable slice
    assert fairness_gaps(slices, metric="count") == {
        "region": 40.0,
        "term": 50.0,
    }
    assert fairness_gaps(slices.iloc[0:0]) == {}


def test_known_limitations_name_small_slices_and_gaps_above_the_bound(sliced):
    frame, labels, probability = sliced
    slices = slice_metrics(frame, labels, probability, 0.5, ["region"], min_rows=4)
    sentences = known_limitations(slices, {"region": 0.3, "term": 0.05}, fairness_bound=0.1)
    assert len(sentences) == 3
    assert "region = b" in sentences[0] and "only 3 rows" in sentences[0]
    assert "region = <missing>" in sentences[1]
    assert "region" in sentences[2] and "0.300" in sentences[2] and "0.100" in sentences[2]
    assert known_limitations(pd.DataFrame(), {}, 0.1) == []


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------


def test_plots_return_png_bytes():
    labels, probability = scored(300, seed=12)
    curves = {"challenger": probability, "champion": np.sqrt(probability)}
    importance = pd.Series({"credit_score": 3.0, "income": 1.0, "region": 0.2}, name="gain")
    images = [
        plot_roc(labels, curves),
        plot_precision_recall(labels, curves),
        plot_calibration(labels, curves, n_bins=8),
        plot_confusion_matrix(labels, probability >= 0.3, ("repaid", "defaulted")),
        plot_feature_importance(importance, top=2),
        plot_roc(np.zeros(5, int), {"m": np.linspace(0, 1, 5)}),  # one class: still a picture
    ]
    for image in images:
        assert isinstance(image, bytes) and image.startswith(PNG_SIGNATURE)
        assert len(image) > 1000


# ----------------------------------------------------------------------------------------------
# Feature importance
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loans():
    frame = generate_loans(1500)
    spec = infer_feature_spec(frame, "defaulted")
    train, test = frame.iloc[:1100], frame.iloc[1100:]
    return spec, train, test


def test_gain_importance_sums_back_to_input_columns(loans):
    spec, train, test = loans
    estimator = lightgbm.LGBMClassifier(
        n_estimators=60, num_leaves=15, random_state=0, n_jobs=1, verbose=-1
    )
    pipeline = make_model_pipeline(spec, build_preprocessor(spec, for_trees=True), estimator)
    pipeline.fit(train, encode_target(train[spec.target], spec))
    model = TabularModel(pipeline, spec)
    importance, method = feature_importance(model, test, encode_target(test[spec.target], spec))
    assert method == "gain"
    assert spec.features["application_date"] == "datetime"
    assert sorted(importance.index) == sorted(spec.features)
    assert importance.is_monotonic_decreasing
    assert importance.index[0] in {"credit_score", "debt_to_income", "interest_rate"}
    gains = estimator.booster_.feature_importance("gain")
    assert importance.sum() == pytest.approx(gains.sum())
    # The datetime column is the last transformer's output: month, day of week and hour.
    assert importance["application_date"] == pytest.approx(gains[-3:].sum())


def test_permutation_importance_for_a_logistic_pipeline(loans):
    spec, train, test = loans
    pipeline = make_model_pipeline(
        spec, build_preprocessor(spec, for_trees=False), LogisticRegression(max_iter=1000)
    )
    pipeline.fit(train, encode_target(train[spec.target], spec))
    model = TabularModel(pipeline, spec)
    labels = encode_target(test[spec.target], spec)
    importance, method = feature_importance(model, test, labels, seed=3)
    assert method == "permutation"
    assert sorted(importance.index) == sorted(spec.features)  # target and dropped id left out
    assert importance.is_monotonic_decreasing
    assert importance.index[0] in {"credit_score", "debt_to_income", "interest_rate"}
    assert importance.iloc[0] > 0.01


# ----------------------------------------------------------------------------------------------
# Model card
# ----------------------------------------------------------------------------------------------


def test_model_card_has_every_section_and_flags_problems(sliced):
    frame, labels, probability = sliced
    slices = slice_metrics(frame, labels, probability, 0.5, ["region"], min_rows=4)
    intervals = bootstrap_metrics(*scored(400, seed=13), threshold=0.3, n_resamples=100)
    card = {
        "model_name": "loan-default",
        "model_version": "7",
        "task": "binary classification",
        "intended_use": "Rank applications for manual review.",
        "training_data": {
            "source": "loans.csv",
            "data_version": "abc123",
            "rows": 5000,
            "time_range": None,
            "class_balance": {"0": 0.85, "1": 0.15},
        },
        "features": {"credit_score": "numeric", "region": "categorical"},
        "dropped": {"application_id": "identifier-like"},
        "threshold": 0.31,
        "metrics": {name: interval.as_dict() for name, interval in intervals.items()},
        "champion_comparison": None,
        "slices": slices.to_dict("records"),
        "fairness_gaps": {"region": 0.5, "term": 0.01},
        "fairness_bound": 0.1,
        "limitations": ["Trained on synthetic data."],
        "lineage": {"dagster_run_id": "run-1", "mlflow_run_id": "ml-1", "code_version": "0.1.0"},
    }
    text = render_model_card(card)
    for heading in (
        "# Model card: loan-default v7",
        "## Intended use",
        "## Training data",
        "## Features",
        "## Metrics",
        "## Slices and fairness",
        "## Known limitations",
        "## Lineage",
    ):
        assert heading in text
    assert "95% interval" in text
    roc = intervals["roc_auc"]
    assert f"| roc_auc | {roc.point:.4f} | [{roc.low:.4f}, {roc.high:.4f}]" in text
    assert "| region | 0.5000 | **EXCEEDS BOUND** |" in text
    assert "| term | 0.0100 | within bound |" in text
    limitations = text.split("## Known limitations")[1].split("## Lineage")[0]
    assert "Trained on synthetic data." in limitations
    assert "region = b" in limitations and "region = <missing>" in limitations
    assert "region = a" not in limitations
    assert "fairness gap of 0.500" in limitations
    assert "**Time range:** n/a" in text
    assert "**Against the champion:** n/a" in text
    assert "**Git commit:** n/a" in text
    assert "application_id" in text and "15.0%" in text


def test_model_card_survives_missing_values():
    text = render_model_card({"metrics": {"roc_auc": {"point": None}}, "slices": None})
    assert "# Model card: n/a vn/a" in text
    assert "| roc_auc | n/a | n/a |" in text
    assert "None recorded." in text
    assert render_model_card({}).count("## ") == 7
