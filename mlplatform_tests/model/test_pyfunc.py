"""The MLflow model class: labels and probabilities from raw records."""

from sklearn.linear_model import LogisticRegression

from mlplatform.demo.data import generate_loans
from mlplatform.model.pipeline import build_preprocessor, make_model_pipeline
from mlplatform.model.pyfunc import TabularModel, encode_target
from mlplatform.model.spec import infer_feature_spec


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
