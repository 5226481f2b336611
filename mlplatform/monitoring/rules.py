"""Monitoring decisions as pure functions: drift, freshness, the endpoint, alerts.

The sensors in :mod:`mlplatform.defs.monitoring` and :mod:`mlplatform.defs.serving` gather facts
(profiles on disk, the registry, the endpoint's health, the Dagster instance) and hand them to
these functions, so every decision can be tested with plain values and a controlled clock.
Nothing here imports Dagster.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Self

import httpx

from mlplatform.monitoring.drift import DriftResult, DriftThresholds


@dataclasses.dataclass(frozen=True)
class MonitoringSettings:
    """How often the sensors look, and the bounds they apply.

    Attributes:
        drift_interval_s: seconds between drift sensor ticks.
        freshness_interval_s: seconds between freshness sensor ticks.
        endpoint_check_s: seconds between endpoint sensor ticks (how soon a crashed or
            outdated endpoint is noticed).
        thresholds: per-column drift bounds, minimum rows and the drifted share that retrains.
        drift_lookback: only traffic windows this recent are compared (and never from before
            the champion was promoted), so the evidence is the newest traffic, not a mix of
            old and new.
        retrain_cooldown_s: after a drift-triggered retrain for a champion version, the same
            version does not trigger another one for this long (a denied challenger would
            otherwise retrain on every tick).
        raw_data_max_age: ``raw_data`` older than this is stale.
        model_max_age: ``candidate_model`` older than this is stale.
        alert_webhook: URL that run-failure alerts are POSTed to, if any.

    """

    drift_interval_s: int = 60
    freshness_interval_s: int = 300
    endpoint_check_s: int = 30
    thresholds: DriftThresholds = dataclasses.field(default_factory=DriftThresholds)
    drift_lookback: dt.timedelta = dt.timedelta(hours=1)
    retrain_cooldown_s: float = 3600.0
    raw_data_max_age: dt.timedelta = dt.timedelta(hours=24)
    model_max_age: dt.timedelta = dt.timedelta(days=7)
    alert_webhook: str | None = None


def load_monitoring_settings(environ: Mapping[str, str] | None = None) -> MonitoringSettings:
    """Read the monitoring settings from the environment (defaults in :class:`MonitoringSettings`).

    Variables: ``MLPLATFORM_DRIFT_INTERVAL_S``, ``MLPLATFORM_FRESHNESS_INTERVAL_S``,
    ``MLPLATFORM_ENDPOINT_CHECK_S``,
    ``MLPLATFORM_DRIFT_KS_BOUND``, ``MLPLATFORM_DRIFT_HELLINGER_BOUND``,
    ``MLPLATFORM_DRIFT_MIN_ROWS``, ``MLPLATFORM_DRIFT_SHARE``, ``MLPLATFORM_DRIFT_LOOKBACK_MIN``,
    ``MLPLATFORM_RETRAIN_COOLDOWN_S``,
    ``MLPLATFORM_RAW_DATA_MAX_AGE_H``, ``MLPLATFORM_MODEL_MAX_AGE_H`` and
    ``MLPLATFORM_ALERT_WEBHOOK``.

    Raises:
        ValueError: if a value is not a number or out of range.

    """
    env = os.environ if environ is None else environ
    defaults = MonitoringSettings()

    def number(name: str, default: float) -> float:
        raw = env.get(name)
        if not raw:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{name} must be a number, got {raw!r}") from None
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {raw!r}")
        return value

    thresholds = DriftThresholds(
        ks_bound=number("MLPLATFORM_DRIFT_KS_BOUND", defaults.thresholds.ks_bound),
        hellinger_bound=number(
            "MLPLATFORM_DRIFT_HELLINGER_BOUND", defaults.thresholds.hellinger_bound
        ),
        min_rows=int(number("MLPLATFORM_DRIFT_MIN_ROWS", defaults.thresholds.min_rows)),
        drifted_share=number("MLPLATFORM_DRIFT_SHARE", defaults.thresholds.drifted_share),
    )
    hours, minutes = dt.timedelta(hours=1), dt.timedelta(minutes=1)
    return MonitoringSettings(
        drift_interval_s=int(number("MLPLATFORM_DRIFT_INTERVAL_S", defaults.drift_interval_s)),
        freshness_interval_s=int(
            number("MLPLATFORM_FRESHNESS_INTERVAL_S", defaults.freshness_interval_s)
        ),
        endpoint_check_s=int(number("MLPLATFORM_ENDPOINT_CHECK_S", defaults.endpoint_check_s)),
        thresholds=thresholds,
        drift_lookback=minutes
        * number("MLPLATFORM_DRIFT_LOOKBACK_MIN", defaults.drift_lookback / minutes),
        retrain_cooldown_s=number("MLPLATFORM_RETRAIN_COOLDOWN_S", defaults.retrain_cooldown_s),
        raw_data_max_age=hours
        * number("MLPLATFORM_RAW_DATA_MAX_AGE_H", defaults.raw_data_max_age / hours),
        model_max_age=hours * number("MLPLATFORM_MODEL_MAX_AGE_H", defaults.model_max_age / hours),
        alert_webhook=env.get("MLPLATFORM_ALERT_WEBHOOK") or None,
    )


# --------------------------------------------------------------------------------------------
# Drift
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DriftEvidence:
    """What a drift evaluation saw: the champion, the traffic windows and the verdict.

    Attributes:
        model_version: the champion version whose traffic was compared.
        windows: identifiers of the traffic windows merged (file names), oldest first.
        result: the per-column comparison with the reference profile.

    """

    model_version: str
    windows: tuple[str, ...]
    result: DriftResult

    @property
    def key(self) -> str:
        """A short, stable identifier of this evidence (the same windows give the same key)."""
        digest = hashlib.sha256("\n".join((self.model_version, *self.windows)).encode())
        return f"v{self.model_version}-{digest.hexdigest()[:12]}"


class SensorCursor:
    """A sensor's memory between ticks: a frozen dataclass stored as JSON in the sensor cursor.

    Subclasses are dataclasses whose fields all default, so an empty cursor is a fresh start.
    """

    @classmethod
    def parse(cls, raw: str | None) -> Self:
        """Read a cursor; an empty or unreadable cursor is a fresh start."""
        if not raw:
            return cls()
        try:
            data = json.loads(raw)
            return cls(**{f.name: data.get(f.name) for f in dataclasses.fields(cls)})
        except (ValueError, TypeError, AttributeError):
            return cls()

    def dump(self) -> str:
        """The cursor as JSON."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


