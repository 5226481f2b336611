import dagster as dg
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, log_loss, precision_score, recall_score

from mlplatform.defs.evaluation import (
    EvaluationReport,
    PromotionGateConfig,
    classification_metrics,
    decide_promotion,
    evaluation_report,
)
from mlplatform.defs.features import features
from mlplatform.defs.ingest import raw_data
from mlplatform.defs.training import ModelRef, candidate_model

CHALLENGER = ModelRef("m", "2", "run2", "lightgbm")
CHAMPION = ModelRef("m", "1", "run1", "lightgbm")


def _report(challenger_auc: float, champion_auc: float | None) -> EvaluationReport:
    return EvaluationReport(
        challenger=CHALLENGER,
        challenger_metrics={"roc_auc": challenger_auc, "log_loss": 0.4},
        champion=CHAMPION if champion_auc is not None else None,
        champion_metrics={"roc_auc": champion_auc, "log_loss": 0.4}
        if champion_auc is not None
        else None,
        champion_note="test",
        test_rows=100,
        threshold=0.5,
    )


@pytest.mark.parametrize(
    ("challenger", "champion", "passed", "words"),
    [
        (0.75, None, True, "no comparable champion"),
        (0.55, None, False, "misses the floor of 0.6"),
        (0.75, 0.70, True, "at least as good as"),
        (0.698, 0.70, True, "within tolerance of"),
        (0.65, 0.70, False, "worse than"),
    ],
)
def test_promotion_gate(challenger, champion, passed, words):
    decision = decide_promotion(_report(challenger, champion), PromotionGateConfig(tolerance=0.005))
    assert decision.passed is passed
    assert words in decision.reason


def test_gate_on_a_loss_metric_is_a_ceiling():
    decision = decide_promotion(
        _report(0.8, None), PromotionGateConfig(gate_metric="log_loss", min_score=0.3)
    )
    assert not decision.passed
    assert "ceiling" in decision.reason


def test_unknown_gate_metric_is_an_error():
    with pytest.raises(ValueError, match="unknown gate metric"):
        decide_promotion(_report(0.8, None), PromotionGateConfig(gate_metric="auc"))


def test_threshold_metrics_match_scikit_learn():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 400)
    probability = np.clip(labels * 0.4 + rng.random(400) * 0.6, 0, 1)
    metrics = classification_metrics(labels, probability, threshold=0.45)
    predicted = probability >= 0.45
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, predicted))
    assert metrics["precision"] == pytest.approx(precision_score(labels, predicted))
    assert metrics["recall"] == pytest.approx(recall_score(labels, predicted))
    assert metrics["f1"] == pytest.approx(f1_score(labels, predicted))
    assert metrics["log_loss"] == pytest.approx(
        log_loss(labels, np.clip(probability, 1e-7, 1 - 1e-7))
    )


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
