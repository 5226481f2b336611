"""The endpoint's metrics end to end: replica, Ray's metrics export, a real Prometheus, PromQL.

The session's Ray head exports metrics on a port of its own, bound to 127.0.0.1 only. A real
Prometheus server scrapes it with deploy/'s configuration (the ``ray_`` prefix stripped), a
release of two versions in canary answers a known number of requests (each request's version
known in advance from its key), and PromQL over Prometheus' HTTP API must count exactly those,
per model version and role; the challenger rolled back is counted; every dashboard expression
and alert rule is evaluated there.
"""

import subprocess
import time
from pathlib import Path

import httpx
import pytest

from mlplatform.demo.data import TARGET
from mlplatform.monitoring.drift_summary import DriftSummary, FeatureDrift, write_drift_summary
from mlplatform.serving import cluster
from mlplatform.serving.cluster import LocalHead
from mlplatform.serving.release import REQUEST_KEY_HEADER, Release, answered_by_challenger
from mlplatform.serving.settings import ServingSettings
from mlplatform_tests.prometheus import dashboard_expressions, query, running_prometheus
from mlplatform_tests.support import (
    deployed,
    isolate_platform,
    loan_records,
    register_copy,
    train_champion,
)

APP = "prometheus"
SINGLES, BATCHES, BATCH_ROWS, INVALID = 40, 6, 10, 3
CANARY = Release(
    champion="1", challenger="2", stage="canary", canary_share=0.5, rollout_id="v2-metrics"
)


