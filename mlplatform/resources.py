"""Dagster resources: one class per external service (data source, MLflow, Ray Serve).

Every field left unset falls back, at execution time, to :func:`mlplatform.settings.load_settings`
(environment variables with embedded defaults), so the same definitions run on a laptop and in
production, and any field can be overridden per run from the Launchpad.
"""

import glob
import warnings
from pathlib import Path
from typing import Any

import dagster as dg
import fsspec
import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from pydantic import Field, PrivateAttr

from mlplatform.demo.data import TARGET as DEMO_TARGET
from mlplatform.demo.data import write_demo_source
from mlplatform.model.registry import CHAMPION_ALIAS, registered_model_tag, version_by_alias
from mlplatform.model.spec import DataError
from mlplatform.serving import cluster
from mlplatform.serving.keys import (
    ApiKey,
    ApiKeyError,
    key_digests,
    key_for,
    load_api_keys,
    require_keys_beyond_loopback,
)
from mlplatform.serving.release import ROLLOUT_STATE_TAG, Release, RolloutState
from mlplatform.serving.settings import ServingSettings
from mlplatform.settings import (
    DEFAULT_MODEL_NAME,
    DEFAULT_SERVE_HOST,
    DEFAULT_SERVE_PORT,
    load_settings,
)

_READERS = {".csv": pd.read_csv, ".parquet": pd.read_parquet, ".pq": pd.read_parquet}


def _read_table(uri: str) -> pd.DataFrame:
    suffix = Path(uri.split("?")[0]).suffix.lower()
    reader = _READERS.get(suffix)
    if reader is None:
        raise DataError(f"cannot read {uri}: expected a .csv or .parquet file")
    with fsspec.open(uri, "rb") as handle:
        try:
            return reader(handle)
        except (ValueError, UnicodeDecodeError, pd.errors.ParserError, OSError) as error:
            raise DataError(f"cannot parse {uri} as {suffix[1:]}: {error}") from error


def expand_source(uri: str) -> list[str]:
    """The files behind a source: a file, a glob or a folder (local or any fsspec URL).

    Raises:
        DataError: if nothing matches.

    """
    filesystem, path = fsspec.core.url_to_fs(uri)
    protocol = uri.split("://")[0] + "://" if "://" in uri else ""
    if filesystem.isdir(path):
        found = sorted(
            p
            for p in filesystem.find(path)
            if Path(p).suffix.lower() in _READERS and not Path(p).name.startswith(".")
        )
    elif glob.has_magic(path):
        found = sorted(filesystem.glob(path))
    else:
        found = [path] if filesystem.exists(path) else []
    if not found:
        raise DataError(f"no data files found at {uri}")
    return [f"{protocol}{p}" if protocol and not p.startswith(protocol) else p for p in found]


class DataSource(dg.ConfigurableResource):
    """The raw tabular data: a CSV/Parquet file, glob or folder, local or an fsspec URL."""

    uri: str | None = Field(
        default=None, description="Data location; default MLPLATFORM_SOURCE, else the demo dataset."
    )
    target: str | None = Field(default=None, description="Label column; default MLPLATFORM_TARGET.")
    time_column: str | None = Field(
        default=None,
        description="Column ordering rows in time; default MLPLATFORM_TIME_COLUMN or inferred.",
    )

    def resolved_uri(self) -> str:
        """The configured source, writing the demo dataset under the platform home if none is."""
        settings = load_settings()
        uri = self.uri or settings.source
        return uri or str(write_demo_source(settings.data_dir / "demo"))

    def resolved_target(self) -> str:
        """The label column.

        Raises:
            DataError: if a custom source is configured without a target.

        """
        settings = load_settings()
        target = self.target or settings.target
        if target:
            return target
        if self.uri or settings.source:
            raise DataError(
                "set MLPLATFORM_TARGET (or the data_source resource's `target`) to the label column"
            )
        return DEMO_TARGET

    task: str | None = Field(
        default=None,
        description="binary, multiclass or regression; default MLPLATFORM_TASK, else inferred "
        "from the target.",
    )

    def resolved_task(self) -> str | None:
        """The requested learning task, if any (otherwise it is inferred from the target)."""
        return self.task or load_settings().task

    sensitive_features: list[str] | None = Field(
        default=None,
        description="Features (e.g. sex, age) whose fairness gap between slices the promotion "
        "gate bounds; default MLPLATFORM_SENSITIVE_FEATURES (comma-separated), else none. Gaps "
        "on every other feature are reported, never blocking.",
    )

    def resolved_sensitive_features(self) -> tuple[str, ...]:
        """The declared sensitive features (possibly none)."""
        if self.sensitive_features is not None:
            return tuple(self.sensitive_features)
        return load_settings().sensitive_features

    def resolved_time_column(self) -> str | None:
        """The configured time column, if any (otherwise it is inferred from the data)."""
        return self.time_column or load_settings().time_column

    def load(self) -> tuple[pd.DataFrame, str]:
        """Read every file of the source into one frame.

        Returns:
            ``(frame, uri)``.

        Raises:
            DataError: if the source is missing, unreadable or its files disagree on columns.

        """
        uri = self.resolved_uri()
        frames = [_read_table(path) for path in expand_source(uri)]
        columns = list(frames[0].columns)
        for frame in frames[1:]:
            if list(frame.columns) != columns:
                raise DataError(f"files under {uri} have different columns")
        return pd.concat(frames, ignore_index=True), uri


