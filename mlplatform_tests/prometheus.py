"""The deploy/ monitoring files as tests read them, and a real Prometheus server to scrape with.

The server is Debian's ``prometheus`` binary (CI installs it with ``promtool``), started on
127.0.0.1 at a free port with its own storage under a temporary directory, with the scrape and
relabelling configuration of ``deploy/prometheus/prometheus.yml`` pointed at the target given,
and stopped by its pid.
"""

import contextlib
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

from mlplatform.serving.metrics import METRIC_NAMES
from mlplatform_tests.support import free_port

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
GRAFANA_DIR = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "mlplatform.json"
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
_METRIC = re.compile(r"\bmlplatform_[a-z0-9_]+")


def require_binary(name: str) -> str:
    """The path of a Prometheus binary; fails (never skips) when it is not installed."""
    path = shutil.which(name)
    assert path, f"{name} is not installed: `apt-get install prometheus` (.ci/run does)"
    return path


def dashboard_expressions() -> list[tuple[str, str]]:
    """``(panel title, PromQL)`` of every target of the Grafana dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel["targets"]
    ]


def rule_expressions() -> list[tuple[str, str]]:
    """``(alert name, PromQL)`` of every alert rule."""
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    return [(rule["alert"], rule["expr"]) for group in rules["groups"] for rule in group["rules"]]


def unknown_metrics(expression: str) -> set[str]:
    """The ``mlplatform_*`` names an expression uses that the endpoint does not export."""
    known = set(METRIC_NAMES) | {
        name + suffix for name in METRIC_NAMES for suffix in _HISTOGRAM_SUFFIXES
    }
    return set(_METRIC.findall(expression)) - known


def metrics_used(expression: str) -> set[str]:
    """The ``mlplatform_*`` names an expression uses."""
    return set(_METRIC.findall(expression))


@contextlib.contextmanager
def running_prometheus(target: str, directory: Path) -> Iterator[str]:
    """A Prometheus server scraping ``target`` (``host:port``) every second, as deploy/ configures.

    Yields:
        Its base URL, once it answers ready.

    """
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"] |= {"scrape_interval": "1s", "evaluation_interval": "1s"}
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [target]}]
    shutil.copy(PROMETHEUS_DIR / "alerts.yml", directory / "alerts.yml")
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (directory / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            require_binary("prometheus"),
            f"--config.file={directory / 'prometheus.yml'}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-lifecycle",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (directory / "prometheus.log").read_text()[-2000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "Prometheus was not ready within 60 s"
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def query(url: str, promql: str) -> list[dict[str, Any]]:
    """The result of an instant PromQL query over Prometheus' HTTP API.

    Raises:
        AssertionError: if Prometheus refuses the query (a syntax error, say), with its reason.

    """
    answer = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10).json()
    assert answer["status"] == "success", f"{promql}: {answer.get('error')}"
    return answer["data"]["result"]
