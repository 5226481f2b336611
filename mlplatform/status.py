"""What the platform is doing now: the release, what the endpoint serves, drift and decisions.

Gathered from the three places that know (the MLflow registry, the endpoint's ``/healthz`` and
the Dagster instance), each asked on its own: one that does not answer is reported as such and
never hides what the others say.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from typing import Any

import dagster as dg
import httpx
from mlflow import MlflowClient

from mlplatform.model.registry import (
    CHAMPION_ALIAS,
    RegistryUnavailable,
    registered_model_tag,
    version_by_alias,
)
from mlplatform.serving.release import ROLLOUT_STATE_TAG, RolloutState

_DRIFT_FIELDS = ("model_version", "summary", "should_retrain", "drifted_share", "rows", "window")
_DECISION_FIELDS = ("decision", "decided_version", "champion_version", "reason")
_ROLLOUT_FIELDS = (
    "challenger_version",
    "stage",
    "verdict",
    "stage_after",
    "reasons",
    "evidence",
    "summary",
    "sensor_decision",
)


@dataclasses.dataclass(frozen=True)
class PlatformStatus:
    """One look at the platform.

    Attributes:
        model_name: the registered model.
        champion: the version the ``champion`` alias names (``None``: none yet).
        registry_error: why the registry could not be read, if it could not.
        endpoint_url: where the endpoint is expected.
        endpoint: the endpoint's ``/healthz`` answer (served version, traffic counters).
        endpoint_error: why the endpoint did not answer, if it did not.
        last_drift: the latest drift verdict (from a sensor tick or a drift_report run).
        decisions: the latest decisions, newest first: ``champion_model``'s (promote, keep,
            block, force, roll back) and the rollout's actions (advance, roll back, and the
            operators' pause, resume, promote, abort), each with its version and reason.
        rollout: the rollout under way as the registry keeps it (challenger, stage, share,
            paused, since when); ``None`` when none is.
        last_rollout: the latest rollout verdict with its evidence (from a sensor tick or a
            rollout_report run).
        metrics_url: where Prometheus scrapes the endpoint's metrics (the local Ray head's
            metrics export port); ``None`` when not known here (a Ray cluster of one's own).

    """

    model_name: str
    champion: str | None
    registry_error: str | None
    endpoint_url: str
    endpoint: dict[str, Any] | None
    endpoint_error: str | None
    last_drift: dict[str, Any] | None
    decisions: list[dict[str, Any]]
    rollout: dict[str, Any] | None = None
    last_rollout: dict[str, Any] | None = None
    metrics_url: str | None = None

    @property
    def served_version(self) -> str | None:
        """The version the endpoint answers with, if it answers."""
        return str(self.endpoint["model_version"]) if self.endpoint else None

    @property
    def in_sync(self) -> bool:
        """Whether the endpoint serves exactly the registry's release.

        The champion, and the challenger in rollout in its stage (when the endpoint names its
        release).
        """
        if self.champion is None or self.served_version != self.champion:
            return False
        served = (self.endpoint or {}).get("release")
        if not isinstance(served, dict):
            return True
        rollout = (
            self.rollout if self.rollout and self.rollout["challenger"] != self.champion else None
        )
        desired = (rollout["challenger"], rollout["stage"]) if rollout else (None, None)
        return (served.get("challenger"), served.get("stage")) == desired

    def to_dict(self) -> dict[str, Any]:
        """The status as JSON-ready values (``status --json``)."""
        return dataclasses.asdict(self) | {
            "served_version": self.served_version,
            "in_sync": self.in_sync,
        }

    def to_text(self) -> str:
        """The status as a person reads it."""
        champion = (
            f"v{self.champion}"
            if self.champion
            else f"unknown ({self.registry_error})"
            if self.registry_error
            else "none yet (run `make run`)"
        )
        if self.endpoint is None:
            serving = f"down at {self.endpoint_url} ({self.endpoint_error})"
        else:
            agreement = "in sync" if self.in_sync else "NOT the champion"
            serving = f"v{self.served_version} at {self.endpoint_url} ({agreement})"
        lines = [f"Model:     {self.model_name}", f"Champion:  {champion}", f"Endpoint:  {serving}"]
        if self.metrics_url:
            lines.append(f"Metrics:   {self.metrics_url} (Prometheus scrape address)")
        traffic = (self.endpoint or {}).get("traffic")
        if traffic:
            counters = ", ".join(f"{name} {value}" for name, value in traffic.items())
            lines.append(f"Traffic:   {counters}")
        lines += self._rollout_lines()
        if self.last_drift:
            drift = self.last_drift
            lines.append(f"Drift:     {drift.get('summary', '?')} ({drift.get('recorded_at')})")
        else:
            lines.append("Drift:     no verdict yet")
        lines.append("Decisions:" if self.decisions else "Decisions: none yet")
        lines += [
            f"  {d['recorded_at']}  {d.get('decision')} v{d.get('decided_version')}: "
            f"{d.get('reason')}"
            for d in self.decisions
        ]
        return "\n".join(lines)

    def rollout_text(self) -> str:
        """The champion and the rollout under way, as a person reads them."""
        champion = f"v{self.champion}" if self.champion else f"unknown ({self.registry_error})"
        return "\n".join([f"Champion:  {champion}", *self._rollout_lines()])

    def _rollout_lines(self) -> list[str]:
        """The release's challenger, its stage and share, and the last verdict on it."""
        if self.rollout is None:
            return ["Rollout:   none under way"]
        rollout = self.rollout
        share = (
            f", canary share {rollout['canary_share']:.0%}" if rollout["stage"] == "canary" else ""
        )
        paused = " (PAUSED)" if rollout["paused"] else ""
        lines = [
            f"Rollout:   v{rollout['challenger']} in {rollout['stage']}{share} since "
            f"{rollout['stage_since_utc']}{paused}"
        ]
        last = self.last_rollout
        if last and last.get("challenger_version") == rollout["challenger"]:
            lines.append(f"Verdict:   {last.get('verdict')} ({last['recorded_at']})")
            lines += [f"  {reason}" for reason in str(last.get("reasons", "")).splitlines()]
            evidence = last.get("evidence") or {}
            if evidence:
                numbers = ", ".join(f"{name} {value}" for name, value in evidence.items())
                lines.append(f"Evidence:  {numbers}")
        else:
            lines.append("Verdict:   none yet")
        return lines


def _rollout(client: MlflowClient, model_name: str) -> dict[str, Any] | None:
    """The rollout under way from the registry, with its times readable."""
    raw = registered_model_tag(client, model_name, ROLLOUT_STATE_TAG, attempts=1)
    if not raw:
        return None
    state = RolloutState.model_validate_json(raw)
    since = dt.datetime.fromtimestamp(state.stage_since, dt.UTC)
    return state.model_dump() | {"stage_since_utc": since.isoformat(timespec="seconds")}


def _last_rollout(instance: dg.DagsterInstance) -> dict[str, Any] | None:
    """The newest rollout verdict: a rollout_report run or a rollout sensor tick."""
    key = dg.AssetKey("rollout_report")
    candidates = [
        *instance.fetch_materializations(key, limit=1).records,
        *instance.fetch_observations(key, limit=1).records,
    ]
    if not candidates:
        return None
    return _metadata(max(candidates, key=lambda record: record.timestamp), _ROLLOUT_FIELDS)


def _metadata(record: Any, fields: tuple[str, ...]) -> dict[str, Any]:
    """Selected metadata values of an event record, with the time it was recorded."""
    event = record.asset_materialization or record.asset_observation
    metadata = event.metadata if event is not None else {}
    values = {name: metadata[name].value for name in fields if name in metadata}
    stamp = dt.datetime.fromtimestamp(record.timestamp, dt.UTC)
    return values | {"recorded_at": stamp.isoformat(timespec="seconds")}


# rollout_report's verdicts that change nothing: the rules wait, or there was nothing to judge.
_NO_ACTION = frozenset({"wait", "none"})
# How many of the latest rollout_report runs are searched for actions (most of them wait).
_ROLLOUT_RUNS_SEARCHED = 200


def _decisions(instance: dg.DagsterInstance, limit: int) -> list[dict[str, Any]]:
    """The latest ``limit`` decisions of the champion and of rollouts, newest first."""
    champion = instance.fetch_materializations(dg.AssetKey("champion_model"), limit=limit)
    decisions = [(r.timestamp, _metadata(r, _DECISION_FIELDS)) for r in champion.records]
    rollout = instance.fetch_materializations(
        dg.AssetKey("rollout_report"), limit=_ROLLOUT_RUNS_SEARCHED
    )
    for record in rollout.records:
        values = _metadata(record, _ROLLOUT_FIELDS)
        if values.get("verdict", "none") in _NO_ACTION:
            continue
        decision = {
            "decision": f"rollout {values['verdict']}",
            "decided_version": values.get("challenger_version"),
            "reason": values.get("summary"),
            "recorded_at": values["recorded_at"],
        }
        decisions.append((record.timestamp, decision))
    decisions.sort(key=lambda pair: pair[0], reverse=True)
    return [decision for _, decision in decisions[:limit]]


def _last_drift(instance: dg.DagsterInstance) -> dict[str, Any] | None:
    """The newest drift verdict: a drift_report run or a drift sensor tick, whichever is later."""
    key = dg.AssetKey("drift_report")
    candidates = [
        *instance.fetch_materializations(key, limit=1).records,
        *instance.fetch_observations(key, limit=1).records,
    ]
    if not candidates:
        return None
    return _metadata(max(candidates, key=lambda record: record.timestamp), _DRIFT_FIELDS)


def collect_status(
    instance: dg.DagsterInstance,
    client: MlflowClient,
    model_name: str,
    endpoint_url: str,
    decisions: int = 5,
    timeout_s: float = 5.0,
    headers: Mapping[str, str] | None = None,
    metrics_url: str | None = None,
) -> PlatformStatus:
    """Ask the registry, the endpoint and the Dagster instance what they know now.

    Args:
        instance: the Dagster instance (drift verdicts, decisions).
        client: the MLflow registry.
        model_name: the registered model.
        endpoint_url: the endpoint's base URL.
        decisions: how many of the latest decisions to show.
        timeout_s: how long the endpoint may take to answer.
        headers: the headers of the endpoint request: an API key with the ``predict`` scope
            gets its traffic counters too (without, an endpoint with keys answers its served
            version only).
        metrics_url: the Prometheus scrape address to show.

    """
    champion, registry_error, rollout = None, None, None
    try:
        version = version_by_alias(client, model_name, CHAMPION_ALIAS, attempts=1)
        champion = str(version.version) if version is not None else None
        rollout = _rollout(client, model_name)
    except RegistryUnavailable as error:
        registry_error = str(error)
    endpoint, endpoint_error = None, None
    try:
        response = httpx.get(f"{endpoint_url}/healthz", headers=headers, timeout=timeout_s)
        if response.status_code == 200:
            endpoint = response.json()
        elif response.status_code == 401:
            endpoint_error = "/healthz refused the API key (HTTP 401): check MLPLATFORM_API_KEY"
        else:
            endpoint_error = f"/healthz answered HTTP {response.status_code}"
    except httpx.HTTPError as error:
        endpoint_error = f"no answer: {type(error).__name__}"
    return PlatformStatus(
        model_name=model_name,
        champion=champion,
        registry_error=registry_error,
        endpoint_url=endpoint_url,
        endpoint=endpoint,
        endpoint_error=endpoint_error,
        last_drift=_last_drift(instance),
        decisions=_decisions(instance, decisions),
        rollout=rollout,
        last_rollout=_last_rollout(instance),
        metrics_url=metrics_url,
    )
