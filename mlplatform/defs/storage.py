"""Where the assets' outputs live between steps: one directory per run, written atomically.

Dagster's default IO manager keeps one file per asset (``storage/<asset>``), overwritten in place
by every run, so a run that reads an upstream output can get another run's half-written or newer
file. Here every output goes to ``storage/runs/<run id>/<asset>`` through a temporary file,
``fsync`` and ``os.replace``: a reader sees the whole previous file or the whole new one, and a
run's steps read the outputs of their own run. An input that the run did not produce (a rollback
reads the ``evaluation_report`` of the retrain before it) comes from the path its latest
materialization recorded, never from whatever file happens to be there.

Retention: after each write, run directories are deleted except those of the newest
``keep_runs`` runs, of runs still in progress and of every asset's latest materialization (so
any input a later run may load is kept).
"""

import os
import pickle
import shutil
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

import dagster as dg
from pydantic import Field

RUNS_DIR = "runs"

# Statuses of a run that may still write or read its directory.
_LIVE_STATUSES = [
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


class MissingOutput(Exception):
    """An input's upstream output cannot be found where its materialization says it is."""


def write_atomically(path: Path, obj: Any) -> None:
    """Pickle ``obj`` to ``path`` so that a reader sees the old file or the new one, whole.

    The bytes go to a temporary file in the same directory, reach the disk (``fsync``) and only
    then take the final name (``os.replace``, atomic on one filesystem); the directory is synced
    too, so the new name survives a crash. A failure leaves the previous file untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "wb") as file:
            pickle.dump(obj, file, pickle.HIGHEST_PROTOCOL)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class RunScopedPickleIOManager(dg.UPathIOManager):
    """Pickled outputs under ``<base>/runs/<run id>/<asset>``, written atomically.

    Args:
        base_dir: the storage root (Dagster's storage directory by default).
        keep_runs: how many of the newest run directories retention keeps in any case.

    """

    def __init__(self, base_dir: str, keep_runs: int):
        # A local ``Path`` serves as the base: the methods used here are the ones it shares with
        # ``UPath``, and the atomic write needs the local filesystem anyway.
        self.base_dir = Path(os.path.abspath(base_dir))
        super().__init__(base_path=self.base_dir)
        self.keep_runs = keep_runs

    def get_asset_relative_path(self, context: dg.InputContext | dg.OutputContext) -> PurePosixPath:
        """``runs/<run id>/<asset key>``: the run that writes the output, or that wrote it."""
        if isinstance(context, dg.InputContext):
            run_id = context.upstream_output.run_id
        else:
            run_id = context.run_id
        return PurePosixPath(RUNS_DIR, run_id, *context.asset_key.path)

    def dump_to_path(self, context: dg.OutputContext, obj: Any, path: Path) -> None:
        """Write the output atomically, then apply the retention rule."""
        write_atomically(path, obj)
        removed = prune_run_directories(
            self.base_dir / RUNS_DIR, context.step_context.instance, context.run_id, self.keep_runs
        )
        if removed:
            context.log.debug(f"retention removed the outputs of runs {', '.join(removed)}")

    def load_from_path(self, context: dg.InputContext, path: Path) -> Any:
        """Unpickle an output written by :meth:`dump_to_path`; the input event records its path."""
        with open(path, "rb") as file:
            value = pickle.load(file)
        context.add_input_metadata({"path": dg.MetadataValue.path(str(path))})
        return value

    def load_input(self, context: dg.InputContext) -> Any:
        """The upstream output of this run, else the one its latest materialization recorded.

        "This run" includes the run a re-execution resumes, whose outputs Dagster points to.

        Raises:
            MissingOutput: if the upstream asset was never materialized with a recorded path, or
                its file is gone.

        """
        if _produced_in_a_run(context):
            return super().load_input(context)
        path = recorded_path(context.instance, context.asset_key)
        context.log.debug(f"loading {context.asset_key.to_user_string()} from {path}")
        return self.load_from_path(context, Path(path))


def _produced_in_a_run(context: dg.InputContext) -> bool:
    """Whether the input comes from a step of this run or of the run it re-executes.

    For an upstream asset outside the run, Dagster builds the upstream context with a
    placeholder run id (or none), which names no run on the instance.
    """
    try:
        run_id = context.upstream_output.run_id
    except dg.DagsterInvariantViolationError:
        return False
    return context.instance.has_run(run_id)


def recorded_path(instance: dg.DagsterInstance, asset_key: dg.AssetKey) -> str:
    """The file the latest materialization of ``asset_key`` recorded in its ``path`` metadata.

    Raises:
        MissingOutput: if there is no such materialization or its file no longer exists.

    """
    event = instance.get_latest_materialization_event(asset_key)
    name = asset_key.to_user_string()
    if event is None or event.asset_materialization is None:
        raise MissingOutput(f"{name} has never been materialized on this Dagster instance")
    entry = event.asset_materialization.metadata.get("path")
    if entry is None:
        raise MissingOutput(
            f"the latest materialization of {name} (run {event.run_id}) recorded no path; "
            "materialize it again"
        )
    path = str(entry.value)
    if not os.path.exists(path):
        raise MissingOutput(
            f"the output of {name} recorded by run {event.run_id} is gone ({path}); "
            "materialize it again"
        )
    return path


def prune_run_directories(
    runs_dir: Path, instance: dg.DagsterInstance, current_run_id: str, keep_runs: int
) -> list[str]:
    """Delete the run directories that retention no longer needs; returns their run ids.

    Kept: the current run, the newest ``keep_runs`` directories, runs not finished yet, and the
    runs of every asset's latest materialization (a later run may load those outputs).
    """
    if not runs_dir.is_dir():
        return []
    directories = sorted(
        (d for d in runs_dir.iterdir() if d.is_dir()),
        key=lambda d: d.stat().st_mtime,
        reverse=True,
    )
    keep = {current_run_id, *(d.name for d in directories[:keep_runs])}
    live = instance.get_run_records(dg.RunsFilter(statuses=_LIVE_STATUSES))
    keep |= {record.dagster_run.run_id for record in live}
    latest = instance.get_latest_materialization_events(instance.get_asset_keys())
    keep |= {event.run_id for event in latest.values() if event is not None}
    removed = []
    for directory in directories:
        if directory.name not in keep:
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory.name)
    return removed


class RunScopedIOManager(dg.ConfigurableIOManagerFactory):
    """Pickled asset outputs, one directory per run, each file written atomically.

    A run reads the outputs of its own steps, and the output an earlier run recorded for any
    upstream asset it did not materialize; concurrent runs never see each other's files.
    """

    base_dir: str | None = Field(
        default=None,
        description="Storage root; default: the Dagster instance's storage directory.",
    )
    keep_runs: int = Field(
        default=5,
        ge=1,
        description="Run directories kept in any case, newest first (besides the runs whose "
        "outputs are the latest materializations and runs in progress).",
    )

    def create_io_manager(self, context: dg.InitResourceContext) -> RunScopedPickleIOManager:
        """The IO manager on this instance's storage directory (or ``base_dir``)."""
        base_dir = self.base_dir or context.instance.storage_directory()
        return RunScopedPickleIOManager(base_dir, self.keep_runs)