def listening_addresses(port: int) -> set[str]:
    """The local addresses something listens on at ``port`` (``ss -tln``)."""
    lines = subprocess.run(
        ["ss", "-tlnH", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    return {line.split()[3].rsplit(":", 1)[0] for line in lines}


def scalar_by(url: str, promql: str, label: str) -> dict[str, float]:
    """An instant query's values by one label."""
    return {each["metric"].get(label, ""): float(each["value"][1]) for each in query(url, promql)}


def wait_for_value(url: str, promql: str, label: str, expected: dict[str, float]) -> None:
    """Poll until the query gives ``expected``: Ray hands metrics over every few seconds."""
    deadline = time.monotonic() + 120
    while (got := scalar_by(url, promql, label)) != expected:
        assert time.monotonic() < deadline, f"{promql} = {got}, expected {expected}"
        time.sleep(1)


@pytest.mark.ray
def test_prometheus_counts_every_request_per_version(
    ray_head: LocalHead, serve_port: int, tmp_path: Path
):
    assert ray_head.metrics_port is not None
    home = tmp_path / "platform"
    home.mkdir()
    settings, _ = train_champion(home, seed=8)
    with pytest.MonkeyPatch.context() as patch:
        isolate_platform(patch, home)
        assert register_copy("1", tmp_path / "copy") == "2"
    serving = ServingSettings(
        model_name="mlplatform",
        tracking_uri=settings.tracking_uri,
        traffic_dir=str(settings.traffic_dir),
        feedback_db=str(settings.feedback_db),
    )
    # The latest drift report, as drift_report leaves it for the replicas.
    drift = DriftSummary("1", 1_700_000_000.0, 800, (FeatureDrift("income", 0.42, True, "ks"),))
    write_drift_summary(settings.traffic_dir, "mlplatform", drift)
    records = [
        {k: v for k, v in r.items() if k != TARGET}
        for r in loan_records(SINGLES + BATCHES * BATCH_ROWS, seed=9)
    ]
    # Each request's key decides its version: what Prometheus must count is known in advance.
    keys = [f"client-{n}" for n in range(SINGLES + BATCHES)]
    expected_version = [
        "2" if answered_by_challenger(key, CANARY.canary_share) else "1" for key in keys
    ]
    assert set(expected_version) == {"1", "2"}

    with (
        deployed(serving, serve_port, APP, release=CANARY) as endpoint,
        running_prometheus(f"127.0.0.1:{ray_head.metrics_port}", tmp_path) as url,
        httpx.Client(timeout=30) as client,
    ):
        # The head's metrics are served on loopback only.
        assert listening_addresses(ray_head.metrics_port) == {"127.0.0.1"}
        bodies = [[record] for record in records[:SINGLES]] + [
            records[start : start + BATCH_ROWS]
            for start in range(SINGLES, len(records), BATCH_ROWS)
        ]
        rows = {"1": 0, "2": 0}
        for key, version, body in zip(keys, expected_version, bodies, strict=True):
            answer = client.post(
                f"{endpoint}/predict", json={"records": body}, headers={REQUEST_KEY_HEADER: key}
            )
            assert answer.status_code == 200
            assert answer.headers["X-Model-Version"] == version == answer.json()["model_version"]
            assert answer.headers["X-Model-Role"] == ("canary" if version == "2" else "champion")
            rows[version] += len(body)
        for _ in range(INVALID):  # refused before any version was chosen: the champion's
            refused = client.post(f"{endpoint}/predict", json={"records": [{"x": 1}]})
            assert refused.status_code == 422
        sent = {v: expected_version.count(v) + (INVALID if v == "1" else 0) for v in ("1", "2")}
        ours = f'application="{APP}"'

        per_version = f"sum by (model_version) (mlplatform_requests_total{{{ours}}})"
        wait_for_value(url, per_version, "model_version", sent)
        print(f"FIGURE PromQL {per_version} -> {scalar_by(url, per_version, 'model_version')}")
        assert scalar_by(url, f"sum by (role) (mlplatform_requests_total{{{ours}}})", "role") == {
            "champion": sent["1"],
            "canary": sent["2"],
        }
        assert scalar_by(url, f"sum by (code) (mlplatform_requests_total{{{ours}}})", "code") == {
            "2xx": SINGLES + BATCHES,
            "4xx": INVALID,
        }
        assert scalar_by(url, f"sum by (status) (mlplatform_errors_total{{{ours}}})", "status") == {
            "422": INVALID
        }
        assert (
            scalar_by(
                url,
                f"sum by (model_version) (mlplatform_request_latency_seconds_count{{{ours}}})",
                "model_version",
            )
            == sent
        )
        assert (
            scalar_by(
                url,
                f"sum by (model_version) (mlplatform_predictions_total{{{ours}}})",
                "model_version",
            )
            == rows
        )
        assert (
            scalar_by(
                url,
                f'sum by (model_version) (mlplatform_score_bucket_total{{{ours},le="+Inf"}})',
                "model_version",
            )
            == rows
        )
        # The gauges set with the release and by the replica's flushing thread.
        assert scalar_by(url, f"max by (stage) (mlplatform_release_stage{{{ours}}})", "stage") == {
            "none": 0,
            "shadow": 0,
            "canary": 1,
        }
        assert scalar_by(url, f"max(mlplatform_canary_share{{{ours}}})", "") == {"": 0.5}
        assert scalar_by(url, f"mlplatform_feature_drift{{{ours}}}", "feature") == {"income": 0.42}
        wait_for_value(
            url,
            f"min by (model_version) (mlplatform_profiler_up{{{ours}}})",
            "model_version",
            {"1": 1, "2": 1},
        )

        # The challenger rolled back (the release loses it, in place): counted once per replica.
        cluster.deploy(
            serving,
            ray_address=None,
            host="127.0.0.1",
            port=serve_port,
            app_name=APP,
            local_head=None,
            route_prefix=f"/{APP}",
            release=Release(champion="1"),
        )
        wait_for_value(
            url,
            f"max by (model_version, stage) (mlplatform_rollbacks_total{{{ours}}})",
            "stage",
            {"canary": 1},
        )
        assert (
            scalar_by(url, f"max by (stage) (mlplatform_release_stage{{{ours}}})", "stage")["none"]
            == 1
        )

        # Every dashboard expression and alert rule is valid PromQL for this Prometheus.
        for _, expression in dashboard_expressions():
            concrete = expression.replace("$model", "mlplatform")
            query(url, concrete.replace("$__rate_interval", "1m"))  # raises on a bad query
        deadline = time.monotonic() + 30
        while True:
            groups = httpx.get(f"{url}/api/v1/rules", timeout=10).json()["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            if len(rules) == 7 and all(rule["health"] == "ok" for rule in rules):
                break
            assert time.monotonic() < deadline, rules
            time.sleep(1)
