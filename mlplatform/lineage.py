"""Lineage: from a registered model version (or a prediction) back to the exact raw data.

The chain is walked with Dagster's and MLflow's public APIs only:

1. the MLflow model version: its tags (``dagster_run_id``, ``data_version``, code and promotion)
   and its MLflow run;
2. the Dagster run that trained it, and that run's ``candidate_model`` materialization;
3. the ``features`` materialization that ``candidate_model`` consumed;
4. the ``raw_data`` materialization that ``features`` consumed: its storage id, run, time, data
   version and source.

Steps 3 and 4 follow Dagster's data provenance: every materialization records, for each input
asset, the storage id of the upstream materialization it read (the tag
``dagster/input_event_pointer/<asset>``) and that input's data version
(``dagster/input_data_version/<asset>``). This is exact even when a model was trained in a later
run on features (and raw data) materialized by an earlier one. Only when a materialization carries
no such pointer (for example one reported from outside a Dagster run) does the trace fall back to
the latest upstream materialization before it whose data version equals the model version's
``data_version`` tag; the result says which path was taken.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import dagster as dg
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mlplatform.settings import load_settings

RAW_DATA = dg.AssetKey("raw_data")
FEATURES = dg.AssetKey("features")
CANDIDATE_MODEL = dg.AssetKey("candidate_model")

PROVENANCE = "dagster_provenance"
"""Path taken when every upstream link came from Dagster's recorded input event pointers."""
FALLBACK = "data_version_fallback"
"""Path taken when at least one link was found by matching data versions instead."""

DATA_VERSION_TAG = "dagster/data_version"
"""Event tag holding a materialization's own data version."""

_PAGE = 100


class LineageError(LookupError):
    """A link of the lineage chain cannot be found (version, run or materialization)."""


