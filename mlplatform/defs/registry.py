"""Registry: promote the challenger to `champion` (it only runs once the blocking gate passed)."""

import datetime as dt

import dagster as dg
import mlflow

from mlplatform.defs.evaluation import EvaluationReport, PromotionGateConfig, decide_promotion
from mlplatform.defs.training import CHAMPION_ALIAS, ModelRef
from mlplatform.resources import MlflowTracking


class StaleEvaluationError(RuntimeError):
    """The champion changed after the evaluation report was made: the comparison no longer holds."""


@dg.asset(group_name="registry", kinds={"mlflow"}, owners=["team:ml-platform"])
def champion_model(
    context: dg.AssetExecutionContext,
    config: PromotionGateConfig,
    evaluation_report: EvaluationReport,
    mlflow_tracking: MlflowTracking,
) -> dg.Output[ModelRef]:
    """The serving model: the MLflow `champion` alias, moved only through the promotion gate."""
    current = mlflow_tracking.version_by_alias(CHAMPION_ALIAS)
    current_version = str(current.version) if current is not None else None
    evaluated_against = evaluation_report.champion.version if evaluation_report.champion else None
    challenger = evaluation_report.challenger
    if current_version not in (evaluated_against, challenger.version):
        raise StaleEvaluationError(
            f"champion is v{current_version} but the report compared against v{evaluated_against}: "
            "re-materialize evaluation_report first"
        )
    gate = decide_promotion(evaluation_report, config)
    if not gate.passed:
        raise RuntimeError(f"promotion gate failed: {gate.reason}")

    client = mlflow_tracking.client()
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    if current_version == challenger.version:
        decision = "kept"
        reason = f"v{challenger.version} is already the champion"
    else:
        decision = "promoted"
        reason = gate.reason
        client.set_registered_model_alias(challenger.name, CHAMPION_ALIAS, challenger.version)
    audit = {
        "promotion.decision": decision,
        "promotion.reason": reason,
        "promotion.previous_champion": current_version or "none",
        "promotion.dagster_run_id": context.run_id,
        "promotion.time": now,
    }
    for key, value in audit.items():
        client.set_model_version_tag(challenger.name, challenger.version, key, value)
    mlflow.set_tags({"promotion.decision": decision, "promotion.version": challenger.version})
    context.log.info(f"{decision} v{challenger.version}: {reason}")
    return dg.Output(
        challenger,
        metadata={
            "champion_version": challenger.version,
            "previous_champion": current_version or "none",
            "decision": decision,
            "reason": reason,
            "model_uri": challenger.uri,
            "mlflow_run_id": challenger.mlflow_run_id,
            "decided_at": now,
        },
    )
