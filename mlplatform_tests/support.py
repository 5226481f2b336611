"""Helpers the tests share: free ports, an isolated platform home, sensor ticks, a champion."""

import socket
import time
from pathlib import Path
from typing import Any

import dagster as dg
import mlflow
import pytest

import mlplatform.serving  # noqa: F401  (sets Ray's loopback mode before Ray is imported)
from mlplatform.defs.evaluation import evaluation_report
from mlplatform.defs.features import features
from mlplatform.defs.ingest import raw_data
from mlplatform.defs.registry import champion_model
from mlplatform.defs.training import candidate_model
from mlplatform.demo.data import generate_loans
from mlplatform.monitoring.profiles import list_traffic_windows
from mlplatform.resources import DataSource, MlflowTracking
from mlplatform.settings import PlatformSettings, load_settings

PLATFORM_VARIABLES = (
    "MLPLATFORM_SOURCE",
    "MLPLATFORM_TARGET",
    "MLPLATFORM_TIME_COLUMN",
    "MLPLATFORM_MODEL_NAME",
    "MLPLATFORM_SERVE_HOST",
    "MLPLATFORM_SERVE_PORT",
    "MLPLATFORM_ENDPOINT_URL",
    "MLPLATFORM_RAY_PORT",
    "MLFLOW_TRACKING_URI",
    "RAY_ADDRESS",
)


# Short traffic windows so tests do not wait a minute for a profile to be written.
FAST_WINDOWS = {"ops": {"model_endpoint": {"config": {"traffic_window_s": 2}}}}


def wait_for_profiled_rows(version: str, rows: int, timeout_s: float = 60.0) -> int:
    """Wait until the endpoint's traffic windows for ``version`` hold ``rows`` rows."""
    settings = load_settings()
    deadline = time.monotonic() + timeout_s
    seen = 0
    while time.monotonic() < deadline:
        seen = sum(
            w.rows for w in list_traffic_windows(settings.traffic_dir, "mlplatform", version)
        )
        if seen >= rows:
            return seen
        time.sleep(0.5)
    raise AssertionError(f"only {seen} of {rows} rows profiled for v{version}")


def tick(sensor: Any, instance: dg.DagsterInstance, cursor: str | None = None) -> Any:
    """One evaluation of a sensor of the real Definitions on ``instance``, with their resources."""
    from mlplatform.definitions import defs

    with dg.build_sensor_context(
        instance=instance, cursor=cursor, definitions=defs, resources=defs.resources
    ) as context:
        return sensor(context)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def isolate_platform(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    """Point the platform at ``home`` and forget every other platform and MLflow setting.

    MLflow keeps its tracking URI in a module global and mirrors it into MLFLOW_TRACKING_URI, so
    both are reset: otherwise one test's store would leak into the next.
    """
    monkeypatch.setenv("MLPLATFORM_HOME", str(home))
    for name in PLATFORM_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    mlflow.set_tracking_uri(None)


def train_champion(home: Path, seed: int) -> tuple[PlatformSettings, str]:
    """Train and promote a champion on 1,000 demo loans with the real assets, in ``home``.

    Returns:
        The settings of that platform home (tracking URI, traffic and feedback paths) and the
        Dagster run id.

    """
    data = home / "loans.csv"
    generate_loans(1000, seed=seed).to_csv(data, index=False)
    with pytest.MonkeyPatch.context() as patch:
        isolate_platform(patch, home)
        result = dg.materialize(
            [raw_data, features, candidate_model, evaluation_report, champion_model],
            resources={
                "data_source": DataSource(uri=str(data), target="defaulted"),
                "mlflow_tracking": MlflowTracking(),
            },
        )
        assert result.success
        return load_settings(), result.run_id
