import dagster as dg
from mlflow import MlflowClient

from mlplatform.defs.evaluation import evaluation_report
from mlplatform.defs.features import features
from mlplatform.defs.ingest import raw_data
from mlplatform.defs.registry import champion_model
from mlplatform.defs.training import CHAMPION_ALIAS, candidate_model

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


def test_second_run_compares_against_the_champion(training_resources, instance):
    assert dg.materialize(
        TRAIN_AND_PROMOTE, resources=training_resources, instance=instance
    ).success
    second = dg.materialize(TRAIN_AND_PROMOTE, resources=training_resources, instance=instance)
    assert second.success
    report = second.output_for_node("evaluation_report")
    assert (report.challenger.version, report.champion.version) == ("2", "1")
    version = MlflowClient().get_model_version_by_alias(report.challenger.name, CHAMPION_ALIAS)
    assert str(version.version) == "2"
    assert "vs champion v1" in version.tags["promotion.reason"]
    assert version.tags["promotion.previous_champion"] == "1"


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
