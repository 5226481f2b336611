import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from mlplatform.demo.data import generate_loans, write_demo_source
from mlplatform.model.pipeline import build_preprocessor, make_model_pipeline
from mlplatform.model.pyfunc import encode_target
from mlplatform.model.spec import infer_feature_spec


def test_same_seed_same_data():
    pd.testing.assert_frame_equal(generate_loans(300, seed=5), generate_loans(300, seed=5))
    assert not generate_loans(300, seed=5).equals(generate_loans(300, seed=6))


def test_demo_data_is_realistic():
    frame = generate_loans(5000)
    assert 0.08 < frame["defaulted"].mean() < 0.25  # imbalanced
    assert frame["income"].isna().mean() > 0.02  # has holes
    assert frame["application_date"].is_monotonic_increasing
    assert frame.shape[1] >= 14


def test_signal_is_learnable_and_drift_moves_the_data():
    frame = generate_loans(4000, seed=1)
    spec = infer_feature_spec(frame, "defaulted")
    model = make_model_pipeline(
        spec, build_preprocessor(spec, for_trees=False), LogisticRegression(max_iter=1000)
    )
    model.fit(frame.iloc[:3000], encode_target(frame["defaulted"].iloc[:3000], spec))
    auc = roc_auc_score(
        frame["defaulted"].iloc[3000:], model.predict_proba(frame.iloc[3000:])[:, 1]
    )
    assert auc > 0.65
    drifted = generate_loans(4000, seed=1, drift=1.0)
    assert drifted["credit_score"].mean() < frame["credit_score"].mean() - 30
    assert drifted["defaulted"].mean() > frame["defaulted"].mean()


def test_drift_must_be_a_fraction():
    with pytest.raises(ValueError, match="drift"):
        generate_loans(10, drift=2)


def test_demo_source_written_once(tmp_path):
    path = write_demo_source(tmp_path, n_rows=50)
    first = path.read_bytes()
    assert write_demo_source(tmp_path, n_rows=80).read_bytes() == first
