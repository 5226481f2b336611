"""Registry: every change of the `champion` alias is a recorded decision.

The gate decides by default (this asset only runs in a retrain once the blocking gate check
passed); an operator can force a version, block a promotion or roll back, each with a reason.
Decisions are written as MLflow model version tags and Dagster metadata: an audit trail.
"""

import dataclasses
import datetime as dt
from enum import Enum
from typing import Literal

import dagster as dg
import mlflow
from pydantic import Field

from mlplatform.evaluation.gate import EvaluationReport
from mlplatform.model.registry import CHAMPION_ALIAS, ModelRef
from mlplatform.resources import MlflowTracking


class PromotionAction(Enum):
    """What `champion_model` does (lower-case names: Dagster run config names enum members)."""

    gate = "gate"
    force = "force"
    block = "block"
    rollback = "rollback"


class PromotionConfig(dg.Config):
    """How the champion is chosen: by the gate, or by an operator with a reason."""

    action: PromotionAction = Field(
        default=PromotionAction.gate,
        description="gate: follow the promotion gate. force: make `version` champion. block: keep "
        "the champion and deny the challenger. rollback: point champion back at `version`.",
    )
    version: str | None = Field(default=None, description="Model version for force and rollback.")
    reason: str | None = Field(
        default=None, description="Why (required for force, block and rollback)."
    )


PromotionOutcome = Literal["promoted", "kept", "denied", "forced", "rolled_back"]
"""What a promotion decision did (the ``promotion.decision`` tag and metadata value)."""


class StaleEvaluationError(RuntimeError):
    """The champion changed after the evaluation report was made: the comparison no longer holds."""


class PromotionRequestError(ValueError):
    """An operator's promotion request is incomplete or names a version that cannot serve."""


@dataclasses.dataclass(frozen=True)
class Decision:
    """One promotion decision: what was decided about which version, and the champion after it."""

    decision: PromotionOutcome
    subject_version: str
    champion_version: str
    reason: str

    @property
    def moves_alias(self) -> bool:
        """Whether the `champion` alias changes."""
        return self.decision in {"promoted", "forced", "rolled_back"}


def decide(
    config: PromotionConfig, report: EvaluationReport, current_version: str | None
) -> Decision:
    """Decide what happens to the champion, from the gate's verdict or an operator's request.

    Raises:
        PromotionRequestError: for an incomplete request, a rollback that does not go back, or
            nothing left to serve.
        StaleEvaluationError: when the gate decides on a report made against another champion.

    """
    action, challenger = config.action, report.challenger.version
    reason = (config.reason or "").strip()
    if action is not PromotionAction.gate and not reason:
        raise PromotionRequestError(f"action '{action.value}' needs a reason")
    if action in {PromotionAction.force, PromotionAction.rollback}:
        if not config.version:
            raise PromotionRequestError(f"action '{action.value}' needs a version")
        if action is PromotionAction.force:
            return Decision("forced", config.version, config.version, reason)
        if current_version is not None and int(config.version) >= int(current_version):
            raise PromotionRequestError(
                f"rollback must go to a version before champion v{current_version}, "
                f"got v{config.version}"
            )
        return Decision("rolled_back", config.version, config.version, reason)
    if action is PromotionAction.block:
        decision = Decision("denied", challenger, current_version or "", f"blocked: {reason}")
    else:
        evaluated_against = report.champion.version if report.champion else None
        if current_version not in (evaluated_against, challenger):
            raise StaleEvaluationError(
                f"champion is v{current_version} but the report compared against "
                f"v{evaluated_against}: re-materialize evaluation_report first"
            )
        if current_version == challenger:
            return Decision(
                "kept", challenger, challenger, f"v{challenger} is already the champion"
            )
        if report.gate is None or not report.gate.passed:
            reason = report.gate.reason if report.gate else "the report carries no gate verdict"
            decision = Decision("denied", challenger, current_version or "", reason)
        else:
            return Decision("promoted", challenger, challenger, report.gate.reason)
    if not decision.champion_version:
        raise PromotionRequestError(
            f"v{challenger} denied and there is no champion to keep: {reason}"
        )
    return decision


@dg.asset(group_name="registry", kinds={"mlflow"}, owners=["team:ml-platform"])
def champion_model(
    context: dg.AssetExecutionContext,
    config: PromotionConfig,
    evaluation_report: EvaluationReport,
    mlflow_tracking: MlflowTracking,
) -> dg.Output[ModelRef]:
    """The serving model: the MLflow `champion` alias, moved by the gate or an operator."""
    client = mlflow_tracking.client()
    name = mlflow_tracking.registered_model_name
    current = mlflow_tracking.version_by_alias(CHAMPION_ALIAS)
    current_version = str(current.version) if current is not None else None
    decision = decide(config, evaluation_report, current_version)
    champion = client.get_model_version(name, decision.champion_version)  # raises if unknown
    if decision.moves_alias:
        client.set_registered_model_alias(name, CHAMPION_ALIAS, decision.champion_version)
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    audit = {
        "promotion.decision": decision.decision,
        "promotion.reason": decision.reason,
        "promotion.previous_champion": current_version or "none",
        "promotion.dagster_run_id": context.run_id,
        "promotion.time": now,
    }
    for key, value in audit.items():
        client.set_model_version_tag(name, decision.subject_version, key, value)
    mlflow.set_tags(
        {"promotion.decision": decision.decision, "promotion.version": decision.subject_version}
    )
    context.log.info(
        f"{decision.decision} v{decision.subject_version}: {decision.reason}; "
        f"champion is v{decision.champion_version}"
    )
    ref = ModelRef(
        name, decision.champion_version, champion.run_id, champion.tags.get("algorithm", "unknown")
    )
    return dg.Output(
        ref,
        metadata={
            "champion_version": ref.version,
            "previous_champion": current_version or "none",
            "decision": decision.decision,
            "decided_version": decision.subject_version,
            "reason": decision.reason,
            "model_uri": ref.uri,
            "mlflow_run_id": ref.mlflow_run_id,
            "decided_at": now,
        },
    )
