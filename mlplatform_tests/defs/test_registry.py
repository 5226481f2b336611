from typing import get_args

import dagster as dg
import pytest
from mlflow import MlflowClient

from mlplatform.cli import _rollout_text
from mlplatform.defs.evaluation import evaluation_report
from mlplatform.defs.features import features
from mlplatform.defs.ingest import raw_data
from mlplatform.defs.registry import (
    ROLLOUT_DECISION_TAG,
    PromotionConfig,
    PromotionOutcome,
    PromotionRequestError,
    champion_model,
    decide,
)
from mlplatform.defs.training import candidate_model
from mlplatform.evaluation.gate import EvaluationReport, GateDecision
from mlplatform.model.registry import CHAMPION_ALIAS, ModelRef
from mlplatform.resources import MlflowTracking

TRAIN_AND_PROMOTE = [raw_data, features, candidate_model, evaluation_report, champion_model]


def test_first_model_is_promoted_and_the_decision_recorded(training_resources, instance):
    result = dg.materialize(TRAIN_AND_PROMOTE, resources=training_resources, instance=instance)
    assert result.success
    champion = result.output_for_node("champion_model")
    version = MlflowClient().get_model_version_by_alias(champion.name, CHAMPION_ALIAS)
    assert str(version.version) == champion.version
    assert version.tags["promotion.decision"] == "promoted"
    assert "no champion yet" in version.tags["promotion.reason"]
    assert version.tags["promotion.dagster_run_id"] == result.run_id
    metadata = result.asset_materializations_for_node("champion_model")[0].metadata
    assert metadata["decision"].value == "promoted"


def test_second_run_compares_against_the_champion_and_starts_a_rollout(
    training_resources, instance
):
    assert dg.materialize(
        TRAIN_AND_PROMOTE, resources=training_resources, instance=instance
    ).success
    second = dg.materialize(TRAIN_AND_PROMOTE, resources=training_resources, instance=instance)
    assert second.success
    report = second.output_for_node("evaluation_report")
    assert (report.challenger.version, report.champion.version) == ("2", "1")
    # The gate passed: v2 enters the release in shadow, the champion stays v1 until it passes.
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("mlplatform", CHAMPION_ALIAS).version) == "1"
    tags = client.get_model_version("mlplatform", "2").tags
    assert tags["promotion.decision"] == "rollout_started"
    assert "vs champion v1" in tags["promotion.reason"]
    assert tags["promotion.previous_champion"] == "1"
    state = MlflowTracking().rollout_state()
    assert (state.challenger, state.stage, state.paused) == ("2", "shadow", False)
    metadata = second.asset_materializations_for_node("champion_model")[0].metadata
    assert metadata["decision"].value == "rollout_started"
    assert metadata["champion_version"].value == "1"
    assert metadata["rollout_id"].value == state.rollout_id
    assert second.output_for_node("champion_model").version == "1"
    # `make run` ends saying so, and how the rollout goes on.
    summary = _rollout_text(second.asset_materializations_for_node("champion_model")[0])
    assert "v2 passed the gate and is in shadow beside champion v1" in summary
    assert "python -m mlplatform rollout promote" in summary

    # A newer challenger replaces the rollout under way; the old one's is recorded superseded.
    third = dg.materialize(TRAIN_AND_PROMOTE, resources=training_resources, instance=instance)
    assert third.success
    assert MlflowTracking().rollout_state().challenger == "3"
    superseded = client.get_model_version("mlplatform", "2").tags
    assert superseded[ROLLOUT_DECISION_TAG] == "superseded"
    assert "v3" in superseded["rollout.reason"]
    metadata = third.asset_materializations_for_node("champion_model")[0].metadata
    assert metadata["superseded_rollout"].value == "v2 (shadow)"


