"""Feature kinds, classes and the feature spec inferred from a dataset."""

import pandas as pd
import pytest

from mlplatform.demo.data import generate_loans
from mlplatform.model.spec import DataError, infer_classes, infer_feature_kind, infer_feature_spec


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
