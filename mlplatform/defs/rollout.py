"""The rollout's control plane: judge the challenger in the release on live evidence, and act.

A challenger that passed the gate is in the release in ``shadow`` (see ``champion_model``).
``rollout_report`` gathers what the endpoint recorded of the stage (per-version counts, the
shadow's paired scores, labelled records), asks the pure rules of
:mod:`mlplatform.monitoring.rollout` for a verdict, applies it to the registry (shadow -> canary,
canary -> the `champion` alias, or rolled back) and records every number as metadata and MLflow
tags; ``rollout_job`` then runs ``model_endpoint``, so the endpoint serves the new release. An
operator acts through the same asset's config: pause, resume, promote or abort now, with a
reason. ``rollout_sensor`` judges on every tick, cheaply and without a run, and requests a
``rollout_job`` run when the verdict is to move on or roll back.
"""

import dataclasses
import json
import time
from enum import Enum
from typing import Any

import dagster as dg
from pydantic import Field

from mlplatform.defs.registry import (
    Decision,
    end_rollout,
    record_decision,
    record_rollout_end,
)
from mlplatform.defs.serving import deploy_in_progress
from mlplatform.model.registry import (
    CHAMPION_ALIAS,
    ModelRef,
    RegistryUnavailable,
    load_tabular_model,
)
from mlplatform.monitoring.feedback import FeedbackStore
from mlplatform.monitoring.profiles import reference_profile_path, reference_sidecar
from mlplatform.monitoring.rollout import (
    RolloutCursor,
    RolloutEvidence,
    RolloutPolicy,
    RolloutVerdict,
    StageUnderWay,
    decide_rollout,
    decide_rollout_tick,
    gather_evidence,
    load_rollout_settings,
)
from mlplatform.monitoring.rules import load_monitoring_settings, post_alert
from mlplatform.resources import MlflowTracking
from mlplatform.serving.release import RolloutState
from mlplatform.settings import PlatformSettings, load_settings
from mlplatform.tasks.strategies import strategy_for

ROLLOUT_JOB_NAME = "rollout_job"


class RolloutRequestError(ValueError):
    """An operator's rollout request cannot be carried out (no rollout, no reason)."""


class RolloutAction(Enum):
    """What `rollout_report` does (lower-case names: Dagster run config names enum members)."""

    judge = "judge"
    pause = "pause"
    resume = "resume"
    promote = "promote"
    abort = "abort"


class RolloutConfig(dg.Config):
    """Judge the rollout on its evidence, or act on it by hand; the policy's bounds per run."""

    action: RolloutAction = Field(
        default=RolloutAction.judge,
        description="judge: apply the rules to the live evidence (advance, roll back or wait). "
        "pause / resume: stop or restart the sensor's judging. promote: make the challenger "
        "champion now. abort: roll the challenger back now.",
    )
    reason: str | None = Field(
        default=None, description="Why (required for promote and abort; recorded)."
    )
    min_requests: int | None = Field(
        default=None,
        description="Requests the challenger must score in a stage; default "
        f"MLPLATFORM_ROLLOUT_MIN_REQUESTS or {RolloutPolicy.min_requests}.",
    )
    min_seconds: float | None = Field(
        default=None,
        description="Seconds a stage must last; default MLPLATFORM_ROLLOUT_MIN_SECONDS or "
        f"{RolloutPolicy.min_seconds}.",
    )
    min_labels: int | None = Field(
        default=None,
        description="Labelled records before the canary is promoted; default "
        f"MLPLATFORM_ROLLOUT_MIN_LABELS or {RolloutPolicy.min_labels}.",
    )
    canary_share: float | None = Field(
        default=None,
        description="Share of requests the challenger answers in canary; default "
        f"MLPLATFORM_ROLLOUT_CANARY_SHARE or {RolloutPolicy.canary_share}.",
    )

    def policy(self) -> RolloutPolicy:
        """The settings' policy with this run's overrides."""
        overrides = {
            name: getattr(self, name)
            for name in ("min_requests", "min_seconds", "min_labels", "canary_share")
            if getattr(self, name) is not None
        }
        return dataclasses.replace(load_rollout_settings().policy, **overrides)


@dataclasses.dataclass(frozen=True)
class Judgement:
    """One look at a rollout: the state, the champion beside it, the evidence and the verdict."""

    state: RolloutState
    champion: str
    evidence: RolloutEvidence
    verdict: RolloutVerdict


