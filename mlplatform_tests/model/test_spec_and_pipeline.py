import json

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression

from mlplatform.demo.data import generate_loans
from mlplatform.model.fast_path import TreeRecordsPredictor
from mlplatform.model.pipeline import build_preprocessor, coerce_features, make_model_pipeline
from mlplatform.model.pyfunc import TabularModel, encode_target
from mlplatform.model.spec import DataError, infer_classes, infer_feature_kind, infer_feature_spec
from mlplatform.model.tuning import lightgbm_estimator


@pytest.mark.parametrize(
    ("name", "values", "kind"),
    [
        ("income", [1.5, 2.0, None, 4.0], "numeric"),
        ("count", [1, 2, 2, 5], "numeric"),
        ("color", ["red", "blue", "red", None], "categorical"),
        ("flag", [True, False, True, True], "boolean"),
        ("flag_text", ["true", "False", "TRUE", None], "boolean"),
        ("when", ["2024-01-02", "2024-02-03T10:00:00", "2024-03-04", None], "datetime"),
    ],
)
def test_infer_feature_kind(name, values, kind):
    assert infer_feature_kind(name, pd.Series(values))[0] == kind


@pytest.mark.parametrize(
    ("name", "values", "reason"),
    [
        ("customer_id", [7, 3, 9, 1], "identifier-like"),
        ("row", [1, 2, 3, 4], "consecutive"),
        ("code", [f"c{i}" for i in range(100)], "identifier-like"),
        ("country", ["NL"] * 4, "constant"),
        ("empty", [None, None, None, None], "missing"),
    ],
)
def test_infer_feature_kind_drops_with_reason(name, values, reason):
    kind, why = infer_feature_kind(name, pd.Series(values))
    assert kind is None
    assert reason in why


def test_infer_classes_prefers_positive_tokens_then_minority():
    assert infer_classes(pd.Series([0, 1, 0, 0])) == (0, 1)
    assert infer_classes(pd.Series(["no", "yes", "yes"])) == ("no", "yes")
    assert infer_classes(pd.Series(["stay", "churn", "stay", "stay"])) == ("stay", "churn")


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([1, 2, 3, 1], "3 distinct values"),
        ([1, 1, 1], "constant"),
        ([1, None, 0], "missing"),
    ],
)
def test_infer_classes_rejects_targets_unfit_for_binary(labels, message):
    with pytest.raises(DataError, match=message):
        infer_classes(pd.Series(labels, name="y"))


def test_feature_spec_of_demo_data():
    frame = generate_loans(n_rows=500)
    spec = infer_feature_spec(frame, "defaulted")
    assert spec.time_column == "application_date"
    assert "application_id" in spec.dropped
    assert spec.features["purpose"] == "categorical"
    assert spec.features["has_cosigner"] == "boolean"
    assert spec.features["application_date"] == "datetime"
    assert spec.features["income"] == "numeric"
    assert "defaulted" not in spec.features


def test_feature_spec_rejects_missing_target():
    with pytest.raises(DataError, match="target column 'label' not found"):
        infer_feature_spec(pd.DataFrame({"a": [1, 2]}), "label")


def test_coerce_features_converts_json_like_values():
    spec = infer_feature_spec(generate_loans(n_rows=300), "defaulted")
    record = (
        generate_loans(n_rows=1).drop(columns=["defaulted", "application_id"]).iloc[0].to_dict()
    )
    record["age"] = 30  # an int where training saw floats
    record["has_cosigner"] = None
    coerced = coerce_features(pd.DataFrame([record]), spec)
    assert coerced["age"].dtype == float
    assert np.isnan(coerced.loc[0, "has_cosigner"])
    assert str(coerced["application_date"].dtype).startswith("datetime64")


def test_coerce_features_names_missing_columns():
    spec = infer_feature_spec(generate_loans(n_rows=300), "defaulted")
    with pytest.raises(DataError, match="missing input columns: age"):
        coerce_features(generate_loans(n_rows=3).drop(columns=["age"]), spec)


