"""Monitoring: the drift report on live traffic, and the sensors that close the loop.

``drift_report`` compares the champion's live traffic (rolling whylogs profiles written by the
endpoint) with the reference profile of the data it was trained on. ``drift_sensor`` runs the
same comparison on every tick and requests a retrain when enough of the features drifted;
``freshness_sensor`` requests one when the data or the model is older than its freshness window;
``run_failure_alert`` posts failed runs to a webhook. The decisions themselves are the pure
functions of :mod:`mlplatform.monitoring.rules`.
"""

import base64
import dataclasses
import datetime as dt
import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import dagster as dg
from whylogs.core import DatasetProfileView

from mlplatform.defs.serving import run_in_progress
from mlplatform.model.registry import CHAMPION_ALIAS
from mlplatform.monitoring import drift
from mlplatform.monitoring.drift_summary import DriftSummary, write_drift_summary
from mlplatform.monitoring.feedback import FeedbackStore, live_performance
from mlplatform.monitoring.profiles import (
    SkippedFile,
    load_traffic_profiles,
    reference_profile_path,
    reference_sidecar,
)
from mlplatform.monitoring.rules import (
    DriftCursor,
    DriftEvidence,
    MonitoringSettings,
    alert_payload,
    decide_drift,
    freshness_run_key,
    load_monitoring_settings,
    post_alert,
    stale_assets,
)
from mlplatform.resources import MlflowTracking
from mlplatform.settings import PlatformSettings, load_settings
from mlplatform.tasks.strategies import strategy_for

RETRAIN_JOB_NAME = "retrain_job"


@dataclasses.dataclass(frozen=True)
class TrafficAssessment:
    """The champion's live traffic compared with its training data.

    Attributes:
        evidence: the verdict and what it rests on.
        reference_path: the reference profile compared against.
        since: the start of the window compared (the promotion, or the lookback's start).
        window_end: the end of the newest traffic window merged.
        traffic: the merged traffic profile.
        live_performance: metrics on traffic rows with ground-truth labels, if any.
        skipped: traffic window files left out because they could not be read.

    """

    evidence: DriftEvidence
    reference_path: Path
    since: dt.datetime
    window_end: dt.datetime
    traffic: DatasetProfileView
    live_performance: dict[str, Any] | None
    skipped: tuple[SkippedFile, ...]


def _parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def assess_traffic(
    tracking: MlflowTracking, settings: PlatformSettings, monitoring: MonitoringSettings
) -> TrafficAssessment | str:
    """Compare the champion's recent traffic with the reference profile of its training data.

    Only windows since the champion's promotion and within the lookback are merged.

    Returns:
        The assessment, or a sentence saying why there is nothing to compare yet.

    """
    champion = tracking.version_by_alias(CHAMPION_ALIAS)
    if champion is None:
        return "no champion yet"
    version = str(champion.version)
    data_version = champion.tags.get("data_version")
    reference_path = (
        reference_profile_path(settings.profiles_dir, data_version) if data_version else None
    )
    if reference_path is None or not reference_path.exists():
        return f"no reference profile for v{version} (data version {data_version})"
    description = json.loads(reference_sidecar(reference_path).read_text())
    promoted = _parse_time(champion.tags.get("promotion.time"))
    recent = dt.datetime.now(dt.UTC) - monitoring.drift_lookback
    since = max(promoted, recent) if promoted else recent
    traffic = load_traffic_profiles(
        settings.traffic_dir, tracking.registered_model_name, version=version, since=since
    )
    if traffic.view is None:
        unreadable = f" ({_skipped_summary(traffic.skipped)})" if traffic.skipped else ""
        return f"no traffic profiles for v{version} since {since:%Y-%m-%d %H:%M:%S} UTC{unreadable}"
    result = drift.compare_profiles(
        DatasetProfileView.read(str(reference_path)),
        traffic.view,
        monitoring.thresholds,
        columns=[
            name
            for name, kind in description["features"].items()
            # Timestamps move on by nature; their seasonality is not a distribution to compare.
            if kind != "datetime" and name in traffic.view.get_columns()
        ],
    )
    labelled = FeedbackStore(settings.feedback_db).labelled(
        model_version=version, since=since, model_name=tracking.registered_model_name
    )
    performance = None
    if not labelled.empty:
        strategy = strategy_for(description["task"])
        positive = strategy.positive_class(description["classes"])
        performance = live_performance(labelled, strategy.name, positive_class=positive)
    return TrafficAssessment(
        evidence=DriftEvidence(
            model_version=version,
            windows=tuple(window.path.name for window in traffic.windows),
            result=result,
        ),
        reference_path=reference_path,
        since=since,
        window_end=max(window.end for window in traffic.windows),
        traffic=traffic.view,
        live_performance=performance,
        skipped=tuple(traffic.skipped),
    )


