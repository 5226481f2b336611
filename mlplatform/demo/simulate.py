"""A traffic simulator: realistic loan applications sent to the endpoint, optionally drifted.

``python -m mlplatform simulate --rate 20 --duration 60 --drift 0.8 --labels 0.5`` sends demo
applications at a steady rate (open loop, like real clients), posts the true outcome of a share of
them to ``POST /feedback`` after a delay (as labels arrive in real life), and, with drift, moves
the demo training source to the drifted population too, so that a retrain on fresh data helps.
With ``users``, each request comes from one of that many simulated users and names it in the
``X-Request-Key`` header, so a canary answers each user with the same model throughout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import statistics
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd

from mlplatform.demo.data import TARGET, generate_loans

# Columns the demo generator adds that are not model inputs.
_NOT_INPUTS = (TARGET, "application_id")

# The endpoint's header naming the role of the model that answered (champion, canary).
ROLE_HEADER = "X-Model-Role"
# The header a request is assigned to a model of the release by (``serving.release``); repeated
# here because the demo sits below the serving layer.
REQUEST_KEY_HEADER = "X-Request-Key"


def user_key(number: int) -> str:
    """The request key of simulated user ``number``."""
    return f"user-{number:05d}"


@dataclasses.dataclass(frozen=True)
class SimulationReport:
    """What a simulation sent and what came back.

    Attributes:
        requests: requests sent.
        records: records sent (``requests * batch_size``).
        ok: requests answered with 200.
        errors: status code (or exception name) -> count, for the others.
        latency_ms_p50: median request latency.
        latency_ms_p99: 99th percentile request latency.
        versions: model versions that answered, with their request counts.
        roles: the answering model's role (``champion``, ``canary``), with request counts; empty
            when the endpoint does not name it.
        users: simulated users who answered by role: ``{role: distinct users}``.
        labels_sent: ground-truth labels posted to /feedback.
        labels_matched: labels the endpoint matched to a logged prediction.
        seconds: wall-clock duration.

    """

    requests: int
    records: int
    ok: int
    errors: dict[str, int]
    latency_ms_p50: float
    latency_ms_p99: float
    versions: dict[str, int]
    labels_sent: int
    labels_matched: int
    seconds: float
    roles: dict[str, int] = dataclasses.field(default_factory=dict)
    users: dict[str, int] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        """One line for the terminal."""
        versions = ", ".join(f"v{v}: {n}" for v, n in sorted(self.versions.items()))
        if self.roles:
            versions += " (" + ", ".join(f"{r}: {n}" for r, n in sorted(self.roles.items())) + ")"
        return (
            f"{self.requests} requests ({self.records} records) in {self.seconds:.1f} s: "
            f"{self.ok} ok, errors {self.errors or 'none'}; latency p50 {self.latency_ms_p50:.1f} "
            f"ms, p99 {self.latency_ms_p99:.1f} ms; served by {versions or 'nobody'}; labels "
            f"{self.labels_matched}/{self.labels_sent} matched"
        )


def traffic_records(n_records: int, drift: float, seed: int) -> tuple[list[dict], list[int]]:
    """Demo applications as JSON-ready records, and their true outcomes."""
    frame = generate_loans(n_rows=n_records, seed=seed, drift=drift)
    labels = frame[TARGET].astype(int).tolist()
    inputs = frame.drop(columns=list(_NOT_INPUTS)).astype(object)
    records = json.loads(inputs.where(inputs.notna(), None).to_json(orient="records"))
    return records, labels


def move_demo_source(path: Path, drift: float, n_rows: int = 5000, seed: int = 11) -> Path:
    """Replace the demo training data with a sample of the drifted population (atomically).

    The new rows are dated in the year before today, after any earlier demo data, as fresh data
    would be.
    """
    start = (pd.Timestamp.now(tz="UTC") - pd.Timedelta(days=365)).strftime("%Y-%m-%d")
    frame = generate_loans(n_rows=n_rows, seed=seed, drift=drift, start=start)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    frame.to_csv(temporary, index=False)
    temporary.replace(path)
    return path


def _bearer(key: str | None) -> dict[str, str]:
    """The ``Authorization`` header of a request with ``key``, if any."""
    return {"Authorization": f"Bearer {key}"} if key else {}


async def _simulate(
    url: str,
    rate: float,
    duration_s: float,
    records: list[dict],
    labels: list[int],
    batch_size: int,
    label_share: float,
    label_delay_s: float,
    seed: int,
    predict_key: str | None,
    feedback_key: str | None,
    users: int | None,
) -> SimulationReport:
    rng = np.random.default_rng(seed)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    versions: dict[str, int] = {}
    roles: dict[str, int] = {}
    users_by_role: dict[str, set[str]] = {}
    answered: list[tuple[str, int]] = []  # (request_id, first record's position)
    n_requests = max(1, int(rate * duration_s))
    senders = rng.integers(0, users, n_requests) if users else None
    started = time.perf_counter()

    async def send(client: httpx.AsyncClient, number: int) -> None:
        first = (number * batch_size) % len(records)
        body = {"records": [records[(first + i) % len(records)] for i in range(batch_size)]}
        headers = _bearer(predict_key)
        if senders is not None:
            headers[REQUEST_KEY_HEADER] = user_key(int(senders[number]))
        sent = time.perf_counter()
        try:
            response = await client.post(f"{url}/predict", json=body, headers=headers)
        except httpx.HTTPError as error:
            errors[type(error).__name__] = errors.get(type(error).__name__, 0) + 1
            return
        latencies.append((time.perf_counter() - sent) * 1000)
        if response.status_code != 200:
            errors[str(response.status_code)] = errors.get(str(response.status_code), 0) + 1
            return
        answer = response.json()
        versions[answer["model_version"]] = versions.get(answer["model_version"], 0) + 1
        role = response.headers.get(ROLE_HEADER)
        if role is not None:
            roles[role] = roles.get(role, 0) + 1
            users_by_role.setdefault(role, set()).add(headers.get(REQUEST_KEY_HEADER, ""))
        answered.append((answer["request_id"], first))

    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        tasks = []
        for number in range(n_requests):
            # Open loop: requests leave on schedule whether or not earlier ones were answered.
            delay = started + number / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(client, number)))
        await asyncio.gather(*tasks)
        labels_sent = labels_matched = 0
        chosen = [item for item in answered if rng.random() < label_share]
        if chosen:
            await asyncio.sleep(label_delay_s)
            items = [
                {"request_id": rid, "index": i, "label": labels[(first + i) % len(labels)]}
                for rid, first in chosen
                for i in range(batch_size)
            ]
            for start in range(0, len(items), 1000):
                response = await client.post(
                    f"{url}/feedback",
                    json={"labels": items[start : start + 1000]},
                    headers=_bearer(feedback_key),
                )
                response.raise_for_status()
                labels_sent += len(items[start : start + 1000])
                labels_matched += response.json()["matched"]
    ordered = sorted(latencies) or [float("nan")]
    return SimulationReport(
        requests=n_requests,
        records=n_requests * batch_size,
        ok=len(answered),
        errors=errors,
        latency_ms_p50=statistics.median(ordered),
        latency_ms_p99=ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        versions=versions,
        labels_sent=labels_sent,
        labels_matched=labels_matched,
        seconds=time.perf_counter() - started,
        roles=roles,
        users={role: len(keys - {""}) for role, keys in users_by_role.items()},
    )


def simulate(
    url: str,
    rate: float,
    duration_s: float,
    drift: float = 0.0,
    seed: int = 0,
    batch_size: int = 1,
    label_share: float = 0.0,
    label_delay_s: float = 2.0,
    predict_key: str | None = None,
    feedback_key: str | None = None,
    users: int | None = None,
) -> SimulationReport:
    """Send demo traffic to the endpoint at ``url`` and, optionally, labels for it.

    Args:
        url: the endpoint's base URL.
        rate: requests per second (open loop).
        duration_s: how long to send.
        drift: 0 to 1, how far the applications have moved from the training population.
        seed: random seed of the applications and of which get labels.
        batch_size: records per request.
        label_share: share of answered requests whose true outcome is posted to ``/feedback``.
        label_delay_s: wait before posting labels (predictions are logged within a second).
        predict_key: the API key sent with predictions (``None``: an endpoint without keys).
        feedback_key: the API key sent with labels (a key with the ``feedback`` scope).
        users: simulated users the requests come from, each naming itself in the
            ``X-Request-Key`` header (``None``: no key; the endpoint assigns by request id).

    Raises:
        ValueError: on a non-positive rate, duration, batch size or number of users, or drift
            outside [0, 1].

    """
    if rate <= 0 or duration_s <= 0 or batch_size < 1 or (users is not None and users < 1):
        raise ValueError("rate, duration, batch size and users must be positive")
    n_records = max(1, int(rate * duration_s)) * batch_size
    records, labels = traffic_records(min(n_records, 200_000), drift, seed)
    return asyncio.run(
        _simulate(
            url.rstrip("/"),
            rate,
            duration_s,
            records,
            labels,
            batch_size,
            label_share,
            label_delay_s,
            seed,
            predict_key,
            feedback_key,
            users,
        )
    )