@dataclasses.dataclass(frozen=True)
class DriftCursor(SensorCursor):
    """The drift sensor's memory between ticks (stored as JSON in the sensor cursor).

    Attributes:
        evidence_key: the last evidence evaluated.
        retrained_version: the champion version the last drift retrain was requested for.
        retrained_at: when that retrain was requested (epoch seconds).

    """

    evidence_key: str | None = None
    retrained_version: str | None = None
    retrained_at: float | None = None


@dataclasses.dataclass(frozen=True)
class DriftDecision:
    """What the drift sensor does on one tick.

    Attributes:
        retrain: whether to request a retrain run.
        run_key: the run key of that request (derived from the evidence, so it runs once).
        reason: why it fires or not, with the numbers (shown on the sensor tick).
        cursor: the cursor to store.
        new_evidence: whether this tick saw evidence not evaluated before.

    """

    retrain: bool
    run_key: str | None
    reason: str
    cursor: DriftCursor
    new_evidence: bool


def decide_drift(
    evidence: DriftEvidence | None,
    cursor: DriftCursor,
    now: float,
    cooldown_s: float,
    retrain_in_progress: bool,
    missing_reason: str = "no traffic profiles yet",
) -> DriftDecision:
    """Decide whether drift evidence triggers a retrain.

    Fires when the evidence is new (not the cursor's), the drift verdict says retrain (enough
    rows and the drifted share over the threshold), no retrain is queued or running, and the
    champion has not triggered a drift retrain within the cooldown.

    Args:
        evidence: the evaluation of the newest traffic, or None when there is nothing to compare.
        cursor: the sensor's memory from the previous tick.
        now: the current time (epoch seconds).
        cooldown_s: the cooldown per champion version.
        retrain_in_progress: whether a retrain run is queued or running.
        missing_reason: why there is no evidence, when ``evidence`` is None.

    """
    if evidence is None:
        return DriftDecision(False, None, f"No evaluation: {missing_reason}.", cursor, False)
    if evidence.key == cursor.evidence_key:
        return DriftDecision(
            False,
            None,
            f"No new traffic since the last evaluation ({evidence.key}).",
            cursor,
            False,
        )
    seen = dataclasses.replace(cursor, evidence_key=evidence.key)
    summary = evidence.result.summary()
    if not evidence.result.should_retrain:
        return DriftDecision(False, None, summary, seen, True)
    if retrain_in_progress:
        return DriftDecision(
            False, None, f"{summary} A retrain is already queued or running.", seen, True
        )
    cooling = (
        cursor.retrained_version == evidence.model_version
        and cursor.retrained_at is not None
        and now - cursor.retrained_at < cooldown_s
    )
    if cooling:
        remaining = cooldown_s - (now - (cursor.retrained_at or now))
        return DriftDecision(
            False,
            None,
            f"{summary} v{evidence.model_version} already triggered a retrain; cooling down for "
            f"{remaining:.0f} more seconds.",
            seen,
            True,
        )
    fired = dataclasses.replace(seen, retrained_version=evidence.model_version, retrained_at=now)
    return DriftDecision(True, f"drift-{evidence.key}", summary, fired, True)


