"""Platform settings: where state lives, which data to learn from, where to serve.

Everything is read from the environment when :func:`load_settings` is called (never at import
time), so a test or a run can point the whole platform at another home by setting
``MLPLATFORM_HOME``. The Dagster resources in ``resources.py`` fall back to these values for any
field not set explicitly in run config.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

DEFAULT_HOME = ".mlplatform"
DEFAULT_MODEL_NAME = "mlplatform"
DEFAULT_SERVE_HOST = "127.0.0.1"
DEFAULT_SERVE_PORT = 8000
DEFAULT_RAY_PORT = 6379
DEFAULT_METRICS_PORT = 9400


@dataclasses.dataclass(frozen=True)
class PlatformSettings:
    """Resolved platform settings.

    Attributes:
        home: root of all platform state (Dagster storage, MLflow store, data, profiles).
        source: the raw data location (file, glob, folder or fsspec URL); ``None`` = demo data.
        target: the label column; ``None`` means the demo target (only valid for the demo).
        time_column: the column ordering rows in time; ``None`` = infer.
        model_name: the registered model's name in the MLflow registry.
        tracking_uri: the MLflow tracking (and registry) URI.
        ray_address: an existing Ray cluster; ``None`` = a local head started on demand.
        serve_host: the interface the endpoint listens on.
        serve_port: the endpoint's HTTP port.
        ray_port: the GCS port of the local Ray head (when ``ray_address`` is ``None``).
        metrics_port: where the local Ray head serves the endpoint's Prometheus metrics (on
            127.0.0.1: ``http://127.0.0.1:<port>/metrics``).
        public_url: the endpoint's URL as clients reach it; ``None`` = ``http://host:port``.
        task: ``binary``, ``multiclass`` or ``regression``; ``None`` = infer from the target.
        sensitive_features: features whose fairness gap the promotion gate bounds.

    """

    home: Path
    source: str | None
    target: str | None
    time_column: str | None
    model_name: str
    tracking_uri: str
    ray_address: str | None
    serve_host: str
    serve_port: int
    ray_port: int = DEFAULT_RAY_PORT
    metrics_port: int = DEFAULT_METRICS_PORT
    public_url: str | None = None
    task: str | None = None
    sensitive_features: tuple[str, ...] = ()

    @property
    def dagster_home(self) -> Path:
        """Dagster's instance directory (SQLite storage, logs)."""
        return self.home / "dagster"

    @property
    def mlflow_dir(self) -> Path:
        """The embedded MLflow store: SQLite database and artifacts."""
        return self.home / "mlflow"

    @property
    def mlflow_artifacts_uri(self) -> str:
        """Where experiments created by the platform keep their artifacts."""
        return (self.mlflow_dir / "artifacts").as_uri()

    @property
    def data_dir(self) -> Path:
        """Demo data and other platform-written datasets."""
        return self.home / "data"

    @property
    def profiles_dir(self) -> Path:
        """Whylogs profiles: the training reference and live traffic."""
        return self.home / "profiles"

    @property
    def traffic_dir(self) -> Path:
        """Rolling whylogs profiles of the endpoint's live traffic, per model version."""
        return self.profiles_dir / "traffic"

    @property
    def ray_dir(self) -> Path:
        """The local Ray head's token and process group (see ``serving.cluster.LocalHead``)."""
        return self.home / "ray"

    @property
    def feedback_db(self) -> Path:
        """The prediction log that ground-truth labels (``POST /feedback``) are joined to."""
        return self.home / "monitoring" / "feedback.sqlite"

    @property
    def metrics_url(self) -> str | None:
        """Where Prometheus scrapes the local head's metrics; ``None`` with a cluster of one's own.

        On a cluster (``RAY_ADDRESS``), every node exports on its own metrics export port.
        """
        if self.ray_address is not None:
            return None
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def endpoint_url(self) -> str:
        """The endpoint's base URL as clients reach it."""
        return self.public_url or f"http://{self.serve_host}:{self.serve_port}"


def load_settings(environ: Mapping[str, str] | None = None) -> PlatformSettings:
    """Read the platform settings from ``environ`` (default: the process environment).

    Variables: ``MLPLATFORM_HOME`` (default ``./.mlplatform``), ``MLPLATFORM_SOURCE``,
    ``MLPLATFORM_TARGET``, ``MLPLATFORM_TIME_COLUMN``, ``MLPLATFORM_TASK`` (default: inferred),
    ``MLPLATFORM_MODEL_NAME`` (default ``mlplatform``), ``MLFLOW_TRACKING_URI`` (default SQLite
    under the home), ``RAY_ADDRESS``,
    ``MLPLATFORM_SERVE_HOST`` (default 127.0.0.1), ``MLPLATFORM_SERVE_PORT`` (default 8000),
    ``MLPLATFORM_RAY_PORT`` (default 6379), ``MLPLATFORM_METRICS_PORT`` (default 9400, the local
    head's Prometheus metrics), ``MLPLATFORM_ENDPOINT_URL`` (default
    ``http://<host>:<port>``; set it when clients reach the endpoint through another name) and
    ``MLPLATFORM_SENSITIVE_FEATURES`` (comma-separated; default none).

    Raises:
        ValueError: if a port is not a number.

    """
    env = os.environ if environ is None else environ
    home = Path(env.get("MLPLATFORM_HOME") or DEFAULT_HOME).expanduser().resolve()
    tracking_uri = env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    return PlatformSettings(
        home=home,
        source=env.get("MLPLATFORM_SOURCE") or None,
        target=env.get("MLPLATFORM_TARGET") or None,
        time_column=env.get("MLPLATFORM_TIME_COLUMN") or None,
        model_name=env.get("MLPLATFORM_MODEL_NAME") or DEFAULT_MODEL_NAME,
        tracking_uri=tracking_uri,
        ray_address=env.get("RAY_ADDRESS") or None,
        serve_host=env.get("MLPLATFORM_SERVE_HOST") or DEFAULT_SERVE_HOST,
        serve_port=_port(env, "MLPLATFORM_SERVE_PORT", DEFAULT_SERVE_PORT),
        ray_port=_port(env, "MLPLATFORM_RAY_PORT", DEFAULT_RAY_PORT),
        metrics_port=_port(env, "MLPLATFORM_METRICS_PORT", DEFAULT_METRICS_PORT),
        public_url=(env.get("MLPLATFORM_ENDPOINT_URL") or "").rstrip("/") or None,
        task=env.get("MLPLATFORM_TASK") or None,
        sensitive_features=tuple(
            name.strip()
            for name in env.get("MLPLATFORM_SENSITIVE_FEATURES", "").split(",")
            if name.strip()
        ),
    )


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name) or str(default)
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise ValueError(f"{name} must be a port number, got {value!r}")
    return int(value)
