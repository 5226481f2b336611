"""Coercion of JSON-like records to the training dtypes."""

import numpy as np
import pandas as pd
import pytest

from mlplatform.demo.data import generate_loans
from mlplatform.model.pipeline import coerce_features
from mlplatform.model.spec import DataError, infer_feature_spec


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