class MlflowTracking(dg.ConfigurableResource):
    """MLflow tracking and registry, with one MLflow run per Dagster run.

    The run is managed by dagster-mlflow's ``MlFlow`` (found or started by Dagster run id, tagged
    with it); this resource adds what it lacks: an embedded store under the platform home by
    default, and an experiment whose artifacts live beside that store.
    """

    experiment_name: str = Field(default="mlplatform", description="MLflow experiment.")
    mlflow_tracking_uri: str | None = Field(
        default=None,
        description="Tracking/registry URI; default MLFLOW_TRACKING_URI, else SQLite in the home.",
    )
    model_name: str | None = Field(
        default=None,
        description="Registered model name; default MLPLATFORM_MODEL_NAME or "
        f"'{DEFAULT_MODEL_NAME}'.",
    )
    _run: Any = PrivateAttr(default=None)  # dagster_mlflow's MlFlow, once set up

    @property
    def tracking_uri(self) -> str:
        """The resolved tracking URI."""
        return self.mlflow_tracking_uri or load_settings().tracking_uri

    @property
    def registered_model_name(self) -> str:
        """The resolved registered model name."""
        return self.model_name or load_settings().model_name

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """Point MLflow at the store, ensure the experiment exists, join this run's MLflow run.

        Outside a run (a sensor's tick) there is no run to join and nothing to set up: the
        registry is read through :meth:`client`, which names the store itself.
        """
        if context.run is None:
            return
        settings = load_settings()
        uri = self.tracking_uri
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        if mlflow.get_experiment_by_name(self.experiment_name) is None:
            local_store = not uri.startswith(("http://", "https://", "databricks"))
            mlflow.create_experiment(
                self.experiment_name,
                artifact_location=settings.mlflow_artifacts_uri if local_store else None,
            )
        with warnings.catch_warnings():
            # dagster-mlflow's resource and hooks (imported with it) are marked beta; the
            # platform uses them knowingly, so their warnings stay out of every run's output.
            warnings.simplefilter("ignore", dg.BetaWarning)
            from dagster_mlflow.resources import MlFlow

            self._run = MlFlow(context)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        """Close the MLflow run; a later step of the same Dagster run resumes it."""
        if self._run is not None:
            mlflow.end_run()

    @property
    def run_id(self) -> str:
        """The MLflow run of the current Dagster run."""
        active = mlflow.active_run()
        if active is None:
            raise RuntimeError("no active MLflow run: the resource was not set up for execution")
        return active.info.run_id

    def client(self) -> MlflowClient:
        """A registry/tracking client for the resolved URI."""
        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def version_by_alias(self, alias: str) -> ModelVersion | None:
        """The registered model version behind ``alias``, or ``None`` if the registry has none.

        Raises:
            RegistryUnavailable: the registry did not answer (retried first); never read as "no
                alias".

        """
        return version_by_alias(self.client(), self.registered_model_name, alias)

    def rollout_state(self) -> RolloutState | None:
        """The rollout under way, as the registry keeps it; ``None`` when there is none.

        Raises:
            RegistryUnavailable: the registry did not answer (retried first).

        """
        raw = registered_model_tag(self.client(), self.registered_model_name, ROLLOUT_STATE_TAG)
        return RolloutState.model_validate_json(raw) if raw else None

    def set_rollout_state(self, state: RolloutState | None) -> None:
        """Record the rollout under way in the registry (``None``: no rollout any more)."""
        client, name = self.client(), self.registered_model_name
        if state is None:
            if registered_model_tag(client, name, ROLLOUT_STATE_TAG) is not None:
                client.delete_registered_model_tag(name, ROLLOUT_STATE_TAG)
        else:
            client.set_registered_model_tag(name, ROLLOUT_STATE_TAG, state.model_dump_json())

    def desired_release(self) -> Release | None:
        """What the endpoint should serve: the `champion` alias and the rollout under way.

        ``None`` when there is no champion yet. A rollout of the champion itself (promoted by
        hand, say) is not part of the release.

        Raises:
            RegistryUnavailable: the registry did not answer (retried first).

        """
        champion = self.version_by_alias(CHAMPION_ALIAS)
        if champion is None:
            return None
        state = self.rollout_state()
        if state is None or state.challenger == str(champion.version):
            return Release(champion=str(champion.version))
        return state.release(str(champion.version))