def _task_of(tracking: MlflowTracking, settings: PlatformSettings, version: str) -> tuple[str, Any]:
    """The model's task and positive class, from the description of its reference profile.

    Falls back to the task logged with the version's MLflow run (positive class then unknown:
    binary labels must be 0/1), and for a version registered by hand, with neither, to the
    spec inside the model itself.
    """
    client = tracking.client()
    model = client.get_model_version(tracking.registered_model_name, version)
    data_version = model.tags.get("data_version")
    if data_version:
        sidecar = reference_sidecar(reference_profile_path(settings.profiles_dir, data_version))
        if sidecar.exists():
            description = json.loads(sidecar.read_text())
            strategy = strategy_for(description["task"])
            return strategy.name, strategy.positive_class(description["classes"])
    params = client.get_run(model.run_id).data.params if model.run_id else {}
    if "task" in params:
        return params["task"], None
    ref = ModelRef(tracking.registered_model_name, version, model.run_id or "", "unknown")
    spec = load_tabular_model(ref).spec
    return spec.task, spec.strategy.positive_class(spec.classes)


def judge(
    tracking: MlflowTracking, policy: RolloutPolicy, now: float | None = None
) -> Judgement | str:
    """Gather the rollout's live evidence and apply the rules to it (nothing is changed).

    Returns:
        The judgement, or a sentence saying why there is nothing to judge.

    Raises:
        RegistryUnavailable: the registry did not answer (never read as "no rollout").

    """
    now = time.time() if now is None else now
    state = tracking.rollout_state()
    if state is None:
        return "no rollout under way"
    champion = tracking.version_by_alias(CHAMPION_ALIAS)
    if champion is None:
        return f"v{state.challenger} is in rollout but there is no champion"
    if state.challenger == str(champion.version):
        return f"v{state.challenger} is already the champion"
    settings = load_settings()
    task, positive = _task_of(tracking, settings, state.challenger)
    evidence = gather_evidence(
        StageUnderWay(state.challenger, state.stage, state.rollout_id, state.stage_since),
        str(champion.version),
        tracking.registered_model_name,
        settings.traffic_dir,
        FeedbackStore(settings.feedback_db),
        task,
        positive,
        now,
    )
    return Judgement(state, str(champion.version), evidence, decide_rollout(evidence, policy))


def evidence_numbers(evidence: RolloutEvidence) -> dict[str, Any]:
    """Every number of the evidence, flat, as metadata and tags record them."""
    numbers: dict[str, Any] = {"seconds_in_stage": round(evidence.seconds_in_stage, 1)}
    for role, traffic in (("champion", evidence.champion), ("challenger", evidence.challenger)):
        numbers |= {
            f"{role}_requests": traffic.requests,
            f"{role}_errors": traffic.errors,
            f"{role}_error_rate": round(traffic.error_rate, 5),
            f"{role}_p99_ms": round(traffic.p99_ms, 2) if traffic.p99_ms is not None else None,
        }
    if evidence.shadow is not None:
        shadow = evidence.shadow
        numbers |= {
            "shadow_rows": shadow.rows,
            "agreement": round(shadow.agreement, 4),
            "score_shift": round(shadow.score_shift, 4),
            "distribution_distance": round(shadow.distribution_distance, 4),
        }
    if evidence.labelled is not None:
        labelled = evidence.labelled
        numbers |= {
            "labels": labelled.labels,
            "labelled_metric": labelled.metric,
            "difference": round(labelled.difference.point, 4),
            "difference_low": round(labelled.difference.low, 4),
            "difference_high": round(labelled.difference.high, 4),
        }
    return numbers


def judgement_metadata(judgement: Judgement, policy: RolloutPolicy) -> dict[str, Any]:
    """What the UI shows of a judgement: the release, the verdict, its reasons, every number."""
    state, verdict = judgement.state, judgement.verdict
    reasons = "\n".join(f"- {reason}" for reason in verdict.reasons)
    return {
        "champion_version": judgement.champion,
        "challenger_version": state.challenger,
        "rollout_id": state.rollout_id,
        "stage": state.stage,
        "paused": state.paused,
        "verdict": verdict.action,
        "stage_after": verdict.stage,
        "reasons": dg.MetadataValue.md(reasons or "-"),
        "evidence": dg.MetadataValue.json(evidence_numbers(judgement.evidence)),
        "policy": dg.MetadataValue.json(dataclasses.asdict(policy)),
    }


def _tag_verdict(tracking: MlflowTracking, judgement: Judgement, run_id: str) -> None:
    """The latest verdict and its numbers on the challenger (MLflow's view of the rollout)."""
    client, name = tracking.client(), tracking.registered_model_name
    verdict = judgement.verdict
    tags = {
        "rollout.stage": judgement.state.stage,
        "rollout.verdict": verdict.action,
        "rollout.reasons": "; ".join(verdict.reasons)[:4000],
        "rollout.evidence": json.dumps(evidence_numbers(judgement.evidence))[:4000],
        "rollout.judged_by": run_id,
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, judgement.state.challenger, key, value)


