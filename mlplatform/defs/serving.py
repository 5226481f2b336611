"""Serving: the registry's champion live on Ray Serve, and kept live.

``model_endpoint`` deploys the version the `champion` alias names when it runs (a retrain, a
rollback, or ``deploy_job`` alone), after loading it here and scoring synthesized records with
it: a version that cannot serve never replaces one that does, and if a deploy fails anyway the
previous deployment is restored and the alias follows what is served. ``endpoint_sensor``
compares the champion with what the endpoint reports on every tick and requests a
``deploy_job`` run when they differ (the endpoint down after a reboot or a crash, or serving
another version); its decisions are the pure functions of :mod:`mlplatform.monitoring.rules`.
"""

import dataclasses
import datetime as dt
import json
import statistics
import time
from collections.abc import Iterator, Mapping
from typing import Any

import dagster as dg
import httpx
from pydantic import Field

from mlplatform.defs.registry import current_champion, revert_champion
from mlplatform.model.registry import ModelRef, RegistryUnavailable
from mlplatform.monitoring.rules import (
    EndpointCursor,
    EndpointState,
    decide_endpoint,
    load_monitoring_settings,
    post_alert,
    redeploy_alert_payload,
)
from mlplatform.resources import MlflowTracking, RayServe
from mlplatform.serving.cluster import observe_endpoint, wait_until_serving
from mlplatform.serving.keys import (
    CLIENT_KEY_VARIABLE,
    ApiKeyError,
    ExposedWithoutKeys,
    bearer_headers,
    key_for,
)
from mlplatform.serving.preflight import UnservableModel, preflight
from mlplatform.serving.release import REQUEST_KEY_HEADER, Release, key_answered_by
from mlplatform.serving.settings import ServingKnobs, ServingSettings
from mlplatform.settings import load_settings

DEPLOY_JOB_NAME = "deploy_job"

ENDPOINT_TAGS = {"mlplatform/endpoint": "default"}

RUN_KEY_TAG = "dagster/run_key"
"""The tag Dagster gives a run requested with a run key (the key is its value)."""
"""The run tag of every job that deploys the endpoint: the run queue (``dagster.yaml``) admits
one such run at a time, and the endpoint sensor waits while one is queued or running."""


class EndpointDeployError(RuntimeError):
    """The champion could not be deployed; the message says what the endpoint serves now."""


@dataclasses.dataclass(frozen=True)
class EndpointInfo:
    """A live deployment: where it answers and which model version it serves."""

    url: str
    model_name: str
    model_version: str
    model_uri: str
    deployed_at: str
    example_record: dict[str, Any]
    requires_key: bool = False
    rollout: str | None = None

    @property
    def curl_example(self) -> str:
        """A ready-to-paste request for the endpoint (the key, if one is needed, from the shell)."""
        body = json.dumps({"records": [self.example_record]})
        key = f' -H "Authorization: Bearer ${CLIENT_KEY_VARIABLE}"' if self.requires_key else ""
        return (
            f"curl -s -X POST {self.url}/predict{key} -H 'Content-Type: application/json' "
            f"-d '{body}'"
        )


class EndpointConfig(ServingKnobs, dg.Config):
    """Deployment knobs: the serving app's (with their defaults), and the deployment's checks."""

    ready_timeout_s: float = Field(
        default=180.0, description="How long to wait for the new version."
    )
    restore_timeout_s: float = Field(
        default=180.0,
        description="How long to wait for the previous deployment when the new version failed.",
    )
    max_p50_latency_ms: float = Field(
        default=250.0, description="Latency bound of the endpoint check."
    )
    traffic_profiling: bool = Field(
        default=True,
        description="Profile live traffic with whylogs (for drift) and log predictions (for "
        "POST /feedback) under the platform home.",
    )

    def serving_settings(self, model_name: str, tracking_uri: str) -> ServingSettings:
        """The serving app's settings for releases of ``model_name`` under these knobs.

        Traffic profiles and the prediction log go under the platform home (``MLPLATFORM_HOME``).
        """
        platform = load_settings()
        return ServingSettings.for_deployment(
            self,
            model_name=model_name,
            tracking_uri=tracking_uri,
            traffic_dir=str(platform.traffic_dir) if self.traffic_profiling else None,
            feedback_db=str(platform.feedback_db) if self.traffic_profiling else None,
        )