# --------------------------------------------------------------------------------------------
# Freshness
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StaleAsset:
    """An asset whose latest materialization is older than its freshness window."""

    asset: str
    materialized_at: float
    age: dt.timedelta
    max_age: dt.timedelta

    @property
    def reason(self) -> str:
        """One sentence for the sensor tick."""
        return (
            f"{self.asset} last materialized {_duration(self.age)} ago "
            f"(allowed: {_duration(self.max_age)})"
        )


def _duration(delta: dt.timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds} s"


def stale_assets(
    now: float,
    materialized_at: Mapping[str, float | None],
    max_age: Mapping[str, dt.timedelta],
) -> list[StaleAsset]:
    """The assets whose latest materialization is older than their allowed age.

    Assets never materialized are not stale: the first materialization is a deliberate act
    (``make run``), not something a sensor starts on its own.

    Args:
        now: the current time (epoch seconds).
        materialized_at: asset -> epoch seconds of its latest materialization (None = never).
        max_age: asset -> its freshness window.

    """
    stale = []
    for asset, window in max_age.items():
        last = materialized_at.get(asset)
        if last is None:
            continue
        age = dt.timedelta(seconds=now - last)
        if age > window:
            stale.append(StaleAsset(asset, last, age, window))
    return stale


def freshness_run_key(stale: Sequence[StaleAsset]) -> str:
    """A run key naming the stale materializations, so each goes stale (and retrains) once."""
    parts = sorted(f"{s.asset}@{s.materialized_at:.0f}" for s in stale)
    return "freshness-" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# The endpoint: desired release vs what it serves
# --------------------------------------------------------------------------------------------

EndpointStatus = Literal["serving", "unhealthy", "down"]
"""What ``GET /healthz`` showed: an answer naming a model version, a bad answer, or none."""


@dataclasses.dataclass(frozen=True)
class EndpointState:
    """What the endpoint's ``GET /healthz`` said.

    Attributes:
        status: ``serving`` (answered ok, naming its model version), ``unhealthy`` (answered,
            but not with a served version) or ``down`` (no answer).
        version: the champion's model version it serves, when serving.
        detail: what was wrong, when not serving (the HTTP status or the connection error).
        rollout: the challenger beside it, when a rollout is under way (``v4 in shadow``,
            ``v4 in canary at 20%``).

    """

    status: EndpointStatus
    version: str | None = None
    detail: str = ""
    rollout: str | None = None

    @property
    def key(self) -> str:
        """The state in a word, for run keys: ``v3``, ``v3+v4-shadow``, ``unhealthy``, ``down``."""
        if self.status != "serving":
            return self.status
        return f"v{self.version}" + (f"+{_keyword(self.rollout)}" if self.rollout else "")

    def describe(self) -> str:
        """The state in a phrase: ``serving v3``, ``down (ConnectError: ...)``."""
        if self.status == "serving":
            return f"serving v{self.version}" + (f" with {self.rollout}" if self.rollout else "")
        return f"{self.status} ({self.detail})" if self.detail else self.status


def _keyword(phrase: str) -> str:
    """A phrase as one word for a run key (``v4 in canary at 20%`` -> ``v4-canary-20``)."""
    words = [w.strip("%") for w in phrase.split() if w not in {"in", "at"}]
    return "-".join(words)


@dataclasses.dataclass(frozen=True)
class EndpointCursor(SensorCursor):
    """The endpoint sensor's memory: the difference it last requested a redeploy for.

    Attributes:
        difference: the desired version and the endpoint's state then (``v3/down``); ``None``
            while desired and served agree.
        run_key: the run key of that request.
        requested_at: when it was requested (epoch seconds).

    """

    difference: str | None = None
    run_key: str | None = None
    requested_at: float | None = None


@dataclasses.dataclass(frozen=True)
class EndpointDecision:
    """What the endpoint sensor does on one tick.

    Attributes:
        deploy: whether to request a deploy run.
        run_key: the run key of that request (one per difference).
        reason: why it requests one or not (shown on the sensor tick, sent with the alert).
        cursor: the cursor to store.

    """

    deploy: bool
    run_key: str | None
    reason: str
    cursor: EndpointCursor