def _alert_rollback(challenger: str, champion: str, reason: str, run_id: str) -> str | None:
    """Post a rolled-back challenger to the alert webhook; the error, if posting failed."""
    webhook = load_monitoring_settings().alert_webhook
    if not webhook:
        return None
    text = f"mlplatform: v{challenger} rolled back, v{champion} stays champion: {reason}"
    payload = {"text": text, "run_id": run_id, "challenger": challenger, "champion": champion}
    return post_alert(webhook, payload)


def promote(tracking: MlflowTracking, state: RolloutState, reason: str, run_id: str) -> str:
    """Make the rollout's challenger the champion and end the rollout; the previous champion."""
    client, name = tracking.client(), tracking.registered_model_name
    previous = tracking.version_by_alias(CHAMPION_ALIAS)
    previous_version = str(previous.version) if previous is not None else None
    client.set_registered_model_alias(name, CHAMPION_ALIAS, state.challenger)
    tracking.set_rollout_state(None)
    record_rollout_end(client, name, state.challenger, "promoted", reason, run_id)
    decision = Decision("promoted", state.challenger, state.challenger, reason)
    record_decision(client, name, decision, previous_version, run_id)
    return previous_version or "none"


def apply_verdict(
    tracking: MlflowTracking, judgement: Judgement, run_id: str, now: float | None = None
) -> str:
    """Carry out a verdict in the registry; what was done, as a sentence.

    ``advance`` from shadow puts the challenger in canary (a new stage of evidence); from canary
    it moves the `champion` alias to it and ends the rollout. ``roll_back`` ends the rollout,
    leaves the alias where it is, and alerts. ``wait`` changes nothing.
    """
    state, verdict = judgement.state, judgement.verdict
    reasons = "; ".join(verdict.reasons)
    if verdict.action == "wait":
        return f"v{state.challenger} stays in {state.stage}: {reasons}"
    if verdict.action == "roll_back":
        end_rollout(tracking, "rolled_back", reasons, run_id)
        alert = _alert_rollback(state.challenger, judgement.champion, reasons, run_id)
        done = f"v{state.challenger} rolled back, v{judgement.champion} stays champion: {reasons}"
        return done + (f" (alert failed: {alert})" if alert else "")
    if verdict.stage == "canary":
        now = time.time() if now is None else now
        tracking.set_rollout_state(state.model_copy(update={"stage": "canary", "stage_since": now}))
        return f"v{state.challenger} advanced to canary ({state.canary_share:.0%}): {reasons}"
    promote(tracking, state, f"passed its rollout: {reasons}", run_id)
    return f"v{state.challenger} promoted to champion (was v{judgement.champion}): {reasons}"


def _act_by_hand(
    tracking: MlflowTracking, config: RolloutConfig, state: RolloutState, run_id: str
) -> str:
    """Carry out an operator's pause, resume, promote or abort; what was done."""
    reason = (config.reason or "").strip()
    action = config.action
    if action in {RolloutAction.promote, RolloutAction.abort} and not reason:
        raise RolloutRequestError(f"action '{action.value}' needs a reason")
    if action is RolloutAction.pause:
        tracking.set_rollout_state(state.model_copy(update={"paused": True}))
        return f"rollout of v{state.challenger} paused in {state.stage}"
    if action is RolloutAction.resume:
        tracking.set_rollout_state(state.model_copy(update={"paused": False}))
        return f"rollout of v{state.challenger} resumed in {state.stage}"
    if action is RolloutAction.promote:
        previous = promote(tracking, state, f"promoted by hand: {reason}", run_id)
        return f"v{state.challenger} promoted by hand (was v{previous}): {reason}"
    end_rollout(tracking, "rolled_back", f"aborted by hand: {reason}", run_id)
    champion = tracking.version_by_alias(CHAMPION_ALIAS)
    kept = str(champion.version) if champion is not None else "none"
    alert = _alert_rollback(state.challenger, kept, f"aborted by hand: {reason}", run_id)
    done = f"v{state.challenger} rolled back by hand: {reason}"
    return done + (f" (alert failed: {alert})" if alert else "")