def smoke_test(
    url: str,
    record: dict[str, Any],
    expected_version: str,
    headers: Mapping[str, str] | None = None,
    release: Release | None = None,
) -> dict[str, Any]:
    """POST one real record; the answer must come from ``expected_version``.

    Args:
        url: the endpoint.
        record: a record the model scores.
        expected_version: the version that must answer.
        headers: the request's headers (an API key).
        release: the release served; in canary, the request carries a key that this release
            assigns to ``expected_version``.

    Raises:
        RuntimeError: on any non-200 answer or a different serving version.

    """
    if release is not None:
        headers = {
            **(headers or {}),
            REQUEST_KEY_HEADER: key_answered_by(release, expected_version),
        }
    response = httpx.post(f"{url}/predict", json={"records": [record]}, headers=headers, timeout=30)
    if response.status_code != 200:
        raise RuntimeError(f"smoke test got HTTP {response.status_code}: {response.text[:500]}")
    body = response.json()
    if body["model_version"] != expected_version:
        raise RuntimeError(
            f"smoke test answered by v{body['model_version']}, expected v{expected_version}"
        )
    return body


def measure_latency_ms(
    url: str,
    record: dict[str, Any],
    requests: int = 20,
    headers: Mapping[str, str] | None = None,
) -> list[float]:
    """Wall-clock latency of sequential single-record predictions, in milliseconds."""
    latencies = []
    with httpx.Client(timeout=30, headers=headers) as client:
        for _ in range(requests):
            start = time.perf_counter()
            client.post(f"{url}/predict", json={"records": [record]}).raise_for_status()
            latencies.append((time.perf_counter() - start) * 1000)
    return latencies


@dataclasses.dataclass(frozen=True)
class Deployment:
    """What one deploy put on Ray Serve: the app's settings and the release it serves."""

    settings: ServingSettings
    release: Release


def _previous_deployment(
    context: dg.AssetExecutionContext,
    config: EndpointConfig,
    before: EndpointState,
    champion: ModelRef,
    tracking_uri: str,
) -> Deployment | None:
    """The deployment to restore if the new one fails: the one serving before it, if any.

    Its settings and release as the last deploy recorded them when that deploy served what the
    endpoint serves now; otherwise this run's knobs for the champion the endpoint served.
    """
    if before.status != "serving" or before.version is None:
        return None
    event = context.instance.get_latest_materialization_event(context.asset_key)
    metadata = event.asset_materialization.metadata if event else {}
    if "serving_settings" in metadata and "release" in metadata:
        release = Release.model_validate(metadata["release"].value)
        if release.champion == before.version and release.rollout_label == before.rollout:
            settings = ServingSettings.model_validate(metadata["serving_settings"].value)
            return Deployment(settings, release)
    return Deployment(
        config.serving_settings(champion.name, tracking_uri), Release(champion=before.version)
    )


def _restore(ray_serve: RayServe, url: str, previous: Deployment, timeout_s: float) -> str:
    """Deploy ``previous`` again after a failed deploy; what happened, as a phrase."""
    release = previous.release
    served = f"v{release.champion}" + (
        f" with {release.rollout_label}" if release.challenger else ""
    )
    try:
        ray_serve.deploy(previous.settings, previous.release, timeout_s=timeout_s)
        wait_until_serving(url, release.champion, timeout_s, rollout=release.rollout_label)
    except Exception as error:  # reported with the failure that made the restore necessary
        return f"restoring {served} failed too: {type(error).__name__}: {error}"
    return f"restored the previous deployment ({served})"


def _deploy_failed(
    context: dg.AssetExecutionContext,
    mlflow_tracking: MlflowTracking,
    champion: ModelRef,
    serving: EndpointState,
    failure: str,
) -> EndpointDeployError:
    """The error a failed deploy raises, after pointing `champion` at what the endpoint serves.

    Args:
        context: the asset's context.
        mlflow_tracking: the registry.
        champion: the version that failed.
        serving: what the endpoint serves now (after any restore).
        failure: what went wrong, and what was done about it.

    """
    message = f"v{champion.version} was not deployed: {failure.rstrip('.')}."
    if serving.status == "serving" and serving.version != champion.version:
        reverted = revert_champion(
            mlflow_tracking,
            champion.version,
            serving.version,
            f"v{champion.version} could not be deployed: {failure}",
            context.run.run_id,
        )
        if reverted is not None:
            message += f" The champion is v{serving.version} again (decision recorded)."
    message += f" The endpoint is {serving.describe()}."
    context.log.error(message)
    return EndpointDeployError(message)