def _skipped_summary(skipped: list[SkippedFile]) -> str:
    names = ", ".join(file.path.name for file in skipped[:5])
    more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    return f"{len(skipped)} unreadable window files skipped: {names}{more}"


def assessment_metadata(assessment: TrafficAssessment) -> dict[str, Any]:
    """What the UI shows of an assessment: verdict, window, rows, drifted share, table, plot."""
    result = assessment.evidence.result
    png = drift.plot_drift(result)
    window = (
        f"{assessment.since:%Y-%m-%d %H:%M:%S} to {assessment.window_end:%Y-%m-%d %H:%M:%S} UTC"
    )
    return {
        "summary": result.summary(),
        "model_version": assessment.evidence.model_version,
        "evidence": assessment.evidence.key,
        "window": window,
        "traffic_windows": len(assessment.evidence.windows),
        "rows": result.rows,
        "drifted_share": round(result.drifted_share, 4),
        "drifted_columns": dg.MetadataValue.json(result.drifted_columns),
        "should_retrain": result.should_retrain,
        "reference_profile": dg.MetadataValue.path(str(assessment.reference_path)),
        "live_performance": dg.MetadataValue.json(assessment.live_performance or {}),
        # Truncated or corrupt window files the comparison had to leave out, and why.
        "skipped_files": dg.MetadataValue.json(
            [{"file": str(file.path), "reason": file.reason} for file in assessment.skipped]
        ),
        "columns": dg.MetadataValue.md(result.to_frame().round(4).to_markdown(index=False)),
        "plot": dg.MetadataValue.md(
            f"![drift](data:image/png;base64,{base64.b64encode(png).decode()})"
        ),
    }


@dg.asset(
    group_name="monitoring",
    kinds={"whylogs"},
    owners=["team:ml-platform"],
    deps=["model_endpoint", "reference_profile"],
    check_specs=[dg.AssetCheckSpec("no_drift", asset="drift_report")],
)
def drift_report(
    context: dg.AssetExecutionContext, mlflow_tracking: MlflowTracking
) -> Iterator[dg.Output[dict[str, Any]] | dg.AssetCheckResult]:
    """The champion's live traffic against its training data: drift per feature, live metrics."""
    settings = load_settings()
    assessment = assess_traffic(mlflow_tracking, settings, load_monitoring_settings())
    if isinstance(assessment, str):
        summary = f"No evaluation: {assessment}."
        context.log.info(summary)
        yield dg.Output({"summary": summary}, metadata={"summary": summary})
        yield dg.AssetCheckResult(check_name="no_drift", passed=True, description=summary)
        return
    result = assessment.evidence.result
    # The endpoint's replicas export each feature's drift from this file (metric gauges).
    write_drift_summary(
        settings.traffic_dir,
        mlflow_tracking.registered_model_name,
        DriftSummary.from_result(result, assessment.evidence.model_version, now=time.time()),
    )
    yield dg.Output(
        {"summary": result.summary(), "drifted_columns": result.drifted_columns},
        metadata=assessment_metadata(assessment),
    )
    yield dg.AssetCheckResult(
        check_name="no_drift",
        passed=not result.drifted_columns,
        severity=dg.AssetCheckSeverity.WARN,
        description=result.summary(),
        metadata={
            "drifted_columns": dg.MetadataValue.json(result.drifted_columns),
            "drifted_share": round(result.drifted_share, 4),
            "rows": result.rows,
        },
    )


def retrain_in_progress(instance: dg.DagsterInstance) -> bool:
    """Whether a retrain run is queued or running (retrains never overlap)."""
    return run_in_progress(instance, job_name=RETRAIN_JOB_NAME)