def test_tabular_model_predicts_labels_and_probabilities_from_raw_records():
    frame = generate_loans(n_rows=1500, seed=1)
    spec = infer_feature_spec(frame, "defaulted")
    pipeline = make_model_pipeline(
        spec, build_preprocessor(spec, for_trees=False), LogisticRegression(max_iter=500)
    )
    pipeline.fit(frame[list(spec.features)], encode_target(frame["defaulted"], spec))
    model = TabularModel(pipeline, spec, threshold=0.3)
    out = model.predict(None, frame[list(spec.features)].head(50))
    assert list(out.columns) == ["prediction", "probability"]
    assert out["probability"].between(0, 1).all()
    assert ((out["probability"] >= 0.3) == (out["prediction"] == 1)).all()


def _loans_for(task: str) -> tuple[pd.DataFrame, str]:
    """Demo loans with a binary, multiclass (``grade``) or regression (``rate``) target."""
    frame = generate_loans(n_rows=1200, seed=3)
    noise = np.random.default_rng([3, 1]).normal(0, 30, len(frame))
    signal = frame["credit_score"].fillna(650) + noise
    if task == "binary":
        return frame.drop(columns=["interest_rate"]), "defaulted"
    frame = frame.drop(columns=["defaulted"])
    if task == "multiclass":  # missing categories as NaN (as read from CSV), not None
        frame["purpose"] = frame["purpose"].fillna(np.nan)
        frame["grade"] = pd.qcut(signal, 3, labels=["A", "B", "C"]).astype(str)
        return frame.drop(columns=["interest_rate"]), "grade"
    frame["rate"] = (signal / 100).round(3)
    return frame.drop(columns=["interest_rate"]), "rate"


# What clients send that training data never has: unseen and missing categories, missing
# numbers and flags, whole numbers, dates with offsets, without time, or not in ISO form at all.
_ODD_VALUES = [
    {"purpose": "never-seen-in-training"},
    {"purpose": None, "home_ownership": None},
    {"income": None, "age": 41, "has_cosigner": None},
    {"application_date": "2025-06-01T23:30:00-05:00"},
    {"application_date": "2025-06-01"},
    {"application_date": "2025-06-01 08:15Z"},
    {"application_date": "June 1 2025"},
    {"application_date": "1500-01-01"},
    {"application_date": None},
    {"has_cosigner": True, "credit_score": 850},
]


@pytest.mark.parametrize("task", ["binary", "multiclass", "regression"])
def test_tree_fast_path_scores_exactly_as_the_pipeline(task):
    frame, target = _loans_for(task)
    spec = infer_feature_spec(frame, target)
    assert spec.task == task
    inputs = frame[list(spec.features)]
    pipeline = make_model_pipeline(
        spec,
        build_preprocessor(spec, for_trees=True),
        lightgbm_estimator(task, {"n_estimators": 30, "verbose": -1, "n_jobs": 1}),
    )
    pipeline.fit(inputs, encode_target(frame[target], spec))
    model = TabularModel(pipeline, spec)
    records = json.loads(inputs.head(200).to_json(orient="records", date_format="iso"))
    records += [records[i] | odd for i, odd in enumerate(_ODD_VALUES)]

    fast = TreeRecordsPredictor.from_pipeline(pipeline, spec)

    assert fast is not None
    expected = model.scores(pd.DataFrame.from_records(records, columns=list(spec.features)))
    np.testing.assert_array_equal(fast.scores(records), expected)
    np.testing.assert_array_equal(fast.scores(records[-1:]), expected[-1:])


def test_fast_path_is_only_for_tree_pipelines():
    frame, target = _loans_for("binary")
    spec = infer_feature_spec(frame, target)
    linear = make_model_pipeline(
        spec, build_preprocessor(spec, for_trees=False), LogisticRegression(max_iter=500)
    )
    linear.fit(frame[list(spec.features)], encode_target(frame[target], spec))
    assert TreeRecordsPredictor.from_pipeline(linear, spec) is None
