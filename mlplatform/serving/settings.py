"""The serving application's settings: one pydantic model per concern, each default written once.

:class:`TrafficKnobs` are the traffic recorder's settings, :class:`ServingKnobs` everything a user
tunes about an endpoint (they include the traffic knobs), and :class:`ServingSettings` adds what
one deployment serves and where it writes. The Dagster config of the ``model_endpoint`` asset
inherits :class:`ServingKnobs`, the recorder reads :class:`TrafficKnobs`: neither repeats a field
or a default. Imports nothing from Dagster or Ray.
"""

from typing import Self

from pydantic import BaseModel, Field, model_validator


class TrafficKnobs(BaseModel):
    """How a replica profiles its live traffic and logs its predictions, off the request path."""

    traffic_window_s: int = Field(default=60, gt=0, description="Seconds per traffic profile.")
    traffic_max_queue: int = Field(
        default=10_000, gt=0, description="Requests waiting to be profiled before new ones drop."
    )
    traffic_linger_s: float = Field(
        default=5.0,
        gt=0,
        description="Longest a record waits to be profiled with others: a whylogs call costs "
        "tens of milliseconds whatever its size, so fewer, larger calls keep profiling cheap "
        "(windows are still written when they end).",
    )
    traffic_batch_rows: int = Field(
        default=50_000, gt=0, description="Most records profiled in one whylogs call."
    )
    traffic_drain_interval_s: float = Field(
        default=0.25,
        ge=0,
        description="Shortest time between two takes from the recorder's queue: under load, one "
        "prediction-log transaction per interval instead of one per request.",
    )
    traffic_retention_days: float = Field(
        default=30.0,
        gt=0,
        description="Days traffic profiles and logged predictions are kept; older ones are "
        "deleted by the replicas' recorders (checked at most hourly, when a window is written).",
    )
    traffic_retention_mb: float = Field(
        default=2048.0,
        gt=0,
        description="Most disk space the model's traffic profiles may take; the oldest windows "
        "are deleted beyond it (at the same passes as the retention in days).",
    )
    prediction_log_max_rows: int = Field(
        default=10_000_000,
        gt=0,
        description="Most of the model's predictions kept in the prediction log; the oldest are "
        "deleted beyond it (at the same passes as the retention in days).",
    )


class ServingKnobs(TrafficKnobs):
    """What a user tunes about an endpoint: limits, batching, replicas and traffic profiling."""

    max_records: int = Field(default=10_000, gt=0, description="Largest batch per request.")
    max_body_bytes: int = Field(default=16 * 1024 * 1024, gt=0, description="Largest request body.")
    max_feedback_labels: int = Field(
        default=10_000, gt=0, description="Most labels per POST /feedback request."
    )
    max_batch_size: int = Field(
        default=64, gt=0, description="Micro-batch size for single-record requests."
    )
    batch_wait_timeout_s: float = Field(
        default=0.0,
        ge=0,
        description="Longest wait for more single records to join a micro-batch. 0: only those "
        "already waiting (under load they queue while a batch is predicted, so batches form; "
        "waiting adds its time to every answer at low load).",
    )
    num_replicas: int = Field(
        default=1,
        gt=0,
        description="Serving replicas, each a process answering HTTP itself behind HAProxy. One "
        "batches every waiting single record into one model call (which costs milliseconds "
        "whatever its size); more use more cores but split the batches.",
    )
    max_ongoing_requests: int = Field(default=128, gt=0, description="Concurrency per replica.")
    replica_cpus: float = Field(default=0.5, gt=0, description="CPUs reserved per replica.")
    access_log: bool = Field(
        default=False,
        description="Write Ray Serve's access log line per request (replica log files); costs "
        "about 4% of a replica's time at full load.",
    )


class ServingSettings(ServingKnobs):
    """Arguments of the serving application (the Ray Serve app builder's typed args).

    The knobs, plus what this deployment serves and where it writes.
    """

    model_uri: str | None = Field(
        default=None,
        description="models:/<name>/<version> or models:/<name>@<alias>: the one model served "
        "when the deployment is given no release (``user_config``).",
    )
    model_name: str | None = Field(
        default=None,
        description="The registered model whose versions the release (``user_config``) names.",
    )
    tracking_uri: str | None = Field(default=None, description="MLflow tracking/registry URI.")
    traffic_dir: str | None = Field(
        default=None, description="Where live-traffic profiles go; None = no traffic profiling."
    )
    feedback_db: str | None = Field(
        default=None, description="Prediction log for POST /feedback; None = no feedback."
    )

    @model_validator(mode="after")
    def _names_a_model(self) -> Self:
        if self.model_uri is None and self.model_name is None:
            raise ValueError("give model_uri (one model) or model_name (a release of its versions)")
        return self

    @classmethod
    def for_deployment(cls, knobs: ServingKnobs, **deployment: str | None) -> Self:
        """The settings of one deployment: ``knobs`` (any subclass) plus its own values.

        Args:
            knobs: the tuned knobs; fields of a subclass beyond :class:`ServingKnobs` (a Dagster
                config's own, say) are left out.
            **deployment: ``model_uri`` or ``model_name``, and optionally ``tracking_uri``,
                ``traffic_dir``, ``feedback_db``.

        Returns:
            The validated settings.

        """
        return cls(**knobs.model_dump(include=set(ServingKnobs.model_fields)), **deployment)
