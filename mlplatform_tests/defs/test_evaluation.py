import json

import dagster as dg
import mlflow
import pytest
from mlflow import MlflowClient
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    f1_score,
    roc_auc_score,
)

from mlplatform.defs.evaluation import PromotionGateConfig, evaluation_report
from mlplatform.defs.features import features
from mlplatform.defs.ingest import raw_data
from mlplatform.defs.training import candidate_model
from mlplatform.evaluation.gate import EvaluationReport, decide_promotion
from mlplatform.model.registry import MODEL_CARD_ARTIFACT, ModelRef

CHALLENGER = ModelRef("m", "2", "run2", "lightgbm")
CHAMPION = ModelRef("m", "1", "run1", "lightgbm")


def _report(
    auc: float, champion_auc: float | None, difference=None, gaps=None, sensitive=()
) -> EvaluationReport:
    compared = champion_auc is not None
    return EvaluationReport(
        challenger=CHALLENGER,
        challenger_metrics={"roc_auc": auc, "log_loss": 0.4},
        champion=CHAMPION if compared else None,
        champion_metrics={"roc_auc": champion_auc, "log_loss": 0.4} if compared else None,
        champion_note="no champion yet",
        test_rows=100,
        threshold=0.5,
        difference={"roc_auc": dict(zip(("point", "low", "high"), difference, strict=True))}
        if difference
        else None,
        fairness_gaps=gaps or {},
        sensitive_features=sensitive,
    )


@pytest.mark.parametrize(
    ("report", "passed", "words"),
    [
        (_report(0.75, None), True, "no comparable champion"),
        (_report(0.55, None), False, "misses the floor of 0.6"),
        (_report(0.75, 0.70, (0.05, 0.02, 0.08)), True, "non-inferior to"),
        (_report(0.698, 0.70, (-0.002, -0.008, 0.004)), True, "non-inferior to"),
        (_report(0.70, 0.70, (0.0, -0.03, 0.03)), False, "credibly worse than"),
        (_report(0.65, 0.70, (-0.05, -0.08, -0.02)), False, "credibly worse than"),
        (
            _report(0.75, None, gaps={"region": 0.7}, sensitive=("region",)),
            False,
            "gap 0.700 between the slices of the sensitive feature 'region' exceeds",
        ),
        # A gap on a feature nobody declared sensitive describes the data; it never blocks.
        (_report(0.75, None, gaps={"grade": 1.5}), True, "no sensitive feature to bound declared"),
        (
            _report(0.75, None, gaps={"grade": 1.5, "sex": 0.1}, sensitive=("sex",)),
            True,
            "sensitive sex gap 0.100 within 0.5",
        ),
    ],
)
def test_promotion_gate_uses_the_paired_interval(report, passed, words):
    decision = decide_promotion(report, PromotionGateConfig(tolerance=0.01))
    assert decision.passed is passed
    assert words in decision.reason


def test_gate_on_a_loss_metric_is_a_ceiling():
    config = PromotionGateConfig(gate_metric="log_loss", min_score=0.3)
    decision = decide_promotion(_report(0.8, None), config)
    assert not decision.passed
    assert "ceiling" in decision.reason


def test_unknown_gate_metric_is_an_error():
    with pytest.raises(ValueError, match="unknown gate metric"):
        decide_promotion(_report(0.8, None), PromotionGateConfig(gate_metric="auc"))


def test_report_matches_scikit_learn_on_the_same_predictions(training_resources, platform_home):
    result = dg.materialize(
        [raw_data, features, candidate_model, evaluation_report], resources=training_resources
    )
    assert result.success
    report = result.output_for_node("evaluation_report")
    feature_set = result.output_for_node("features")
    labels = feature_set.labels("test")
    model = mlflow.pyfunc.load_model(report.challenger.uri)
    predicted = model.predict(feature_set.inputs("test"))
    probability = predicted["probability"].to_numpy()
    expected = {
        "roc_auc": roc_auc_score(labels, probability),
        "pr_auc": average_precision_score(labels, probability),
        "brier": brier_score_loss(labels, probability),
        "accuracy": accuracy_score(labels, probability >= report.threshold),
        "f1": f1_score(labels, probability >= report.threshold),
    }
    for metric, value in expected.items():
        assert report.challenger_metrics[metric] == pytest.approx(value), metric
        interval = report.challenger_intervals[metric]
        assert interval["low"] <= interval["point"] <= interval["high"]
    # The threshold was chosen on validation and travels with the model.
    assert report.threshold == model.unwrap_python_model().threshold != 0.5

    directory = platform_home / "reports" / f"v{report.challenger.version}"
    document = json.loads((directory / "report.json").read_text())
    assert document["challenger_metrics"]["roc_auc"] == pytest.approx(expected["roc_auc"])
    assert {row["feature"] for row in document["slices"]} >= {"region", "purpose", "home_ownership"}
    for plot in (
        "roc",
        "precision_recall",
        "calibration",
        "confusion_matrix",
        "feature_importance",
    ):
        assert (directory / f"{plot}.png").read_bytes().startswith(b"\x89PNG")
    card = (directory / MODEL_CARD_ARTIFACT).read_text()
    for section in ("Intended use", "Training data", "Metrics", "Slices and fairness", "Lineage"):
        assert section in card
    assert result.run_id in card

    artifacts = {a.path for a in MlflowClient().list_artifacts(report.challenger.mlflow_run_id)}
    assert {MODEL_CARD_ARTIFACT, "evaluation"} <= artifacts
    metadata = result.asset_materializations_for_node("evaluation_report")[0].metadata
    assert "data:image/png;base64," in metadata["plots"].value
    assert "Slices and fairness" in metadata["model_card"].value


def test_evaluation_report_gate_blocks_a_challenger_below_the_floor(training_resources):
    result = dg.materialize(
        [raw_data, features, candidate_model, evaluation_report],
        resources=training_resources,
        run_config={"ops": {"evaluation_report": {"config": {"min_score": 0.99}}}},
        raise_on_error=False,
    )
    assert not result.success
    gate = next(c for c in result.get_asset_check_evaluations() if c.check_name == "promotion_gate")
    assert not gate.passed
    assert "misses the floor of 0.99" in gate.description
    report = result.output_for_node("evaluation_report")
    assert report.champion is None
    assert 0.5 < report.challenger_metrics["roc_auc"] <= 1.0