@dg.asset(group_name="monitoring", kinds={"mlflow"}, owners=["team:ml-platform"])
def rollout_report(
    context: dg.AssetExecutionContext, config: RolloutConfig, mlflow_tracking: MlflowTracking
) -> dg.Output[dict[str, Any]]:
    """The challenger in the release judged on live evidence: stage, verdict and every number."""
    policy = config.policy()
    run_id = context.run.run_id
    if config.action is not RolloutAction.judge:
        return _by_hand(context, config, mlflow_tracking, policy)
    judgement = judge(mlflow_tracking, policy)
    if isinstance(judgement, str):
        summary = f"Nothing to judge: {judgement}."
        context.log.info(summary)
        return dg.Output({"summary": summary}, metadata={"summary": summary, "verdict": "none"})
    _tag_verdict(mlflow_tracking, judgement, run_id)
    if judgement.state.paused:
        done = f"rollout of v{judgement.state.challenger} is paused: the verdict is not applied"
    else:
        done = apply_verdict(mlflow_tracking, judgement, run_id)
    context.log.info(done)
    return dg.Output(
        {"summary": done, "verdict": judgement.verdict.action},
        metadata=judgement_metadata(judgement, policy) | _after(mlflow_tracking, config, done),
    )


def _by_hand(
    context: dg.AssetExecutionContext,
    config: RolloutConfig,
    tracking: MlflowTracking,
    policy: RolloutPolicy,
) -> dg.Output[dict[str, Any]]:
    """An operator's action, with the evidence as it stood when it was taken (when readable)."""
    state = tracking.rollout_state()
    if state is None:
        raise RolloutRequestError(f"cannot {config.action.value}: no rollout under way")
    try:
        judgement = judge(tracking, policy)
    except (ValueError, KeyError, OSError) as error:
        # The action does not depend on the evidence; its record only lacks it.
        context.log.warning(f"the evidence could not be read: {error}")
        judgement = None
    metadata: dict[str, Any] = {"challenger_version": state.challenger, "stage": state.stage}
    if isinstance(judgement, Judgement):
        metadata = judgement_metadata(judgement, policy)
    done = _act_by_hand(tracking, config, state, context.run.run_id)
    context.log.info(done)
    return dg.Output(
        {"summary": done, "verdict": config.action.value},
        metadata=metadata | {"verdict": config.action.value} | _after(tracking, config, done),
    )


def _after(tracking: MlflowTracking, config: RolloutConfig, done: str) -> dict[str, Any]:
    """What the release is after the run: its stage and champion, and what the run did."""
    after = tracking.rollout_state()
    return {
        "summary": done,
        "action": config.action.value,
        "reason": config.reason or "",
        "stage_now": after.stage if after is not None else "none",
        "champion_now": _champion_now(tracking),
    }


def _champion_now(tracking: MlflowTracking) -> str:
    champion = tracking.version_by_alias(CHAMPION_ALIAS)
    return str(champion.version) if champion is not None else "none"


# The interval is part of the sensor's definition, read when the definitions load (as the other
# sensors' are); everything a tick decides on is read by the tick.
@dg.sensor(
    job_name=ROLLOUT_JOB_NAME,
    minimum_interval_seconds=load_rollout_settings().interval_s,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Judges the challenger in the release on its live evidence on every tick and "
    "requests a rollout_job run to advance it (shadow -> canary -> champion) or roll it back.",
)
def rollout_sensor(
    context: dg.SensorEvaluationContext, mlflow_tracking: MlflowTracking
) -> dg.SensorResult:
    """Move the rollout on when its evidence says so; record each new verdict on rollout_report."""
    cursor = RolloutCursor.parse(context.cursor)
    settings = load_rollout_settings()
    try:
        judgement = judge(mlflow_tracking, settings.policy)
    except RegistryUnavailable as error:
        return dg.SensorResult(
            skip_reason=f"The registry did not answer, nothing decided: {error}",
            cursor=cursor.dump(),
        )
    if isinstance(judgement, str):
        return dg.SensorResult(
            skip_reason=f"Nothing to judge: {judgement}.", cursor=RolloutCursor().dump()
        )
    state = judgement.state
    if state.paused:
        return dg.SensorResult(
            skip_reason=f"The rollout of v{state.challenger} is paused in {state.stage}.",
            cursor=cursor.dump(),
        )
    tick = decide_rollout_tick(
        state.rollout_id,
        judgement.verdict,
        state.stage,
        cursor,
        now=time.time(),
        run_in_progress=deploy_in_progress(context.instance),  # a rollout run among them
        history_s=settings.history_s,
    )
    events = []
    if tick.changed:
        events.append(
            dg.AssetObservation(
                asset_key="rollout_report",
                metadata=judgement_metadata(judgement, settings.policy)
                | {"sensor_decision": tick.reason},
            )
        )
    if not tick.run or tick.run_key is None:
        return dg.SensorResult(
            skip_reason=tick.reason, cursor=tick.cursor.dump(), asset_events=events
        )
    context.log.info(f"requesting a rollout run: {tick.reason}")
    request = dg.RunRequest(
        run_key=tick.run_key,
        tags={"mlplatform/trigger": "rollout", "mlplatform/verdict": judgement.verdict.action},
    )
    return dg.SensorResult(run_requests=[request], cursor=tick.cursor.dump(), asset_events=events)
