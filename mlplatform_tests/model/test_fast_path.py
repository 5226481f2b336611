"""Scoring straight from JSON records: the same scores as the pipeline, for tree models only."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression

from mlplatform.demo.data import generate_loans
from mlplatform.model.fast_path import TreeRecordsPredictor
from mlplatform.model.pipeline import build_preprocessor, make_model_pipeline
from mlplatform.model.pyfunc import TabularModel, encode_target
from mlplatform.model.spec import infer_feature_spec


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
        spec.strategy.lightgbm_estimator({"n_estimators": 30, "verbose": -1, "n_jobs": 1}),
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