@dg.asset(
    group_name="serving",
    kinds={"ray"},
    owners=["team:ml-platform"],
    # The release is decided by champion_model (a new challenger) and rollout_report (its
    # stages): in a job with either, the endpoint is deployed after the decision.
    deps=["champion_model", "rollout_report"],
    check_specs=[dg.AssetCheckSpec("endpoint_health", asset="model_endpoint")],
)
def model_endpoint(
    context: dg.AssetExecutionContext,
    config: EndpointConfig,
    ray_serve: RayServe,
    mlflow_tracking: MlflowTracking,
) -> Iterator[dg.Output[EndpointInfo] | dg.AssetCheckResult]:
    """The registry's release live on Ray Serve over HTTP, never replaced by one that fails.

    The release is the `champion` alias and the rollout under way (a challenger in shadow or
    canary). A change of stage, share or champion among versions the replicas already hold is
    applied in place (Ray Serve's ``reconfigure``): no restart, no reload, no failed request.
    """
    champion = current_champion(mlflow_tracking)  # what the alias names now, not a stored input
    release = mlflow_tracking.desired_release() or Release(champion=champion.version)
    url = ray_serve.url
    before = observe_endpoint(url)
    wanted = EndpointState("serving", release.champion, rollout=release.rollout_label).describe()
    context.log.info(
        f"deploying {wanted.removeprefix('serving ')}; the endpoint is {before.describe()}"
    )
    try:
        keys = ray_serve.check_access()
    except (ApiKeyError, ExposedWithoutKeys) as error:
        # A configuration error, not the version's: nothing was rolled, the champion stays.
        message = (
            f"v{champion.version} was not deployed: {error}. Nothing was changed; the endpoint "
            f"is {before.describe()}."
        )
        context.log.error(message)
        raise EndpointDeployError(message) from None
    headers = bearer_headers(key_for(keys, "predict"))
    try:
        if not (before.status == "serving" and before.version == champion.version):
            preflight(champion.uri, mlflow_tracking.tracking_uri)  # not once it serves already
    except UnservableModel as error:
        # Nothing was rolled: whatever served before still serves.
        raise _deploy_failed(context, mlflow_tracking, champion, before, str(error)) from None
    release = _challenger_that_serves(context, mlflow_tracking, release, before)
    serving = config.serving_settings(champion.name, mlflow_tracking.tracking_uri)
    previous = _previous_deployment(context, config, before, champion, mlflow_tracking.tracking_uri)
    started = time.perf_counter()
    try:
        ray_serve.deploy(serving, release, timeout_s=config.ready_timeout_s)
        wait_until_serving(
            url, champion.version, config.ready_timeout_s, rollout=release.rollout_label
        )
        deploy_seconds = time.perf_counter() - started
        card = httpx.get(f"{url}/model", headers=headers, timeout=30).json()
        record = card["example_record"]
        answer = smoke_test(url, record, champion.version, headers, release)
        if release.stage == "canary" and release.challenger is not None:
            smoke_test(url, record, release.challenger, headers, release)
    except Exception as error:  # whatever failed, the previous deployment comes back first
        failure = f"{type(error).__name__}: {error}"
        if previous is not None:
            failure += "; " + _restore(ray_serve, url, previous, config.restore_timeout_s)
        # The cause is in the message: the run's failure names it, not its innermost frame.
        raise _deploy_failed(
            context, mlflow_tracking, champion, observe_endpoint(url), failure
        ) from None
    info = EndpointInfo(
        url=url,
        model_name=champion.name,
        model_version=champion.version,
        model_uri=champion.uri,
        deployed_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        example_record=record,
        requires_key=bool(keys),
        rollout=release.rollout_label,
    )
    context.log.info(f"serving {wanted.removeprefix('serving ')} at {url}")
    yield dg.Output(
        info,
        metadata={
            "url": dg.MetadataValue.url(url),
            "docs": dg.MetadataValue.url(f"{url}/docs"),
            "model_version": champion.version,
            "model_uri": champion.uri,
            "mlflow_run_id": champion.mlflow_run_id,
            "rollout": release.rollout_label or "none",
            "release": dg.MetadataValue.json(release.model_dump()),
            "previously": before.describe(),
            "deploy_seconds": round(deploy_seconds, 1),
            "smoke_test": dg.MetadataValue.json(answer),
            "serving_settings": dg.MetadataValue.json(serving.model_dump()),
            "curl": dg.MetadataValue.md(f"```\n{info.curl_example}\n```"),
        },
    )
    latencies = measure_latency_ms(url, record, headers=headers)
    p50 = statistics.median(latencies)
    yield dg.AssetCheckResult(
        check_name="endpoint_health",
        passed=p50 <= config.max_p50_latency_ms,
        description=(
            f"serving v{champion.version}; p50 {p50:.1f} ms over {len(latencies)} requests"
        ),
        metadata={
            "p50_ms": round(p50, 2),
            "max_ms": round(max(latencies), 2),
            "bound_ms": config.max_p50_latency_ms,
        },
    )