def test_promotion_refuses_a_stale_evaluation(training_resources, instance):
    assert dg.materialize(
        TRAIN_AND_PROMOTE, resources=training_resources, instance=instance
    ).success
    # v2 is evaluated against champion v1 ...
    assert dg.materialize(
        TRAIN_AND_PROMOTE[:4], resources=training_resources, instance=instance
    ).success
    # ... then someone points the champion elsewhere before the promotion step runs.
    MlflowClient().delete_registered_model_alias("mlplatform", CHAMPION_ALIAS)
    result = dg.materialize(
        TRAIN_AND_PROMOTE,
        selection=[champion_model],
        resources=training_resources,
        instance=instance,
        raise_on_error=False,
    )
    assert not result.success
    failure = next(event for event in result.all_events if event.is_step_failure)
    assert "re-materialize evaluation_report" in str(failure.step_failure_data.error)
    assert MlflowClient().get_registered_model("mlplatform").aliases.get(CHAMPION_ALIAS) is None


def _report(challenger: str, champion: str | None, passed: bool) -> EvaluationReport:
    gate = GateDecision(passed, "gate says so", "roc_auc", 0.7, 0.7 if champion else None)
    return EvaluationReport(
        challenger=ModelRef("m", challenger, "r", "lightgbm"),
        challenger_metrics={"roc_auc": 0.7},
        champion=ModelRef("m", champion, "r0", "lightgbm") if champion else None,
        champion_metrics={"roc_auc": 0.7} if champion else None,
        champion_note="",
        test_rows=10,
        threshold=0.5,
        gate=gate,
    )


@pytest.mark.parametrize(
    ("config", "report", "current", "expected"),
    [
        (PromotionConfig(), _report("2", "1", True), "1", ("rollout_started", "2", "1")),
        (PromotionConfig(), _report("1", None, True), None, ("promoted", "1", "1")),
        (PromotionConfig(), _report("2", "1", False), "1", ("denied", "2", "1")),
        (PromotionConfig(), _report("2", "1", True), "2", ("kept", "2", "2")),
        (
            PromotionConfig(action="block", reason="audit"),
            _report("3", "2", True),
            "2",
            ("denied", "3", "2"),
        ),
        (
            PromotionConfig(action="force", version="1", reason="hotfix"),
            _report("3", "2", False),
            "2",
            ("forced", "1", "1"),
        ),
        (
            PromotionConfig(action="rollback", version="1", reason="bad"),
            _report("3", "2", True),
            "2",
            ("rolled_back", "1", "1"),
        ),
    ],
)
def test_decisions(config, report, current, expected):
    decision = decide(config, report, current)
    assert (decision.decision, decision.subject_version, decision.champion_version) == expected
    assert decision.reason
    assert decision.decision in get_args(PromotionOutcome)


@pytest.mark.parametrize(
    ("config", "current", "message"),
    [
        (PromotionConfig(action="force", version="1"), "2", "needs a reason"),
        (PromotionConfig(action="rollback", reason="bad"), "2", "needs a version"),
        (
            PromotionConfig(action="rollback", version="3", reason="bad"),
            "2",
            "must go to a version before",
        ),
        (PromotionConfig(action="block", reason="x"), None, "no champion to keep"),
    ],
)
def test_refused_requests(config, current, message):
    with pytest.raises(PromotionRequestError, match=message):
        decide(config, _report("3", current, True), current)


def test_force_promotion_from_the_launchpad_config(training_resources, instance):
    assert dg.materialize(
        TRAIN_AND_PROMOTE, resources=training_resources, instance=instance
    ).success
    assert dg.materialize(
        TRAIN_AND_PROMOTE, resources=training_resources, instance=instance
    ).success
    assert MlflowTracking().rollout_state().challenger == "2"
    result = dg.materialize(
        TRAIN_AND_PROMOTE,
        selection=[champion_model],
        resources=training_resources,
        instance=instance,
        run_config={
            "ops": {
                "champion_model": {
                    "config": {"action": "force", "version": "2", "reason": "pin v2"}
                }
            }
        },
    )
    assert result.success
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("mlplatform", CHAMPION_ALIAS).version) == "2"
    tags = client.get_model_version("mlplatform", "2").tags
    assert (tags["promotion.decision"], tags["promotion.reason"]) == ("forced", "pin v2")
    assert tags["promotion.previous_champion"] == "1"
    # A forced decision acts at once and ends the rollout under way.
    assert MlflowTracking().rollout_state() is None
    assert tags[ROLLOUT_DECISION_TAG] == "ended"
    metadata = result.asset_materializations_for_node("champion_model")[0].metadata
    assert metadata["ended_rollout"].value == "v2 (shadow)"
