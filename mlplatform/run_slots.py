"""One retrain, and one deployment of the endpoint, at a time, whoever starts the runs.

Runs launched by the daemon (sensors, the UI) wait in Dagster's run queue, whose tag limits
(dagster.yaml) allow one active run per value of ``mlplatform/workload=retrain`` and of
``mlplatform/endpoint``. The queue also counts the runs the command line executes in process on
the same instance, so it holds its own runs back while one of those is active. The command line
itself is not queued, so before executing a job it takes its turn here:

1. a file lock per limited tag (``fcntl.flock`` under ``$DAGSTER_HOME/locks``), held for the
   whole run: a second command waits for the first, and says for which run;
2. with the locks held, it waits until no run with those tags is active on the instance (a run
   the daemon launched).

Dagster's concurrency pools do not cover this: with ``granularity: run`` they are enforced by the
queue only (``execute_in_process`` skips them) and with ``granularity: op`` they limit steps, so
two runs would still interleave step by step.

The look at the instance and the start of the command's run are not one transaction: a queued
run the daemon dequeues in that same instant (the time ``execute_in_process`` takes to mark its
run started, well under a second) could still start alongside. Closing that needs the command's
run to be created before the look, which ``execute_in_process`` does not allow.

A run the command line started carries ``mlplatform/launcher=cli``; while the locks are held no
such run can be alive, so one still marked active was left by a killed process: it is marked
failed instead of being waited for forever.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import dagster as dg

# The tags the run queue limits (dagster.yaml, deploy/dagster.yaml), in the order their locks
# are taken, so two commands never hold one each while waiting for the other.
SERIAL_TAG_KEYS = ("mlplatform/endpoint", "mlplatform/workload")
LAUNCHER_TAG = "mlplatform/launcher"
CLI_LAUNCHER = "cli"

# Statuses in which the queue counts a run against its tag limits.
ACTIVE_STATUSES = [
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def serial_tags(tags: Mapping[str, str]) -> list[tuple[str, str]]:
    """The ``(key, value)`` pairs of ``tags`` that allow one active run at a time, lock order."""
    return [(key, tags[key]) for key in SERIAL_TAG_KEYS if key in tags]


@contextlib.contextmanager
def run_turn(
    instance: dg.DagsterInstance,
    tags: Mapping[str, str],
    run_id: str,
    say: Callable[[str], None] = print,
    poll_s: float = 1.0,
) -> Iterator[None]:
    """Wait until a run with ``tags`` may start, and keep the turn for the ``with`` block.

    Args:
        instance: the Dagster instance the run executes on.
        tags: the run's tags; only those in :data:`SERIAL_TAG_KEYS` serialize.
        run_id: the id of the run about to start (other commands print it while they wait).
        say: where the waiting messages go.
        poll_s: seconds between two looks at the instance while a queued run is active.

    """
    pairs = serial_tags(tags)
    locks = Path(instance.root_directory) / "locks"
    with contextlib.ExitStack() as held:
        for key, value in pairs:
            name = f"{key}={value}".replace("/", "_")
            held.enter_context(_file_lock(locks / f"{name}.lock", run_id, say))
        for key, value in pairs:
            _fail_abandoned_runs(instance, key, value, say)
            _wait_for_active_runs(instance, key, value, say, poll_s)
        yield


@contextlib.contextmanager
def _file_lock(path: Path, run_id: str, say: Callable[[str], None]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``; its content names the run holding it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(descriptor)
            say(f"Waiting for run {holder or '(starting)'} to finish (one at a time) ...")
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, run_id.encode(), 0)
        yield
    finally:
        os.close(descriptor)  # releases the lock, also when the process dies


def _holder(descriptor: int, wait_s: float = 2.0) -> str:
    """The run id in a lock file another command holds; ``""`` if none appears in ``wait_s``.

    The holder writes its id just after it took the lock, so a command that finds the lock
    taken may read the file in between; it looks again for a moment rather than name nobody.
    """
    deadline = time.monotonic() + wait_s
    while not (holder := os.pread(descriptor, 200, 0).decode(errors="replace").strip()):
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    return holder


def _active_runs(instance: dg.DagsterInstance, key: str, value: str) -> list[dg.DagsterRun]:
    records = instance.get_run_records(dg.RunsFilter(tags={key: value}, statuses=ACTIVE_STATUSES))
    return [record.dagster_run for record in records]


def _fail_abandoned_runs(
    instance: dg.DagsterInstance, key: str, value: str, say: Callable[[str], None]
) -> None:
    """Mark failed the command-line runs still active although no command holds their lock."""
    for run in _active_runs(instance, key, value):
        if run.tags.get(LAUNCHER_TAG) == CLI_LAUNCHER:
            message = "its command ended without finishing the run (killed?)"
            instance.report_run_failed(run, message=message)
            say(f"Marked run {run.run_id} ({run.job_name}) failed: {message}.")


def _wait_for_active_runs(
    instance: dg.DagsterInstance,
    key: str,
    value: str,
    say: Callable[[str], None],
    poll_s: float,
) -> None:
    """Return once no run with ``key=value`` is active, announcing each run waited for."""
    announced: set[str] = set()
    while runs := _active_runs(instance, key, value):
        for run in runs:
            if run.run_id not in announced:
                announced.add(run.run_id)
                say(f"Waiting for run {run.run_id} ({run.job_name}, from the run queue) ...")
        time.sleep(poll_s)
