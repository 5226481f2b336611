"""Feature importance: split gain summed back to input columns, or permutation importance."""

import lightgbm
import pytest
from sklearn.linear_model import LogisticRegression

from mlplatform.demo.data import generate_loans
from mlplatform.evaluation.importance import feature_importance
from mlplatform.model.pipeline import build_preprocessor, make_model_pipeline
from mlplatform.model.pyfunc import TabularModel, encode_target
from mlplatform.model.spec import infer_feature_spec


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
