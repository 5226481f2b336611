"""Registry: every change of the `champion` alias is a recorded decision.

The gate decides by default (this asset only runs in a retrain once the blocking gate check
passed): a challenger that passes it beside a champion starts a rollout (it enters the release in
``shadow``; the `champion` alias moves only when the rollout promotes it, see
:mod:`mlplatform.defs.rollout`), and the first model of all is promoted at once. An operator can
force a version, block a promotion or roll back, each with a reason; these act at once and end
any rollout under way. A version that cannot be loaded and score is never made champion nor
rolled out, whoever asks. Decisions are written as MLflow model version tags and Dagster
metadata: an audit trail.
"""

import dataclasses
import datetime as dt
from enum import Enum
from typing import Any, Literal

import dagster as dg
import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from pydantic import Field

from mlplatform.evaluation.gate import EvaluationReport
from mlplatform.model.registry import CHAMPION_ALIAS, ModelRef
from mlplatform.monitoring.rollout import load_rollout_settings
from mlplatform.resources import MlflowTracking
from mlplatform.serving.preflight import UnservableModel, preflight
from mlplatform.serving.release import RolloutState


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


PromotionOutcome = Literal[
    "promoted", "rollout_started", "kept", "denied", "forced", "rolled_back", "reverted"
]
"""What a promotion decision did (the ``promotion.decision`` tag and metadata value).

``rollout_started``: the challenger passed the gate and entered the release in shadow beside the
champion, which stays. ``reverted``: the alias went back to the version the endpoint serves,
because the version it named could not be deployed.
"""

ROLLOUT_DECISION_TAG = "rollout.decision"
"""The model version tag naming how its rollout ended (promoted, rolled_back, superseded, ...)."""


class StaleEvaluationError(RuntimeError):
    """The champion changed after the evaluation report was made: the comparison no longer holds."""


class PromotionRequestError(ValueError):
    """An operator's promotion request is incomplete or names a version that cannot serve."""


class UnservableVersionError(RuntimeError):
    """The version a decision would make champion cannot be loaded or cannot score."""


class NoChampionError(RuntimeError):
    """The registry has no `champion` alias: there is nothing to serve yet."""


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
        return self.decision in {"promoted", "forced", "rolled_back", "reverted"}


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
        elif current_version is None:
            return Decision("promoted", challenger, challenger, report.gate.reason)
        else:
            return Decision(
                "rollout_started",
                challenger,
                current_version,
                f"{report.gate.reason}; rolled out in shadow beside champion v{current_version}",
            )
    if not decision.champion_version:
        raise PromotionRequestError(
            f"v{challenger} denied and there is no champion to keep: {reason}"
        )
    return decision