# How often a sensor ticks is part of its definition, so the interval variables are read when
# the definitions load (a change needs a reload); everything a tick decides on is read by the tick.
@dg.sensor(
    job_name=RETRAIN_JOB_NAME,
    minimum_interval_seconds=load_monitoring_settings().drift_interval_s,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Compares the champion's live traffic with its training data on every tick and "
    "requests a retrain when enough features drifted (effect size over a bound, enough rows).",
)
def drift_sensor(
    context: dg.SensorEvaluationContext, mlflow_tracking: MlflowTracking
) -> dg.SensorResult:
    """Retrain when the champion's traffic drifted; record what each tick saw on drift_report."""
    monitoring = load_monitoring_settings()
    assessment = assess_traffic(mlflow_tracking, load_settings(), monitoring)
    evidence = None if isinstance(assessment, str) else assessment.evidence
    decision = decide_drift(
        evidence,
        DriftCursor.parse(context.cursor),
        now=time.time(),
        cooldown_s=monitoring.retrain_cooldown_s,
        retrain_in_progress=retrain_in_progress(context.instance),
        missing_reason=assessment if isinstance(assessment, str) else "",
    )
    events = []
    if decision.new_evidence and not isinstance(assessment, str):
        events.append(
            dg.AssetObservation(
                asset_key="drift_report",
                metadata=assessment_metadata(assessment) | {"sensor_decision": decision.reason},
            )
        )
    if not decision.retrain:
        return dg.SensorResult(
            skip_reason=decision.reason, cursor=decision.cursor.dump(), asset_events=events
        )
    request = dg.RunRequest(
        run_key=decision.run_key,
        tags={"mlplatform/trigger": "drift", "mlplatform/evidence": decision.cursor.evidence_key},
    )
    context.log.info(f"requesting a retrain: {decision.reason}")
    return dg.SensorResult(
        run_requests=[request], cursor=decision.cursor.dump(), asset_events=events
    )


def freshness_windows(settings: MonitoringSettings) -> dict[str, dt.timedelta]:
    """How old each watched asset may get before it is stale."""
    return {"raw_data": settings.raw_data_max_age, "candidate_model": settings.model_max_age}


def freshness_policies(settings: MonitoringSettings) -> dict[str, dg.FreshnessPolicy]:
    """The watched assets' freshness policies (in the UI): warn at half the window, fail past it.

    A policy is part of its asset's definition: the definitions call this once, when they load.
    """
    return {
        asset: dg.FreshnessPolicy.time_window(fail_window=window, warn_window=window / 2)
        for asset, window in freshness_windows(settings).items()
    }


def latest_materializations(
    instance: dg.DagsterInstance, assets: Iterable[str]
) -> dict[str, float | None]:
    """Epoch seconds of each of ``assets``' latest materialization (None = never)."""
    latest = {}
    for asset in assets:
        event = instance.get_latest_materialization_event(dg.AssetKey(asset))
        latest[asset] = event.timestamp if event else None
    return latest


@dg.sensor(
    job_name=RETRAIN_JOB_NAME,
    minimum_interval_seconds=load_monitoring_settings().freshness_interval_s,  # see drift_sensor
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Requests a retrain when raw_data or candidate_model is older than its "
    "freshness window.",
)
def freshness_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    """Retrain from fresh data when the data or the model has gone stale."""
    windows = freshness_windows(load_monitoring_settings())
    stale = stale_assets(time.time(), latest_materializations(context.instance, windows), windows)
    if not stale:
        allowed = ", ".join(f"{asset} {age}" for asset, age in windows.items())
        return dg.SensorResult(skip_reason=f"Everything fresh (allowed ages: {allowed}).")
    reasons = "; ".join(s.reason for s in stale)
    if retrain_in_progress(context.instance):
        return dg.SensorResult(skip_reason=f"Stale: {reasons}; a retrain is already queued.")
    context.log.info(f"requesting a retrain: {reasons}")
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=freshness_run_key(stale),
                tags={"mlplatform/trigger": "freshness", "mlplatform/stale": reasons[:200]},
            )
        ]
    )


@dg.run_failure_sensor(
    name="run_failure_alert",
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Logs every failed run and posts it to MLPLATFORM_ALERT_WEBHOOK when set.",
)
def run_failure_alert(context: dg.RunFailureSensorContext) -> None:
    """Log a failed run and post it to the alert webhook (a failing webhook is only logged)."""
    run = context.dagster_run
    message = context.failure_event.message or "the run failed"
    context.log.error(f"run {run.run_id} of {run.job_name} failed: {message}")
    webhook = load_monitoring_settings().alert_webhook
    if webhook:
        error = post_alert(webhook, alert_payload(run.run_id, run.job_name, message, None))
        if error:
            context.log.warning(f"alert to {webhook} failed: {error}")


SENSORS = [drift_sensor, freshness_sensor, run_failure_alert]