@dataclasses.dataclass(frozen=True)
class MaterializationRef:
    """One asset materialization in the lineage chain.

    Attributes:
        asset: the asset key as a string (``raw_data``, ``features``, ``candidate_model``).
        storage_id: the event's id in the Dagster event log (unique per instance).
        run_id: the Dagster run that materialized it (empty for a materialization reported from
            outside a run).
        timestamp: when it was recorded (seconds since the epoch, UTC).
        data_version: its Dagster data version, if recorded.
        found_by: how it was reached: ``training_run`` (the run named by the model version),
            ``dagster_provenance`` (the downstream materialization's input event pointer) or
            ``data_version_fallback``.
        metadata: the materialization's scalar metadata (strings and numbers).

    """

    asset: str
    storage_id: int
    run_id: str
    timestamp: float
    data_version: str | None
    found_by: str
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def time(self) -> str:
        """The materialization time in ISO 8601 (UTC, seconds)."""
        return dt.datetime.fromtimestamp(self.timestamp, dt.UTC).isoformat(timespec="seconds")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, with the time in ISO 8601."""
        return dataclasses.asdict(self) | {"time": self.time, "metadata": dict(self.metadata)}


@dataclasses.dataclass(frozen=True)
class ModelLineage:
    """Where a model version came from, down to the raw data materialization it was trained on.

    Attributes:
        model_name: the registered model's name.
        model_version: the registered model version.
        mlflow_run_id: the MLflow run that logged the model.
        model_tags: the model version's MLflow tags (lineage, code and promotion decisions).
        dagster_run_id: the Dagster run that trained the version.
        dagster_run_status: that run's status (e.g. ``SUCCESS``).
        dagster_job_name: that run's job.
        candidate_model: the training run's ``candidate_model`` materialization.
        features: the ``features`` materialization the model was trained on.
        raw_data: the ``raw_data`` materialization those features were built from.
        path: :data:`PROVENANCE` if every link came from Dagster's data provenance, else
            :data:`FALLBACK`.
        problems: inconsistencies found between the links (empty when the chain agrees).
        request_id: the prediction request traced, when built by :func:`trace_prediction`.

    """

    model_name: str
    model_version: str
    mlflow_run_id: str
    model_tags: Mapping[str, str]
    dagster_run_id: str
    dagster_run_status: str
    dagster_job_name: str
    candidate_model: MaterializationRef
    features: MaterializationRef
    raw_data: MaterializationRef
    path: str
    problems: tuple[str, ...] = ()
    request_id: str | None = None

    @property
    def model_uri(self) -> str:
        """The pinned MLflow model URI."""
        return f"models:/{self.model_name}/{self.model_version}"

    @property
    def data_version(self) -> str | None:
        """The data version of the raw data the model was trained on."""
        return self.raw_data.data_version

    @property
    def source_uri(self) -> str | None:
        """Where that raw data was read from."""
        value = self.raw_data.metadata.get("source_uri")
        return None if value is None else str(value)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (materializations as nested dicts)."""
        return {
            "model_name": self.model_name,
            "model_version": self.model_version,
            "model_uri": self.model_uri,
            "mlflow_run_id": self.mlflow_run_id,
            "model_tags": dict(self.model_tags),
            "dagster_run_id": self.dagster_run_id,
            "dagster_run_status": self.dagster_run_status,
            "dagster_job_name": self.dagster_job_name,
            "candidate_model": self.candidate_model.to_dict(),
            "features": self.features.to_dict(),
            "raw_data": self.raw_data.to_dict(),
            "data_version": self.data_version,
            "source_uri": self.source_uri,
            "path": self.path,
            "problems": list(self.problems),
            "request_id": self.request_id,
        }

    def to_markdown(self) -> str:
        """A readable report: the model, its training run, then the materialization chain."""
        tags = self.model_tags
        title = f"## Lineage of {self.model_name} v{self.model_version}"
        if self.request_id:
            title += f" (prediction {self.request_id})"
        code = tags.get("code_version", "?") + (
            f" @ {tags['git_sha'][:12]}" if tags.get("git_sha") else ""
        )
        summary = [
            ("model", f"`{self.model_uri}` ({tags.get('algorithm', 'unknown algorithm')})"),
            ("MLflow run", f"`{self.mlflow_run_id}`"),
            (
                "trained by Dagster run",
                f"`{self.dagster_run_id}` ({self.dagster_job_name}, {self.dagster_run_status})",
            ),
            ("code", code),
            ("raw data version", f"`{self.data_version}`"),
            ("raw data source", f"`{self.source_uri}`"),
        ]
        if "promotion.decision" in tags:
            summary.append(
                (
                    "last decision",
                    f"{tags['promotion.decision']}: {tags.get('promotion.reason', '')} "
                    f"(run `{tags.get('promotion.dagster_run_id', '?')}`, "
                    f"{tags.get('promotion.time', '?')})",
                )
            )
        summary.append(
            (
                "traced by",
                "Dagster data provenance (input event pointers)"
                if self.path == PROVENANCE
                else "data version match (no provenance recorded for every link)",
            )
        )
        lines = [title, "", "| | |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in summary]
        lines += [
            "",
            "| asset | storage id | Dagster run | materialized at | Dagster data version "
            "| found by |",
            "|---|---|---|---|---|---|",
        ]
        for ref in (self.candidate_model, self.features, self.raw_data):
            lines.append(
                f"| {ref.asset} | {ref.storage_id} | `{ref.run_id or '-'}` | {ref.time} "
                f"| `{_short(ref.data_version)}` | {ref.found_by} |"
            )
        if self.problems:
            lines += ["", "**Inconsistencies:**", ""]
            lines += [f"- {problem}" for problem in self.problems]
        return "\n".join(lines) + "\n"


def trace_model_version(
    instance: dg.DagsterInstance,
    model_name: str,
    version: str,
    tracking_uri: str | None = None,
) -> ModelLineage:
    """Trace a registered model version back to the raw data materialization it was trained on.

    Args:
        instance: the Dagster instance whose runs trained the model.
        model_name: the registered model's name.
        version: the model version.
        tracking_uri: the MLflow tracking and registry URI; default the platform's
            (``MLFLOW_TRACKING_URI`` or the store under the platform home).

    Returns:
        The lineage, with every link and the path taken to find it.

    Raises:
        LineageError: if the version, its training run or one of the materializations cannot be
            found.

    """
    uri = tracking_uri or load_settings().tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = str(version)
    try:
        model_version = client.get_model_version(model_name, version)
    except MlflowException as error:
        where = f"{model_name} v{version} in the MLflow registry at {uri}"
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            message = f"no model version {where}"
        else:
            message = f"cannot read {where}: {error}"
        raise LineageError(message) from error
    tags = dict(model_version.tags or {})
    run_id = tags.get("dagster_run_id")
    if not run_id:
        raise LineageError(
            f"{model_name} v{version} has no `dagster_run_id` tag: it was not trained by the "
            "platform"
        )
    run_record = instance.get_run_record_by_id(run_id)
    if run_record is None:
        raise LineageError(
            f"Dagster run {run_id}, which trained {model_name} v{version}, is not in this Dagster "
            "instance (check DAGSTER_HOME)"
        )
    run = run_record.dagster_run

    candidate = _training_materialization(instance, run_record, version)
    features, features_exact = _upstream(
        instance, candidate, FEATURES, tags.get("data_version"), _features_data_version
    )
    raw_data, raw_exact = _upstream(
        instance, features, RAW_DATA, tags.get("data_version"), _own_data_version
    )
    lineage = ModelLineage(
        model_name=model_name,
        model_version=version,
        mlflow_run_id=str(model_version.run_id),
        model_tags=tags,
        dagster_run_id=run_id,
        dagster_run_status=run.status.value,
        dagster_job_name=run.job_name,
        candidate_model=_ref(candidate, "training_run"),
        features=_ref(features, PROVENANCE if features_exact else FALLBACK),
        raw_data=_ref(raw_data, PROVENANCE if raw_exact else FALLBACK),
        path=PROVENANCE if features_exact and raw_exact else FALLBACK,
    )
    return dataclasses.replace(lineage, problems=_problems(lineage, client))


def trace_prediction(
    instance: dg.DagsterInstance, response: Mapping[str, Any], tracking_uri: str | None = None
) -> ModelLineage:
    """Trace a ``POST /predict`` answer back to the raw data its model was trained on.

    Args:
        instance: the Dagster instance whose runs trained the model.
        response: the JSON body of a ``POST /predict`` response (``model_name``,
            ``model_version`` and ``request_id`` are used).
        tracking_uri: the MLflow tracking and registry URI; default the platform's.

    Returns:
        The lineage of the model version that answered, with the request id.

    Raises:
        LineageError: if the response names no model version, or the chain cannot be traced.

    """
    name, version = response.get("model_name"), response.get("model_version")
    if not name or version in (None, ""):
        raise LineageError(
            "not a /predict response: it needs `model_name` and `model_version`, got keys "
            f"{sorted(response)}"
        )
    lineage = trace_model_version(instance, str(name), str(version), tracking_uri)
    return dataclasses.replace(lineage, request_id=response.get("request_id"))


def _materializations(
    instance: dg.DagsterInstance, records_filter: dg.AssetRecordsFilter
) -> Iterator[dg.EventLogRecord]:
    """Every materialization record matching ``records_filter``, newest first, page by page."""
    cursor = None
    while True:
        result = instance.fetch_materializations(records_filter, limit=_PAGE, cursor=cursor)
        yield from result.records
        if not result.has_more:
            return
        cursor = result.cursor


def _training_materialization(
    instance: dg.DagsterInstance, run_record: dg.RunRecord, version: str
) -> dg.EventLogRecord:
    """The ``candidate_model`` materialization of the training run that registered ``version``."""
    run_id = run_record.dagster_run.run_id
    end = run_record.end_time
    records_filter = dg.AssetRecordsFilter(
        asset_key=CANDIDATE_MODEL,
        after_timestamp=run_record.create_timestamp.timestamp() - 1.0,
        before_timestamp=end + 1.0 if end else None,
    )
    for record in _materializations(instance, records_filter):
        if record.run_id != run_id:
            continue
        registered = _metadata(record).get("model_version")
        if registered is None or str(registered) == version:
            return record
    raise LineageError(
        f"Dagster run {run_id} has no candidate_model materialization for model version {version}"
    )


def _features_data_version(record: dg.EventLogRecord) -> str | None:
    """The raw data version a ``features`` materialization was built from (its metadata)."""
    value = _metadata(record).get("data_version")
    return None if value is None else str(value)


def _own_data_version(record: dg.EventLogRecord) -> str | None:
    """A materialization's own Dagster data version."""
    return _tags(record).get(DATA_VERSION_TAG)


def _upstream(
    instance: dg.DagsterInstance,
    downstream: dg.EventLogRecord,
    parent: dg.AssetKey,
    data_version: str | None,
    version_of: Callable[[dg.EventLogRecord], str | None],
) -> tuple[dg.EventLogRecord, bool]:
    """The ``parent`` materialization that ``downstream`` consumed.

    Follows the input event pointer Dagster recorded on ``downstream``; without one, falls back to
    the latest ``parent`` materialization before ``downstream`` whose data version
    (``version_of(record)``) equals ``data_version``.

    Returns:
        ``(record, exact)``: ``exact`` is whether it came from Dagster's data provenance.

    Raises:
        LineageError: if neither way finds it.

    """
    provenance = dg.DataProvenance.from_tags(_tags(downstream))
    storage_id = provenance.input_storage_ids.get(parent) if provenance else None
    if storage_id is not None:
        found = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=parent, storage_ids=[storage_id]), limit=1
        ).records
        if found:
            return found[0], True
    downstream_name = downstream.asset_key.to_user_string() if downstream.asset_key else "?"
    if data_version is None:
        raise LineageError(
            f"{downstream_name} (storage id {downstream.storage_id}) records no "
            f"{parent.to_user_string()} input, and the model version has no data_version tag"
        )
    before = dg.AssetRecordsFilter(asset_key=parent, before_storage_id=downstream.storage_id)
    for record in _materializations(instance, before):
        if version_of(record) == data_version:
            return record, False
    raise LineageError(
        f"no {parent.to_user_string()} materialization with data version {data_version} before "
        f"{downstream_name} (storage id {downstream.storage_id})"
    )