def decide_endpoint(
    desired_version: str | None,
    observed: EndpointState,
    cursor: EndpointCursor,
    now: float,
    deploy_in_progress: bool,
    registry_error: str | None = None,
    requested_run_succeeded: bool = False,
    desired_rollout: str | None = None,
) -> EndpointDecision:
    """Decide whether the endpoint must be redeployed to serve the desired release.

    Requests a deploy when the endpoint is down, unhealthy or serving another version than the
    registry's champion, once per difference: the cursor remembers the difference it asked
    for, so while that difference lasts (a deploy that failed, say) no tick asks again, and
    the run key is new for every new difference (the endpoint crashing again after it was
    healed). Nothing is requested while a deploy or retrain is queued or running: that run
    changes what the endpoint serves.

    Args:
        desired_version: the version the registry's `champion` alias names; ``None``: no
            champion yet.
        observed: what the endpoint's ``GET /healthz`` said.
        cursor: the sensor's memory from the previous tick.
        now: the current time (epoch seconds).
        deploy_in_progress: whether a run that deploys the endpoint is queued or running.
        registry_error: why the registry did not answer, if it did not: then nothing is
            decided (an unanswered question is not "no champion").
        requested_run_succeeded: whether the run the cursor remembers finished successfully.
            It healed that difference, so the same difference seen again is a new one (the
            daemon stopped, or the machine rebooted, before a tick saw the endpoint healed).
        desired_rollout: the challenger the registry's rollout puts beside the champion
            (``v4 in shadow``, as :attr:`EndpointState.rollout` says it); ``None``: none.

    """
    if registry_error is not None:
        return EndpointDecision(
            False, None, f"The registry did not answer, nothing decided: {registry_error}", cursor
        )
    if desired_version is None:
        return EndpointDecision(
            False,
            None,
            f"No champion in the registry yet: nothing to serve (endpoint {observed.describe()}).",
            EndpointCursor(),
        )
    desired = EndpointState("serving", desired_version, rollout=desired_rollout)
    if observed.status == "serving" and observed.key == desired.key:
        return EndpointDecision(
            False,
            None,
            f"In sync: the endpoint serves the champion v{desired_version}"
            + (f" with {desired_rollout}." if desired_rollout else "."),
            EndpointCursor(),
        )
    difference = f"{desired.key}/{observed.key}"
    wanted = desired.describe().removeprefix("serving ")
    subject = "The champion is" if desired_rollout is None else "The release is"
    state = f"{subject} {wanted} but the endpoint is {observed.describe()}"
    if deploy_in_progress:
        return EndpointDecision(
            False, None, f"{state}; a deploy or retrain is already queued or running.", cursor
        )
    if cursor.difference == difference and not requested_run_succeeded:
        return EndpointDecision(
            False,
            None,
            f"{state}; a redeploy was already requested for this ({cursor.run_key}) and is not "
            "requested again until the endpoint changes.",
            cursor,
        )
    run_key = f"endpoint-{desired.key}-{observed.key}-{now:.0f}"
    return EndpointDecision(
        True,
        run_key,
        f"{state}: redeploying {wanted}.",
        EndpointCursor(difference=difference, run_key=run_key, requested_at=now),
    )


# --------------------------------------------------------------------------------------------
# Alerts
# --------------------------------------------------------------------------------------------


def alert_payload(run_id: str, job_name: str, message: str, url: str | None) -> dict[str, Any]:
    """The JSON body of a run-failure alert (``text`` suits Slack-style incoming webhooks)."""
    text = f"mlplatform: run {run_id} of {job_name} failed: {message}"
    if url:
        text += f" ({url})"
    return {"text": text, "run_id": run_id, "job_name": job_name, "message": message, "url": url}


def post_alert(webhook: str, payload: Mapping[str, Any], timeout_s: float = 10.0) -> str | None:
    """POST an alert; returns None on success, otherwise the error (alerts never raise)."""
    try:
        response = httpx.post(webhook, json=dict(payload), timeout=timeout_s)
        response.raise_for_status()
    except httpx.HTTPError as error:
        return f"{type(error).__name__}: {error}"
    return None


def redeploy_alert_payload(url: str, reason: str, run_key: str) -> dict[str, Any]:
    """The JSON body of the alert sent when the endpoint sensor requests a redeploy."""
    return {
        "text": f"mlplatform: endpoint {url}: {reason} (run key {run_key})",
        "endpoint": url,
        "message": reason,
        "run_key": run_key,
    }