class RayServe(dg.ConfigurableResource):
    """Ray Serve: a local head on 127.0.0.1 by default, an existing cluster with RAY_ADDRESS."""

    address: str | None = Field(
        default=None, description="Ray cluster address; default RAY_ADDRESS, else local."
    )
    host: str | None = Field(
        default=None,
        description=f"HTTP interface; default MLPLATFORM_SERVE_HOST or {DEFAULT_SERVE_HOST}.",
    )
    port: int | None = Field(
        default=None,
        description=f"HTTP port; default MLPLATFORM_SERVE_PORT or {DEFAULT_SERVE_PORT}.",
    )
    app_name: str = Field(default="mlplatform", description="Ray Serve application name.")

    @property
    def url(self) -> str:
        """The endpoint's base URL as clients reach it."""
        settings = load_settings()
        if self.host is None and self.port is None:
            return settings.endpoint_url
        return f"http://{self.host or settings.serve_host}:{self.port or settings.serve_port}"

    @property
    def serve_host(self) -> str:
        """The interface the endpoint listens on."""
        return self.host or load_settings().serve_host

    def api_keys(self) -> list[ApiKey]:
        """The configured API keys (``MLPLATFORM_API_KEYS``, ``$MLPLATFORM_HOME/api_keys``).

        Raises:
            ApiKeyError: if the configuration is invalid or the key file is not private.

        """
        return load_api_keys(load_settings().home)

    def check_access(self) -> list[ApiKey]:
        """The keys, checked to be enough to deploy with: call before anything is rolled.

        Returns:
            The keys (none: an open endpoint on loopback).

        Raises:
            ApiKeyError: if the configuration is invalid, or no key has the ``predict`` scope
                (the platform's own checks of a new deployment predict).
            ExposedWithoutKeys: if the endpoint would listen beyond loopback without keys.

        """
        keys = self.api_keys()
        require_keys_beyond_loopback(self.serve_host, key_digests(keys))
        if keys and key_for(keys, "predict") is None:
            raise ApiKeyError(
                "no configured API key has the predict scope: nobody could use the endpoint, "
                "and the deploy's own smoke test could not either"
            )
        return keys

    def deploy(
        self, serving: ServingSettings, release: Release | None = None, timeout_s: float = 180.0
    ) -> None:
        """Deploy or roll forward the endpoint (see :func:`mlplatform.serving.cluster.deploy`).

        The endpoint accepts the configured API keys (only their digests reach Ray). A change
        of ``release`` alone is applied in place, without restarting replicas.
        """
        settings = load_settings()
        cluster.deploy(
            serving,
            ray_address=self.address or settings.ray_address,
            host=self.serve_host,
            port=self.port or settings.serve_port,
            app_name=self.app_name,
            local_head=cluster.LocalHead(
                settings.ray_port, settings.ray_dir, metrics_port=settings.metrics_port
            ),
            timeout_s=timeout_s,
            api_keys=key_digests(self.api_keys()),
            release=release,
        )