def record_decision(
    client: MlflowClient,
    name: str,
    decision: Decision,
    previous_champion: str | None,
    dagster_run_id: str,
) -> dict[str, str]:
    """Write a decision on its subject version as ``promotion.*`` tags: the audit trail.

    Returns:
        The tags written (decision, reason, previous champion, Dagster run, time).

    """
    audit = {
        "promotion.decision": decision.decision,
        "promotion.reason": decision.reason,
        "promotion.previous_champion": previous_champion or "none",
        "promotion.dagster_run_id": dagster_run_id,
        "promotion.time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    for key, value in audit.items():
        client.set_model_version_tag(name, decision.subject_version, key, value)
    return audit


def record_rollout_end(
    client: MlflowClient, name: str, version: str, outcome: str, reason: str, run_id: str
) -> dict[str, str]:
    """Write how a version's rollout ended as ``rollout.*`` tags on it.

    Returns:
        The tags written (outcome, reason, Dagster run, time).

    """
    tags = {
        ROLLOUT_DECISION_TAG: outcome,
        "rollout.reason": reason,
        "rollout.dagster_run_id": run_id,
        "rollout.time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    return tags


def end_rollout(
    tracking: MlflowTracking, outcome: str, reason: str, run_id: str
) -> RolloutState | None:
    """End the rollout under way, if any, leaving the `champion` alias alone.

    The rollout is cleared from the registry and why it ended is recorded on its challenger.

    Returns:
        The rollout that was ended, or ``None`` when none was under way.

    """
    state = tracking.rollout_state()
    if state is None:
        return None
    client, name = tracking.client(), tracking.registered_model_name
    tracking.set_rollout_state(None)
    record_rollout_end(client, name, state.challenger, outcome, reason, run_id)
    return state


def start_rollout(
    tracking: MlflowTracking, challenger: str, canary_share: float, run_id: str
) -> tuple[RolloutState, RolloutState | None]:
    """Put ``challenger`` in the release in shadow, superseding another's rollout under way.

    A rollout of the same challenger already under way is kept as it is (its evidence too).

    Returns:
        The rollout under way now, and the one it superseded (``None`` if none).

    """
    current = tracking.rollout_state()
    if current is not None and current.challenger == challenger:
        return current, None
    superseded = None
    if current is not None:
        superseded = end_rollout(
            tracking, "superseded", f"superseded by the rollout of v{challenger}", run_id
        )
    state = RolloutState.begin(challenger, canary_share)
    tracking.set_rollout_state(state)
    return state, superseded


def model_ref(version: ModelVersion) -> ModelRef:
    """The reference assets hand on for a registered model version."""
    return ModelRef(
        version.name, str(version.version), version.run_id, version.tags.get("algorithm", "unknown")
    )


def current_champion(tracking: MlflowTracking) -> ModelRef:
    """The version the registry's `champion` alias names now.

    Raises:
        NoChampionError: when there is no champion yet.
        RegistryUnavailable: when the registry does not answer (never read as no champion).

    """
    champion = tracking.version_by_alias(CHAMPION_ALIAS)
    if champion is None:
        raise NoChampionError(
            f"model {tracking.registered_model_name} has no champion yet: train one first "
            "(`python -m mlplatform run`)"
        )
    return model_ref(champion)


def revert_champion(
    tracking: MlflowTracking, failed_version: str, serving_version: str, reason: str, run_id: str
) -> Decision | None:
    """Point `champion` back at the version the endpoint serves, after another failed to deploy.

    The decision is recorded on the failed version, like every other. Nothing changes when the
    alias no longer names ``failed_version`` (someone moved it since) or when the registry has
    no ``serving_version`` (the endpoint serves a model of another registry).

    Returns:
        The decision, or ``None`` when the alias was left alone.

    """
    client, name = tracking.client(), tracking.registered_model_name
    current = tracking.version_by_alias(CHAMPION_ALIAS)
    if current is None or str(current.version) != failed_version:
        return None
    try:
        client.get_model_version(name, serving_version)
    except MlflowException:
        return None
    decision = Decision("reverted", failed_version, serving_version, reason)
    client.set_registered_model_alias(name, CHAMPION_ALIAS, serving_version)
    record_decision(client, name, decision, failed_version, run_id)
    return decision


def _refuse_unless_servable(
    tracking: MlflowTracking,
    candidate: ModelRef,
    decision: Decision,
    current_version: str | None,
    run_id: str,
) -> None:
    """Load the version a decision makes champion and score with it; refuse it if that fails.

    The refusal is recorded on the version (``denied``, with the load or scoring error) and the
    alias stays where it is.

    Raises:
        UnservableVersionError: naming the cause, when the version cannot serve.

    """
    try:
        preflight(candidate.uri, tracking.tracking_uri)
    except UnservableModel as error:
        done = {"rollout_started": "rolled out"}.get(
            decision.decision, decision.decision.replace("_", " ")
        )
        refused = Decision(
            "denied", decision.subject_version, current_version or "", f"not {done}: {error}"
        )
        record_decision(tracking.client(), candidate.name, refused, current_version, run_id)
        mlflow.set_tags({"promotion.decision": "denied", "promotion.version": candidate.version})
        kept = f"v{current_version}" if current_version else "none"
        # The cause is in the message: the run's failure names it, not its innermost frame.
        raise UnservableVersionError(
            f"v{candidate.version} cannot serve, so it was not {done}; the champion stays "
            f"{kept}: {error}"
        ) from None


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
    ref = model_ref(client.get_model_version(name, decision.champion_version))  # raises if unknown
    run_id = context.run.run_id
    rollout: dict[str, Any] = {}
    if decision.moves_alias:
        _refuse_unless_servable(mlflow_tracking, ref, decision, current_version, run_id)
        client.set_registered_model_alias(name, CHAMPION_ALIAS, decision.champion_version)
        # An operator's decision acts at once: whatever was being rolled out stops.
        ended = end_rollout(
            mlflow_tracking,
            "ended",
            f"{decision.decision} v{decision.subject_version}: {decision.reason}",
            run_id,
        )
        if ended is not None:
            rollout["ended_rollout"] = f"v{ended.challenger} ({ended.stage})"
    elif decision.decision == "rollout_started":
        challenger = model_ref(client.get_model_version(name, decision.subject_version))
        # Both models load in every replica: one that cannot serve never enters the release.
        _refuse_unless_servable(mlflow_tracking, challenger, decision, current_version, run_id)
        state, superseded = start_rollout(
            mlflow_tracking,
            decision.subject_version,
            load_rollout_settings().policy.canary_share,
            run_id,
        )
        rollout = {"rollout_stage": state.stage, "rollout_id": state.rollout_id}
        if superseded is not None:
            rollout["superseded_rollout"] = f"v{superseded.challenger} ({superseded.stage})"
    elif decision.decision == "denied":
        state = mlflow_tracking.rollout_state()
        if state is not None and state.challenger == decision.subject_version:
            end_rollout(mlflow_tracking, "ended", decision.reason, run_id)
            rollout["ended_rollout"] = f"v{state.challenger} ({state.stage})"
    audit = record_decision(client, name, decision, current_version, run_id)
    mlflow.set_tags(
        {"promotion.decision": decision.decision, "promotion.version": decision.subject_version}
    )
    context.log.info(
        f"{decision.decision} v{decision.subject_version}: {decision.reason}; "
        f"champion is v{decision.champion_version}"
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
            "decided_at": audit["promotion.time"],
            **rollout,
        },
    )