def _challenger_that_serves(
    context: dg.AssetExecutionContext,
    mlflow_tracking: MlflowTracking,
    release: Release,
    before: EndpointState,
) -> Release:
    """The release to deploy: without its challenger if that cannot load and score.

    A challenger the endpoint already serves was checked when it entered. One that fails its
    check is taken out of the rollout (recorded on the version, the rollout state cleared) and
    the champion is deployed alone: a broken challenger never costs the champion its endpoint.
    """
    challenger = release.challenger
    if challenger is None or (before.rollout or "").startswith(f"v{challenger} "):
        return release
    try:
        preflight(
            f"models:/{mlflow_tracking.registered_model_name}/{challenger}",
            mlflow_tracking.tracking_uri,
        )
    except UnservableModel as error:
        reason = f"v{challenger} cannot serve, so it left the rollout: {error}"
        context.log.error(reason)
        mlflow_tracking.set_rollout_state(None)
        client, name = mlflow_tracking.client(), mlflow_tracking.registered_model_name
        client.set_model_version_tag(name, challenger, "rollout.decision", "rolled_back")
        client.set_model_version_tag(name, challenger, "rollout.reason", reason[:5000])
        return Release(champion=release.champion)
    return release


def run_in_progress(
    instance: dg.DagsterInstance,
    job_name: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> bool:
    """Whether a run of ``job_name`` or with ``tags`` is queued or running."""
    records = instance.get_run_records(
        dg.RunsFilter(
            job_name=job_name,
            tags=dict(tags or {}),
            statuses=[
                dg.DagsterRunStatus.QUEUED,
                dg.DagsterRunStatus.NOT_STARTED,
                dg.DagsterRunStatus.STARTING,
                dg.DagsterRunStatus.STARTED,
            ],
        ),
        limit=1,
    )
    return bool(records)


def run_succeeded(instance: dg.DagsterInstance, run_key: str | None) -> bool:
    """Whether the run a sensor requested with ``run_key`` finished successfully."""
    if run_key is None:
        return False
    records = instance.get_run_records(dg.RunsFilter(tags={RUN_KEY_TAG: run_key}), limit=1)
    return bool(records) and records[0].dagster_run.status == dg.DagsterRunStatus.SUCCESS


def deploy_in_progress(instance: dg.DagsterInstance) -> bool:
    """Whether a run that deploys the endpoint (retrain, rollback, deploy) is queued or running."""
    return run_in_progress(instance, tags=ENDPOINT_TAGS)


# The interval is part of the sensor's definition, read when the definitions load (as the
# monitoring sensors' are); everything a tick decides on is read by the tick.
@dg.sensor(
    job_name=DEPLOY_JOB_NAME,
    minimum_interval_seconds=load_monitoring_settings().endpoint_check_s,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Compares the registry's release (champion, and a challenger in rollout) with "
    "what the endpoint serves (GET /healthz) and requests a deploy when the endpoint is down, "
    "unhealthy or serving another release.",
)
def endpoint_sensor(
    context: dg.SensorEvaluationContext, mlflow_tracking: MlflowTracking, ray_serve: RayServe
) -> dg.SensorResult:
    """Redeploy the champion when the endpoint does not serve it; alert when it does so."""
    cursor = EndpointCursor.parse(context.cursor)
    try:
        release = mlflow_tracking.desired_release()
    except RegistryUnavailable as error:
        release, registry_error = None, str(error)
    else:
        registry_error = None
    url = ray_serve.url
    decision = decide_endpoint(
        release.champion if release is not None else None,
        observe_endpoint(url),
        cursor,
        now=time.time(),
        deploy_in_progress=deploy_in_progress(context.instance),
        registry_error=registry_error,
        requested_run_succeeded=run_succeeded(context.instance, cursor.run_key),
        desired_rollout=release.rollout_label if release is not None else None,
    )
    if not decision.deploy or decision.run_key is None:
        return dg.SensorResult(skip_reason=decision.reason, cursor=decision.cursor.dump())
    context.log.warning(decision.reason)
    webhook = load_monitoring_settings().alert_webhook
    if webhook:
        error = post_alert(webhook, redeploy_alert_payload(url, decision.reason, decision.run_key))
        if error:
            context.log.warning(f"alert to {webhook} failed: {error}")
    request = dg.RunRequest(
        run_key=decision.run_key,
        tags={"mlplatform/trigger": "endpoint", "mlplatform/endpoint-state": decision.reason[:200]},
    )
    return dg.SensorResult(run_requests=[request], cursor=decision.cursor.dump())
