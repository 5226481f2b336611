"""The production monitoring stack: Prometheus' configuration and alerts, Grafana's dashboard.

Checked with Prometheus' own ``promtool`` (configuration, rules, and the rules' unit tests on
synthetic series in ``deploy/prometheus/alerts_test.yml``), and against the compose file that
provisions them (there is no Docker engine here) and the metrics the endpoint exports.
"""

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from mlplatform_tests.prometheus import (
    DASHBOARD,
    GRAFANA_DIR,
    PROMETHEUS_DIR,
    dashboard_expressions,
    metrics_used,
    require_binary,
    rule_expressions,
    unknown_metrics,
)

DEPLOY = PROMETHEUS_DIR.parent


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yaml").read_text())


def promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> str:
    """Run promtool; its output, or a failure showing it."""
    result = subprocess.run(
        [require_binary("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_promtool_accepts_the_configuration_and_the_rules() -> None:
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml")
    assert "SUCCESS: 7 rules found" in promtool("check", "rules", "alerts.yml")


def test_alerts_fire_on_synthetic_series() -> None:
    # Error rate, p99, endpoint down, rollback, drift and profiler losses, each firing on the
    # series that should fire it (and not before its `for`, nor on the healthy champion).
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yml")
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS_DIR / "alerts_test.yml").read_text()))
    assert tested == {name for name, _ in rule_expressions()}


def test_rules_and_dashboard_use_only_exported_metrics() -> None:
    expressions = rule_expressions() + dashboard_expressions()
    for name, expression in expressions:
        assert not unknown_metrics(expression), (name, unknown_metrics(expression))
    # Every alert but the scrape target's own (`up`) rests on the endpoint's metrics.
    assert all(metrics_used(e) for name, e in rule_expressions() if name != "MlplatformMetricsDown")
    assert all(metrics_used(expression) for _, expression in dashboard_expressions())


def test_dashboard_shows_what_an_operator_looks_for() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    titles = [panel["title"] for panel in dashboard["panels"]]
    assert len(set(titles)) == len(titles)
    used = {
        metric for _, expression in dashboard_expressions() for metric in metrics_used(expression)
    }
    assert {
        "mlplatform_requests_total",  # requests/s
        "mlplatform_errors_total",  # error rate
        "mlplatform_request_latency_seconds_bucket",  # p99
        "mlplatform_predictions_total",  # by class
        "mlplatform_score_bucket_total",
        "mlplatform_release_stage",
        "mlplatform_canary_share",
        "mlplatform_feature_drift",
        "mlplatform_profiler",  # losses
    } <= used
    by_title = dict(dashboard_expressions())
    for title in ("Requests/s", "Error rate", "p99 latency"):
        (expression,) = [e for t, e in by_title.items() if t.startswith(title)]
        assert "by (model_version, role" in expression, title
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(set(ids)) == len(ids)


def test_compose_provisions_prometheus_and_grafana(compose: dict[str, Any]) -> None:
    services = compose["services"]
    # Prometheus scrapes the Ray head's metrics export port, by the head's hostname.
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    head = services["ray-head"]
    assert host == head["hostname"] and f"--metrics-export-port={port}" in head["command"]
    # The configuration and its rules are mounted where the command reads them.
    prometheus = services["prometheus"]
    assert "./prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert all((PROMETHEUS_DIR / name).exists() for name in config["rule_files"])
    assert any(v.endswith(":/prometheus") for v in prometheus["volumes"])
    # Grafana: its data source is that Prometheus, its dashboards the ones in deploy/grafana.
    grafana = services["grafana"]
    mounts = dict(v.rsplit(":", 2)[:2] for v in grafana["volumes"] if v.startswith("./"))
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "dashboards" / "mlplatform.yml").read_text()
    )
    (dashboards,) = provider["providers"]
    assert mounts["./grafana/dashboards"] == dashboards["options"]["path"]
    (source,) = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"]
    assert source["url"] == "http://prometheus:9090" and source["type"] == "prometheus"
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {
        target["datasource"]["uid"] for panel in dashboard["panels"] for target in panel["targets"]
    }
    assert uids == {source["uid"]}
    # Published on the bind address only, and Grafana's password must be set.
    for name in ("prometheus", "grafana"):
        for published in services[name]["ports"]:
            assert published.startswith("${MLPLATFORM_BIND_ADDRESS:-127.0.0.1}:"), name
        assert "mlplatform" in services[name]["networks"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith(
        "${GRAFANA_ADMIN_PASSWORD:?"
    )
    assert "GRAFANA_ADMIN_PASSWORD=" in (DEPLOY / ".env.example").read_text()
    for volume in ("prometheus_data", "grafana_data"):
        assert volume in compose["volumes"]