def _problems(lineage: ModelLineage, client: MlflowClient) -> tuple[str, ...]:
    """Disagreements between the links: each should never happen in a consistent platform."""
    problems = []
    tagged = lineage.model_tags.get("data_version")
    if tagged != lineage.raw_data.data_version:
        problems.append(
            f"model version tag data_version={tagged} but raw_data (storage id "
            f"{lineage.raw_data.storage_id}) has data version {lineage.raw_data.data_version}"
        )
    built_from = lineage.features.metadata.get("data_version")
    if built_from is not None and built_from != lineage.raw_data.data_version:
        problems.append(
            f"features (storage id {lineage.features.storage_id}) were built from data version "
            f"{built_from}, not {lineage.raw_data.data_version}"
        )
    logged_by = lineage.candidate_model.metadata.get("mlflow_run_id")
    if logged_by is not None and logged_by != lineage.mlflow_run_id:
        problems.append(
            f"candidate_model recorded MLflow run {logged_by}, the model version has "
            f"{lineage.mlflow_run_id}"
        )
    try:
        run_tag = client.get_run(lineage.mlflow_run_id).data.tags.get("dagster_run_id")
    except MlflowException:
        problems.append(f"MLflow run {lineage.mlflow_run_id} is not in the tracking store")
    else:
        if run_tag is not None and run_tag != lineage.dagster_run_id:
            problems.append(
                f"MLflow run {lineage.mlflow_run_id} is tagged with Dagster run {run_tag}, the "
                f"model version with {lineage.dagster_run_id}"
            )
    return tuple(problems)


def _tags(record: dg.EventLogRecord) -> Mapping[str, str]:
    materialization = record.asset_materialization
    return (materialization.tags if materialization else None) or {}


def _metadata(record: dg.EventLogRecord) -> dict[str, Any]:
    """A materialization's scalar metadata: strings and numbers, not tables, JSON or Markdown."""
    materialization = record.asset_materialization
    if materialization is None:
        return {}
    return {
        name: entry.value
        for name, entry in materialization.metadata.items()
        if isinstance(entry.value, str | int | float)
        and not isinstance(entry, dg.MarkdownMetadataValue)
    }


def _ref(record: dg.EventLogRecord, found_by: str) -> MaterializationRef:
    return MaterializationRef(
        asset=record.asset_key.to_user_string() if record.asset_key else "?",
        storage_id=record.storage_id,
        run_id=record.run_id,
        timestamp=record.timestamp,
        data_version=_own_data_version(record),
        found_by=found_by,
        metadata=_metadata(record),
    )


def _short(version: str | None) -> str:
    """A data version for display: Dagster's computed versions are 64 hex digits."""
    if version is None:
        return "-"
    return version if len(version) <= 16 else version[:16] + "…"
