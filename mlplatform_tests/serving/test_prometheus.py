"""The endpoint's metrics end to end: replica, Ray's metrics export, a real Prometheus, PromQL.

The session's Ray head exports metrics on a port of its own, bound to 127.0.0.1 only. A real
Prometheus server scrapes it with deploy/'s configuration (the ``ray_`` prefix stripped), the
endpoint answers a known number of requests, and PromQL over Prometheus' HTTP API must count
exactly those, per model version; every dashboard expression and alert rule is evaluated there.
"""

import subprocess
import time
from pathlib import Path

import httpx
import pytest

from mlplatform.monitoring.drift_summary import DriftSummary, FeatureDrift, write_drift_summary
from mlplatform.serving.cluster import LocalHead
from mlplatform_tests.prometheus import dashboard_expressions, query, running_prometheus
from mlplatform_tests.support import deployed, loan_records, recorded_serving, train_champion

APP = "prometheus"
SINGLES, BATCHES, BATCH_ROWS, INVALID = 30, 5, 10, 3


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
    # The latest drift report, as drift_report leaves it for the replicas.
    drift = DriftSummary("1", 1_700_000_000.0, 800, (FeatureDrift("income", 0.42, True, "ks"),))
    write_drift_summary(settings.traffic_dir, "mlplatform", drift)
    records = loan_records(SINGLES + BATCHES * BATCH_ROWS, seed=9)

    with (
        deployed(recorded_serving(settings), serve_port, APP) as endpoint,
        running_prometheus(f"127.0.0.1:{ray_head.metrics_port}", tmp_path) as url,
        httpx.Client(timeout=30) as client,
    ):
        # The head's metrics are served on loopback only.
        assert listening_addresses(ray_head.metrics_port) == {"127.0.0.1"}
        for record in records[:SINGLES]:
            answer = client.post(f"{endpoint}/predict", json={"records": [record]})
            assert answer.status_code == 200
            assert answer.headers["X-Model-Version"] == "1"
            assert answer.headers["X-Model-Role"] == "champion"
        for start in range(SINGLES, len(records), BATCH_ROWS):
            batch = records[start : start + BATCH_ROWS]
            assert client.post(f"{endpoint}/predict", json={"records": batch}).status_code == 200
        for _ in range(INVALID):
            refused = client.post(f"{endpoint}/predict", json={"records": [{"x": 1}]})
            assert refused.status_code == 422
        sent = SINGLES + BATCHES + INVALID
        ours = f'application="{APP}"'

        wait_for_value(
            url,
            f"sum by (model_version) (mlplatform_requests_total{{{ours}}})",
            "model_version",
            {"1": sent},
        )
        assert scalar_by(url, f"sum by (code) (mlplatform_requests_total{{{ours}}})", "code") == {
            "2xx": SINGLES + BATCHES,
            "4xx": INVALID,
        }
        assert scalar_by(url, f"sum by (status) (mlplatform_errors_total{{{ours}}})", "status") == {
            "422": INVALID
        }
        assert scalar_by(
            url, f"sum by (role) (mlplatform_request_latency_seconds_count{{{ours}}})", "role"
        ) == {"champion": sent}
        rows = SINGLES + BATCHES * BATCH_ROWS
        assert (
            sum(
                scalar_by(
                    url,
                    f"sum by (prediction) (mlplatform_predictions_total{{{ours}}})",
                    "prediction",
                ).values()
            )
            == rows
        )
        assert scalar_by(
            url, f'sum by (le) (mlplatform_score_bucket_total{{{ours},le="+Inf"}})', "le"
        ) == {"+Inf": rows}
        # The gauges set when the replica started and by its flushing thread.
        assert scalar_by(url, f"mlplatform_release_stage{{{ours}}}", "stage") == {
            "none": 1,
            "shadow": 0,
            "canary": 0,
        }
        assert scalar_by(url, f"mlplatform_feature_drift{{{ours}}}", "feature") == {"income": 0.42}
        wait_for_value(url, f"mlplatform_profiler_up{{{ours}}}", "role", {"champion": 1})

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
