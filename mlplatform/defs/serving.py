"""Serving: deploy the champion to Ray Serve, wait until it answers, smoke-test it."""

import dataclasses
import datetime as dt
import json
import statistics
import time
from collections.abc import Iterator
from typing import Any

import dagster as dg
import httpx
from pydantic import Field

from mlplatform.model.registry import ModelRef
from mlplatform.resources import MlflowTracking, RayServe
from mlplatform.serving.cluster import wait_until_serving
from mlplatform.serving.settings import ServingKnobs, ServingSettings
from mlplatform.settings import load_settings


@dataclasses.dataclass(frozen=True)
class EndpointInfo:
    """A live deployment: where it answers and which model version it serves."""

    url: str
    model_name: str
    model_version: str
    model_uri: str
    deployed_at: str
    example_record: dict[str, Any]

    @property
    def curl_example(self) -> str:
        """A ready-to-paste request for the endpoint."""
        body = json.dumps({"records": [self.example_record]})
        return f"curl -s -X POST {self.url}/predict -H 'Content-Type: application/json' -d '{body}'"


class EndpointConfig(ServingKnobs, dg.Config):
    """Deployment knobs: the serving app's (with their defaults), and the deployment's checks."""

    ready_timeout_s: float = Field(
        default=180.0, description="How long to wait for the new version."
    )
    max_p50_latency_ms: float = Field(
        default=250.0, description="Latency bound of the endpoint check."
    )
    traffic_profiling: bool = Field(
        default=True,
        description="Profile live traffic with whylogs (for drift) and log predictions (for "
        "POST /feedback) under the platform home.",
    )

    def serving_settings(self, model_uri: str, tracking_uri: str) -> ServingSettings:
        """The serving app's settings for ``model_uri`` under these knobs.

        Traffic profiles and the prediction log go under the platform home (``MLPLATFORM_HOME``).
        """
        platform = load_settings()
        return ServingSettings.for_deployment(
            self,
            model_uri=model_uri,
            tracking_uri=tracking_uri,
            traffic_dir=str(platform.traffic_dir) if self.traffic_profiling else None,
            feedback_db=str(platform.feedback_db) if self.traffic_profiling else None,
        )


def smoke_test(url: str, record: dict[str, Any], expected_version: str) -> dict[str, Any]:
    """POST one real record; the answer must come from ``expected_version``.

    Raises:
        RuntimeError: on any non-200 answer or a different serving version.

    """
    response = httpx.post(f"{url}/predict", json={"records": [record]}, timeout=30)
    if response.status_code != 200:
        raise RuntimeError(f"smoke test got HTTP {response.status_code}: {response.text[:500]}")
    body = response.json()
    if body["model_version"] != expected_version:
        raise RuntimeError(
            f"smoke test answered by v{body['model_version']}, expected v{expected_version}"
        )
    return body


def measure_latency_ms(url: str, record: dict[str, Any], requests: int = 20) -> list[float]:
    """Wall-clock latency of sequential single-record predictions, in milliseconds."""
    latencies = []
    with httpx.Client(timeout=30) as client:
        for _ in range(requests):
            start = time.perf_counter()
            client.post(f"{url}/predict", json={"records": [record]}).raise_for_status()
            latencies.append((time.perf_counter() - start) * 1000)
    return latencies


@dg.asset(
    group_name="serving",
    kinds={"ray"},
    owners=["team:ml-platform"],
    check_specs=[dg.AssetCheckSpec("endpoint_health", asset="model_endpoint")],
)
def model_endpoint(
    context: dg.AssetExecutionContext,
    config: EndpointConfig,
    champion_model: ModelRef,
    ray_serve: RayServe,
    mlflow_tracking: MlflowTracking,
) -> Iterator[dg.Output[EndpointInfo] | dg.AssetCheckResult]:
    """The champion live on Ray Serve over HTTP, updated in place (rolling, no downtime)."""
    serving = config.serving_settings(champion_model.uri, mlflow_tracking.tracking_uri)
    started = time.perf_counter()
    ray_serve.deploy(serving)
    url = ray_serve.url
    wait_until_serving(url, champion_model.version, timeout_s=config.ready_timeout_s)
    deploy_seconds = time.perf_counter() - started
    card = httpx.get(f"{url}/model", timeout=30).json()
    record = card["example_record"]
    answer = smoke_test(url, record, champion_model.version)
    info = EndpointInfo(
        url=url,
        model_name=champion_model.name,
        model_version=champion_model.version,
        model_uri=champion_model.uri,
        deployed_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        example_record=record,
    )
    context.log.info(f"serving {champion_model.uri} at {url}")
    yield dg.Output(
        info,
        metadata={
            "url": dg.MetadataValue.url(url),
            "docs": dg.MetadataValue.url(f"{url}/docs"),
            "model_version": champion_model.version,
            "model_uri": champion_model.uri,
            "mlflow_run_id": champion_model.mlflow_run_id,
            "deploy_seconds": round(deploy_seconds, 1),
            "smoke_test": dg.MetadataValue.json(answer),
            "curl": dg.MetadataValue.md(f"```\n{info.curl_example}\n```"),
        },
    )
    latencies = measure_latency_ms(url, record)
    p50 = statistics.median(latencies)
    yield dg.AssetCheckResult(
        check_name="endpoint_health",
        passed=p50 <= config.max_p50_latency_ms,
        description=(
            f"serving v{champion_model.version}; p50 {p50:.1f} ms over {len(latencies)} requests"
        ),
        metadata={
            "p50_ms": round(p50, 2),
            "max_ms": round(max(latencies), 2),
            "bound_ms": config.max_p50_latency_ms,
        },
    )
